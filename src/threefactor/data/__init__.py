"""Event data: structured arrays (x, y, t, p), transforms, readers and datasets."""

from .embedded import MOTION_CLASSES, MotionDataset, make_motion_dataset
from .events import EVENT_DTYPE, make_events
from .pixel_model import PixelModel, video_to_events
from .transforms import Compose, ToFrame

__all__ = [
    "EVENT_DTYPE", "make_events", "PixelModel", "video_to_events", "ToFrame", "Compose",
    "MOTION_CLASSES", "MotionDataset", "make_motion_dataset",
]
