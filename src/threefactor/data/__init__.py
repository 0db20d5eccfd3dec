"""Event data: structured arrays (x, y, t, p), transforms, file formats, datasets and the
recordings made here.

``formats/`` turns files into event arrays and back, ``datasets/`` serves the samples of a
dataset, ``synthetic/`` makes recordings in software; ``splits`` turns a data config into the
count frames the trainer reads.
"""

from ..errors import DataFileError, DatasetNotFoundError, DownloadError, EventFileError, UnknownClassError
from .cache import CachedDataset, cache_key, transform_fingerprint
from .datasets.dvs_gesture import DVSGesture
from .datasets.embedded import MotionDataset
from .datasets.folder import EventFolder
from .datasets.mnist import load_mnist
from .datasets.nmnist import NMNIST
from .datasets.shd import SHD
from .datasets.simulated_nmnist import SimulatedNMNIST
from .download import Resource, check_integrity, download_and_extract, download_url, extract_archive
from .events import EVENT_DTYPE, make_events
from .formats.aedat import read_aedat, write_aedat
from .formats.event_file import read_events
from .formats.label_csv import read_labels_csv, write_labels_csv
from .formats.mnist_idx import read_idx
from .formats.nmnist_bin import read_bin, write_bin
from .formats.npy_events import read_npy_events, write_gesture_npy
from .formats.shd_hdf5 import read_shd, write_shd
from .synthetic.motion import MOTION_CLASSES, make_motion_dataset
from .synthetic.pixel_model import PixelModel, video_to_events
from .synthetic.saccades import SaccadeSpec, simulate_saccades
from .transforms import (
    CenterCrop, Compose, Crop, Denoise, Downsample, MergePolarities, RandomTimeSlice, TimeWindow, ToFrame,
    sum_pool,
)

__all__ = [
    "EVENT_DTYPE", "make_events", "PixelModel", "video_to_events", "ToFrame", "Compose",
    "MOTION_CLASSES", "MotionDataset", "make_motion_dataset",
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
