"""Event data: structured arrays (x, y, t, p), transforms, readers and datasets."""

from .embedded import MOTION_CLASSES, MotionDataset, make_motion_dataset
from .events import EVENT_DTYPE, make_events
from .pixel_model import PixelModel, video_to_events
from .transforms import Compose, ToFrame

__all__ = [
    "EVENT_DTYPE", "make_events", "PixelModel", "video_to_events", "ToFrame", "Compose",
    "MOTION_CLASSES", "MotionDataset", "make_motion_dataset",
]

# Event-data layer: readers/writers, datasets, transforms, cache, downloads, saccade simulator.
from .cache import CachedDataset, cache_key, transform_fingerprint
from .download import Resource, check_integrity, download_and_extract, download_url, extract_archive
from ..errors import DataFileError, DatasetNotFoundError, DownloadError, EventFileError, UnknownClassError
from .folder import EventFolder, read_events
from .gesture import DVSGesture, read_aedat, read_labels_csv, read_npy_events, write_aedat, write_gesture_npy, write_labels_csv
from .mnist import load_mnist, read_idx
from .nmnist import NMNIST, read_bin, write_bin
from .saccades import SaccadeSpec, SimulatedNMNIST, simulate_saccades
from .shd import SHD, read_shd, write_shd
from .transforms import (
    CenterCrop, Crop, Denoise, Downsample, MergePolarities, RandomTimeSlice, TimeWindow, sum_pool,
)

__all__ += [
    "CachedDataset", "cache_key", "transform_fingerprint",
    "Resource", "check_integrity", "download_and_extract", "download_url", "extract_archive",
    "DataFileError", "DatasetNotFoundError", "DownloadError", "EventFileError", "UnknownClassError",
    "EventFolder", "read_events",
    "DVSGesture", "read_aedat", "read_labels_csv", "read_npy_events", "write_aedat", "write_gesture_npy",
    "write_labels_csv",
    "load_mnist", "read_idx",
    "NMNIST", "read_bin", "write_bin",
    "SaccadeSpec", "SimulatedNMNIST", "simulate_saccades",
    "SHD", "read_shd", "write_shd",
    "CenterCrop", "Crop", "Denoise", "Downsample", "MergePolarities", "RandomTimeSlice", "TimeWindow", "sum_pool",
]
