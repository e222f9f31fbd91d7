"""Durable file writes: every state, identity and system file goes through atomic_write."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data`: a temporary file in the same folder, fsynced, then renamed over it."""
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # the umask does not get a say
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n", mode)


def read_json(path: Path) -> Any:
    """The decoded file, or None when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return json.loads(text)
