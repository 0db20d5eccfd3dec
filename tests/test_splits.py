"""From a data config to frames: real N-MNIST through the trainer's loader, lazy splits, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from threefactor.config import ConfigError, load_config
from threefactor.data import splits
from threefactor.data.formats.nmnist_bin import read_bin
from threefactor.data.transforms import to_frame
from threefactor.run.from_config import RunError, load_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nmnist-small"
needs_nmnist = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real N-MNIST recordings not found at {SHARED} (../shared/data)"
)


def _cfg(**overrides):
    sets = [f"data.root={SHARED}", "data.n_train=40", "data.n_test=20", "train.progress=false"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config("nmnist-small", sets)


@needs_nmnist
def test_nmnist_small_frames_equal_reading_and_binning_the_files_by_hand():
    cfg = _cfg()
    test = load_split(cfg, "test")
    assert test.frames.shape == (20, 100, 2, 32, 32) and test.frames.dtype == torch.uint8
    assert len(test.classes) == 10
    # The subset is seeded; rebuild one sample from its file: crop 34 -> 32, 3 ms bins.
    ds = splits.open_dataset(cfg.data, "test")
    idx = splits.sample_indices(len(ds), 20, cfg.data.seed + 1)
    ev = read_bin(ds.files[idx[3]])
    ev = ev[(ev["x"] >= 1) & (ev["x"] < 33) & (ev["y"] >= 1) & (ev["y"] < 33)]
    ev["x"] -= 1
    ev["y"] -= 1
    expected = to_frame(ev, (32, 32, 2), 3000, 100)
    assert np.array_equal(test.frames[3].numpy(), np.minimum(expected, 255))
    assert test.labels[3].item() == int(ds.targets[idx[3]])


@needs_nmnist
def test_lazy_split_gives_the_same_frames_as_the_in_memory_one(tmp_path, monkeypatch):
    cfg = _cfg(**{"data.cache_dir": str(tmp_path)})
    eager = load_split(cfg, "train")
    monkeypatch.setattr(splits, "MAX_IN_MEMORY_BYTES", 1)
    lazy = load_split(cfg, "train")
    assert isinstance(lazy.frames, splits.LazyFrames)
    assert lazy.frames.shape == tuple(eager.frames.shape)
    pick = torch.tensor([5, 0, 39])
    assert torch.equal(lazy.frames[pick], eager.frames[pick])
    assert torch.equal(lazy.frames[:3], eager.frames[:3])
    assert torch.equal(lazy.labels, eager.labels)
    assert any(tmp_path.rglob("*.npz")), "lazy frames are cached on disk"


def test_a_dataset_on_files_needs_a_root():
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None, ["data.dataset=nmnist"])


def test_missing_recordings_are_one_sentence_naming_where_they_were_looked_for(tmp_path):
    cfg = load_config(None, ["data.dataset=nmnist", f"data.root={tmp_path}", "train.progress=false"])
    with pytest.raises(RunError) as err:
        load_split(cfg, "train")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and re.search(r"download", msg)


def test_a_folder_of_own_recordings_trains_end_to_end(tmp_path):
    """The tutorial's last step: train/ and test/ class folders of .npy files, 64 x 64 -> 32 x 32."""
    from own_recordings import write_left_right_folder
    from threefactor.run.from_config import train

    write_left_right_folder(tmp_path / "rec", {"train": 6, "test": 4})
    cfg = load_config(None, [
        "data.dataset=folder", f"data.root={tmp_path / 'rec'}", "data.timesteps=20", "data.dt_us=2000",
        "data.downsample=2", "rule.burn_in=2", "train.epochs=1", "train.batch_size=4",
        "train.progress=false", "train.plots=false", "train.tensorboard=false",
        "network.layers=[{type: conv, channels: 4, kernel: 3, pool: 2}, {type: dense, channels: 8}]",
    ])
    train_split = load_split(cfg, "train")
    assert train_split.frames.shape == (12, 20, 2, 32, 32)
    assert train_split.classes == ("left", "right")
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert set(summary["test_accuracy"]) == {"layer1", "layer2"}


def test_the_embedded_dataset_takes_the_path_of_every_dataset_to_its_own_frames():
    """load_splits treats the embedded dataset as any other, and its frames are the dataset's
    own binning of each recording (1 ms bins, nothing cut away), as uint8 counts."""
    from threefactor.data.datasets.embedded import MotionDataset
    from threefactor.data.synthetic.motion import MotionSpec
    from threefactor.data.synthetic.pixel_model import PixelModel

    cfg = load_config(None, ["data.n_train=6", "data.n_test=4", "data.timesteps=12", "data.seed=3",
                             "train.progress=false"])
    train, test = splits.load_splits(cfg.data, progress=False)
    d = cfg.data
    spec = MotionSpec(timesteps=12, speed=d.speed, contrast=d.contrast, dots_per_view=d.dots_per_view,
                      pixel=PixelModel(threshold=d.threshold, noise_rate_hz=d.noise_rate_hz))
    for split, data, n in (("train", train, 6), ("test", test, 4)):
        ds = MotionDataset(split, n, seed=3, spec=spec)
        expected = np.stack([np.minimum(ds[i][0], 255) for i in range(n)]).astype(np.uint8)
        assert data.frames.dtype == torch.uint8 and np.array_equal(data.frames.numpy(), expected)
        assert np.array_equal(data.labels.numpy(), ds.targets)
        assert data.classes == ds.classes and data.sensor_size == ds.sensor_size == (32, 32, 2)
    assert not test.warnings  # no test recording is a training recording
