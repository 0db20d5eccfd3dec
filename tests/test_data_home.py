"""Presets find their datasets under $THREEFACTOR_DATA (a per-user data folder by default),
never through the repository's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from threefactor.config import load_config, presets
from threefactor.data.home import data_home, resolve_root
from threefactor.run.from_config import RunError, load_split


def test_presets_name_their_data_under_the_data_home():
    for name in presets():
        root = load_config(name).data.root
        assert root is None or root.startswith("$THREEFACTOR_DATA/"), (name, root)


def test_the_data_home_is_the_variable_or_the_users_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("THREEFACTOR_DATA", str(tmp_path))
    assert data_home() == tmp_path
    assert resolve_root("$THREEFACTOR_DATA/nmnist") == tmp_path / "nmnist"
    assert resolve_root("${THREEFACTOR_DATA}/shd") == tmp_path / "shd"
    assert resolve_root("my_recordings") == Path("my_recordings")  # a user's root: the working dir
    monkeypatch.delenv("THREEFACTOR_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_root("$THREEFACTOR_DATA/nmnist") == tmp_path / "xdg" / "threefactor" / "nmnist"


def test_a_preset_without_its_data_says_where_it_looked_and_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("THREEFACTOR_DATA", str(tmp_path))
    cfg = load_config("nmnist-small", ["train.progress=false"])
    with pytest.raises(RunError, match=f"^{tmp_path / 'nmnist-small'} does not exist: data.root "
                                       "'\\$THREEFACTOR_DATA/nmnist-small' is under THREEFACTOR_DATA, which is set to"):
        load_split(cfg, "train")
