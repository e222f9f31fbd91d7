"""The root filesystem of a finished disk image, mounted read-only (to run the chroot suite on an image
that was not baked here, e.g. the Packer path's): a read-only loop device, its partitions, one mount."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StrataError
from .host import require_tools
from .proc import run
from .qemu import image_info

LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs")


def root_partition(partitions: list[Path]) -> Path:
    """The largest partition holding a Linux filesystem: the root of every image strata bakes or
    starts from (strata's, Debian's and Ubuntu's cloud images)."""
    found: list[tuple[int, Path]] = []
    for part in partitions:
        fstype = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "TYPE", str(part)], capture_output=True, text=True
        ).stdout.strip()
        if fstype in LINUX_FILESYSTEMS:
            size = int(run(["blockdev", "--getsize64", str(part)]))
            found.append((size, part))
    if not found:
        names = ", ".join(str(p) for p in partitions) or "none"
        raise StrataError(f"no partition with a Linux root filesystem in the image (partitions: {names})")
    return max(found)[1]


@contextmanager
def mounted_root(image: Path, workdir: Path) -> Iterator[Path]:
    """Mount the root filesystem of `image` (raw or qcow2) read-only under `workdir`; undone on exit.
    A qcow2 is first converted to a sparse raw copy in `workdir` (removed on exit)."""
    require_tools("qemu-img", "losetup", "partx", "blkid", "blockdev", "mount")
    workdir.mkdir(parents=True, exist_ok=True)
    raw = image
    if image_info(image)["format"] != "raw":
        raw = workdir / "image.raw"
        run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], what="qemu-img convert (to mount)")
    mnt = workdir / "root"
    loop = ""
    mounted = False
    try:
        loop = run(["losetup", "--find", "--show", "--read-only", str(raw)], what="losetup").strip()
        # partx, not --partscan: it works where udev does not run (containers, CI)
        run(["partx", "--add", loop], what=f"partx --add {loop}")
        parts = sorted(Path("/dev").glob(f"{Path(loop).name}p*"))
        root = root_partition(parts)
        mnt.mkdir(exist_ok=True)
        fstype = run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(root)]).strip()
        options = "ro,noload" if fstype.startswith("ext") else "ro"  # noload: no journal replay
        run(["mount", "-o", options, str(root), str(mnt)], what=f"mount {root}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if loop:
            subprocess.run(["partx", "--delete", loop], check=False, capture_output=True)
            subprocess.run(["losetup", "--detach", loop], check=False)
        if raw != image:
            raw.unlink(missing_ok=True)
