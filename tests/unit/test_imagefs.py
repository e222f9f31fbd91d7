"""builder.imagefs: a disk image's root filesystem mounted read-only, and everything undone after."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import StrataError
from builder.imagefs import mounted_root

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("losetup", "partx", "sfdisk", "mkfs.ext4", "qemu-img")),
        reason="needs util-linux, fdisk, e2fsprogs and qemu-utils",
    ),
]
MiB = 1 << 20


def ext4(path: Path, size: int, content: dict[str, str]) -> Path:
    tree = path.with_suffix(".tree")
    tree.mkdir()
    for name, text in content.items():
        (tree / name).write_text(text)
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)
    return path


def disk(tmp_path: Path, parts: list[tuple[int, Path | None]]) -> Path:
    """A GPT disk with partitions of the given MiB sizes, each holding the given filesystem image."""
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate((sum(size for size, _ in parts) + 2) * MiB)
    table = "label: gpt\n" + "".join(f"size={size}MiB\n" for size, _ in parts)
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True)
    offset = MiB
    with image.open("r+b") as f:
        for size, fs in parts:
            if fs is not None:
                f.seek(offset)
                f.write(fs.read_bytes())
            offset += size * MiB
    return image


def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout


def test_mounts_the_largest_linux_filesystem_read_only(tmp_path: Path) -> None:
    small = ext4(tmp_path / "boot.ext4", 8 * MiB, {"which": "boot"})
    root = ext4(tmp_path / "root.ext4", 24 * MiB, {"which": "root"})
    image = disk(tmp_path, [(1, None), (8, small), (24, root)])
    before = image.read_bytes()
    with mounted_root(image, tmp_path / "work") as mnt:
        assert (mnt / "which").read_text() == "root"
        assert subprocess.run(["touch", str(mnt / "x")], capture_output=True).returncode != 0  # read-only
        assert loops_of(image)
    assert loops_of(image) == ""
    assert not os.path.ismount(tmp_path / "work" / "root")
    assert image.read_bytes() == before  # not even the journal replayed


def test_qcow2_goes_through_a_temporary_raw_copy(tmp_path: Path) -> None:
    root = ext4(tmp_path / "root.ext4", 16 * MiB, {"which": "root"})
    raw = disk(tmp_path, [(16, root)])
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    with mounted_root(image, tmp_path / "work") as mnt:
        assert (mnt / "which").read_text() == "root"
        assert (tmp_path / "work" / "image.raw").exists()
    assert not (tmp_path / "work" / "image.raw").exists()
    assert loops_of(tmp_path / "work" / "image.raw") == ""


def test_no_linux_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    image = disk(tmp_path, [(4, None), (4, None)])
    with (
        pytest.raises(StrataError, match="no partition with a Linux root filesystem"),
        mounted_root(image, tmp_path / "work"),
    ):
        pass
    assert loops_of(image) == ""
