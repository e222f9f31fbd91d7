"""Debian root filesystems with mmdebstrap, sharing one package cache so a warm rebuild downloads nothing."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .log import info
from .proc import run

# mmdebstrap progress worth showing, plus apt's summary of what it fetched
_SHOW = re.compile(
    r"^(I: (running apt-get update|downloading|extracting|installing|success)|Fetched |E: |W: )"
)


def cache_root() -> Path:
    return Path(os.environ.get("STRATA_CACHE", "/var/cache/strata"))


def apt_cache(os_settings: dict[str, Any]) -> Path:
    """One package cache per suite and architecture."""
    return cache_root() / "apt" / f"{os_settings['suite']}-{os_settings['arch']}"


def sources(os_settings: dict[str, Any]) -> list[str]:
    suite, comps = os_settings["suite"], " ".join(os_settings["components"])
    return [
        f"deb {os_settings['mirror']} {suite} {comps}",
        f"deb {os_settings['mirror']} {suite}-updates {comps}",
        f"deb {os_settings['security_mirror']} {suite}-security {comps}",
    ]


def mmdebstrap(
    os_settings: dict[str, Any],
    target: Path | str,
    packages: Iterable[str],
    *,
    variant: str = "apt",
    fmt: str = "directory",
) -> str:
    """Run mmdebstrap with the shared cache synced in before and out after.

    Package files are synced out right after extraction too: the extract variant deletes them
    before customize hooks run. With the cache warm, apt fetches only the InRelease files.
    """
    cache = apt_cache(os_settings)
    for sub in ("archives", "lists"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    cmd: list[str] = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={variant}",
        f"--format={fmt}",
        f"--architectures={os_settings['arch']}",
        '--aptopt=Acquire::Retries "3"',
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives "$1"/var/lib/apt/lists',
        f"--setup-hook=sync-in {cache}/archives /var/cache/apt/archives/",
        f"--setup-hook=sync-in {cache}/lists /var/lib/apt/lists/",
        f"--extract-hook=sync-out /var/cache/apt/archives {cache}/archives",
        f"--extract-hook=sync-out /var/lib/apt/lists {cache}/lists",
        f"--customize-hook=sync-out /var/cache/apt/archives {cache}/archives",
        "--skip=download/empty",
        "--skip=essential/unlink",
    ]
    names = sorted({p for p in packages if not p.startswith("?")})
    cmd += [f"--include={p}" for p in sorted({p for p in packages if p.startswith("?")})]
    if names:
        cmd.append("--include=" + ",".join(names))
    cmd += [os_settings["suite"], str(target), *sources(os_settings)]
    return run(cmd, show=lambda line: bool(_SHOW.match(line)), what="mmdebstrap")


def download_packages(os_settings: dict[str, Any], packages: Iterable[str]) -> None:
    """Fetch (and verify, via apt's signed indices) every package a build needs into the cache."""
    mmdebstrap(os_settings, "/dev/null", ["?essential", "apt", *packages], variant="extract", fmt="null")
    info(f"package cache: {apt_cache(os_settings)}")


def create_rootfs(os_settings: dict[str, Any], target: Path, packages: Iterable[str]) -> None:
    """Build the system tree with every package installed."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    mmdebstrap(os_settings, target, packages)


def extract_packages(os_settings: dict[str, Any], target: Path, packages: Iterable[str]) -> None:
    """Unpack packages and their dependencies without running maintainer scripts (container images)."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    mmdebstrap(os_settings, target, packages, variant="extract")
