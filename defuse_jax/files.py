"""Small file helpers: atomic JSON writes (a kill never leaves half a file) and reads."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write `obj` as JSON via a temporary file and an atomic rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)
