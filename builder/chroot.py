"""Entering a root filesystem tree with /proc, /sys, /dev and /run mounted, undone on exit."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .proc import StrPath, run

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """Mount the API filesystems a chroot needs; unmount them (lazily if busy) however we leave."""
    mounts = [
        (["-t", "proc", "proc"], "proc"),
        (["-t", "sysfs", "sysfs"], "sys"),
        (["--bind", "/dev"], "dev"),
        (["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts"], "dev/pts"),
        (["-t", "tmpfs", "-o", "mode=0755", "tmpfs"], "run"),
    ]
    done: list[Path] = []
    try:
        for args, where in mounts:
            target = root / where
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(target)], check=True)
            done.append(target)
        yield root
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(target)], check=False)


def chroot_run(
    root: Path,
    cmd: Sequence[StrPath],
    env: Mapping[str, str] | None = None,
    *,
    show: Callable[[str], bool] | None = None,
    what: str | None = None,
) -> str:
    """Run `cmd` inside `root` (already mounted) with a clean environment plus `env`."""
    full_env = {
        "PATH": CHROOT_PATH,
        "LC_ALL": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }
    full_env.update(env or {})
    return run(["chroot", str(root), *map(str, cmd)], env=full_env, show=show, what=what)
