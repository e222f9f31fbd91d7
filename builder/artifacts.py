"""Output folders that appear complete or not at all: built under a temporary name, then swapped in."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from . import ROOT


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (to make a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it becomes `final` durably, on failure it goes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def artifacts_root() -> Path:
    return Path(os.environ.get("STRATA_ARTIFACTS", ROOT / "artifacts"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_sha256sums(folder: Path, names: list[str], known: Mapping[str, str] | None = None) -> None:
    """SHA256SUMS for `names` in `folder`; `known` gives digests already computed, by name."""
    known = known or {}
    lines = [f"{known.get(n) or sha256_file(folder / n)}  {n}\n" for n in sorted(names)]
    (folder / "SHA256SUMS").write_text("".join(lines))


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on failure it is removed.

    A build killed at any moment leaves only `.NAME.tmp-PID` folders (swept by the next build),
    never a partial file under the final names.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                fsync_path(f)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
