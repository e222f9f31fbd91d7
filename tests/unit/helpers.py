"""Small helpers shared by unit tests (imported as a sibling module; pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A plain tar at `path` holding `files` (name -> content)."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
