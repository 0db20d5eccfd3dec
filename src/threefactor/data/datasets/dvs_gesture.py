"""DVS128 Gesture (Amir et al. 2017): 11 hand and arm gestures of 29 people under several
lightings, as AEDAT 3.1 recordings with label csv files or as one ``.npy`` per gesture.

``userXX_<lighting>_labels.csv`` has rows ``class,startTime_usec,endTime_usec`` (classes 1..11)
that cut each recording into gestures. Users 1-23 are the training set, 24-29 the test set.

The preprocessed layout (Tonic's DVSGesture) is ``ibmGestureTrain/userXX_<lighting>/<label>.npy``
(labels 0..10), each an (N, 4) array with columns x, y, p, t and t in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..download import Resource
from ..formats.aedat import read_aedat
from ..formats.label_csv import read_labels_csv
from ..formats.npy_events import read_npy_events
from ..sensors import KNOWN_SENSORS
from ..transforms import time_window
from .base import LastRecording, PublishedDataset, not_found, sorted_files

SENSOR_SIZE = KNOWN_SENSORS["dvsgesture"]
CLASSES = (
    "hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
    "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
    "arm_roll", "air_drums", "air_guitar", "other_gestures",
)
TRAIN_USERS = range(1, 24)
TEST_USERS = range(24, 30)

_USER = re.compile(r"user(\d+)_")


def _user_of(name: str) -> int | None:
    m = _USER.match(name)
    return int(m.group(1)) if m else None


class DVSGesture(PublishedDataset):
    """DVS128 Gesture, 11 classes, sensor (128, 128, 2), from either layout under ``root``:

    - ``layout="npy"``: ``root/ibmGestureTrain/userXX_<lighting>/<label>.npy`` (and ``ibmGestureTest``),
      the preprocessed archives that ``download=True`` fetches;
    - ``layout="aedat"``: the original ``root/DvsGesture/userXX_<lighting>.aedat`` with
      ``..._labels.csv`` beside each (or the same files directly in ``root``); users 1-23 train,
      24-29 test, unless ``trials_to_train.txt``/``trials_to_test.txt`` list the files.
    - ``layout="auto"`` takes whichever is present (npy first).

    Gesture times start at 0 at the gesture's start (AEDAT) or as stored (npy). Reading from
    AEDAT parses a whole recording per gesture; the last recording is kept in memory, and
    ``CachedDataset`` avoids the rest.
    """

    classes = CLASSES
    sensor_size = SENSOR_SIZE
    npy_folders = {"train": "ibmGestureTrain", "test": "ibmGestureTest"}
    # The preprocessed archives (figshare, as Tonic fetches them) and their md5 sums.
    resources = {
        "train": Resource("https://figshare.com/ndownloader/files/38022171", "ibmGestureTrain.tar.gz",
                          md5="3a8f0d4120a166bac7591f77409cb105"),
        "test": Resource("https://figshare.com/ndownloader/files/38020584", "ibmGestureTest.tar.gz",
                         md5="56070e45dadaa85fff82e0fbfbc06de5"),
    }
    # IBM's original AEDAT archive sits behind a web page, so it cannot be fetched by script.
    aedat_page = "https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794"

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 download: bool = False, layout: str = "auto", target_transform: Callable | None = None,
                 outside_sensor: str = "error") -> None:
        if layout not in ("auto", "npy", "aedat"):
            raise ValueError(f"layout must be 'auto', 'npy' or 'aedat', got {layout!r}")
        super().__init__(root, split, transform, target_transform, outside_sensor)
        self._last = LastRecording()
        samples: list[tuple[Path, int, int | None, int | None]] = []
        if layout in ("auto", "npy"):
            samples = self._scan_npy()
        if not samples and layout in ("auto", "aedat"):
            samples = self._scan_aedat()
            layout = "aedat" if samples else layout
        if not samples and download and layout in ("auto", "npy"):
            self.fetch()
            samples = self._scan_npy()
        if not samples:
            npy = self.root / self.npy_folders[split] / "userXX_<lighting>" / "<label>.npy"
            aedat = self.root / "DvsGesture" / "userXX_<lighting>.aedat"
            raise not_found(
                f"DVS Gesture {split} split", f"{npy} and {aedat} (with _labels.csv)",
                f"pass download=True to fetch the preprocessed {self.resources[split].url}, or download "
                f"DvsGesture.tar.gz from {self.aedat_page} and unpack it into {self.root}"
            )
        self.layout = "npy" if samples[0][2] is None else "aedat"
        self.samples = samples
        self.targets = np.asarray([s[1] for s in samples], dtype=np.int64)

    def _scan_npy(self) -> list[tuple[Path, int, None, None]]:
        folder = self.root / self.npy_folders[self.split]
        if not folder.is_dir():
            return []
        out = []
        for rec in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name):
            files = [f for f in sorted_files(rec, ".npy") if f.stem.isdigit()]
            for f in sorted(files, key=lambda f: int(f.stem)):
                out.append((f, int(f.stem), None, None))
        return out

    def _scan_aedat(self) -> list[tuple[Path, int, int, int]]:
        folder = self.root / "DvsGesture"
        if not folder.is_dir():
            folder = self.root
        if not folder.is_dir():
            return []
        files = sorted_files(folder, ".aedat")
        trials = folder / f"trials_to_{self.split}.txt"
        if trials.is_file():
            wanted = {line.strip() for line in trials.read_text().splitlines() if line.strip()}
            files = [f for f in files if f.name in wanted]
        else:
            users = TRAIN_USERS if self.split == "train" else TEST_USERS
            files = [f for f in files if _user_of(f.name) in users]
        out = []
        for f in files:
            csv = f.with_name(f.stem + "_labels.csv")
            if not csv.is_file():
                raise not_found(f"the labels of {f.name}", csv,
                                "every DVS Gesture recording needs its _labels.csv beside it")
            for label, start, end in read_labels_csv(csv):
                out.append((f, int(label), int(start), int(end)))
        return out

    def events(self, i: int) -> np.ndarray:
        path, _, start, end = self.samples[i]
        if start is None:
            return read_npy_events(path, "xypt", 1000.0)
        return time_window(self._last.read(path, read_aedat), start, end - start)

    def source(self, i: int) -> tuple[str, object]:
        path, _, start, end = self.samples[i]
        return str(path), None if start is None else {"start_us": start, "end_us": end}
