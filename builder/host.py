"""Host checks: root, required tools (named by the Debian package that provides them), KVM usability."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import StrataError

# tool -> Debian package that provides it
TOOL_PACKAGES: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "packer": "packer",
    "losetup": "mount",
    "mount": "mount",
    "partx": "util-linux",
    "blkid": "util-linux",
    "blockdev": "util-linux",
    "mksquashfs": "squashfs-tools",
    "xorriso": "xorriso",
}

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise StrataError(f"{action} must run as root (it builds a root filesystem); run it with sudo")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        raise StrataError(
            f"missing host tool(s): {', '.join(missing)}; install with: apt-get install {' '.join(packages)}"
            " (or run ./strata, which installs them)"
        )


def require_file(path: Path, package: str) -> None:
    if not path.exists():
        raise StrataError(f"missing {path}; install with: apt-get install {package}")
