"""Where the datasets live on this machine: ``$THREEFACTOR_DATA``, or the user's data folder."""

from __future__ import annotations

import os
from pathlib import Path

DATA_HOME_VARIABLE = "THREEFACTOR_DATA"


def data_home() -> Path:
    """Where the presets' datasets live: ``$THREEFACTOR_DATA``, else ``$XDG_DATA_HOME/threefactor``
    (``~/.local/share/threefactor``)."""
    home = os.environ.get(DATA_HOME_VARIABLE)
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(xdg).expanduser() / "threefactor"


def resolve_root(root: str) -> Path:
    """``data.root`` as a path: ``$THREEFACTOR_DATA`` (or ``${THREEFACTOR_DATA}``) at its start
    is ``data_home()``, ``~`` the user's home; anything else is relative to the working directory."""
    for var in (f"${{{DATA_HOME_VARIABLE}}}", f"${DATA_HOME_VARIABLE}"):
        if root == var or root.startswith(var + "/"):
            return data_home() / root[len(var) + 1:]
    return Path(root).expanduser()
