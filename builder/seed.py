"""NoCloud seed ISOs (volume label `cidata`) written with pycdlib from templates/cloud-init/."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from .artifacts import atomic_file
from .bake import render

SEED_FILES = ("user-data", "meta-data", "network-config")


@dataclass
class Seed:
    hostname: str
    ssh_authorized_keys: list[str] = field(default_factory=list)
    password_hash: str = ""
    root_login: bool = True
    instance_id: str = field(default_factory=lambda: f"iid-{uuid.uuid4()}")
    activation: dict[str, Any] | None = None  # strata-agent's activation.yaml, read from this medium
    install: dict[str, str] | None = None  # the ISO installer's strata-install.conf (target=, force=)
    default_user: bool = True  # False: cloud-init creates no default user (a Packer build VM)

    def files(self) -> dict[str, bytes]:
        context = vars(self)
        files = {name: render(f"cloud-init/{name}.j2", context).encode() for name in SEED_FILES}
        if self.activation is not None:
            files["activation.yaml"] = yaml.safe_dump(self.activation, sort_keys=False).encode()
        if self.install is not None:
            files["strata-install.conf"] = "".join(f"{k}={v}\n" for k, v in self.install.items()).encode()
        return files


def add_iso_file(iso: pycdlib.PyCdlib, source: Path | bytes, path: str) -> None:
    """Add a file (contents, or a host path read while writing) at `path`, e.g. /boot/grub/grub.cfg:
    its ISO 9660 name is made to fit, and Rock Ridge and Joliet keep the real one."""
    folder, _, filename = path.rpartition("/")
    stem, _, suffix = filename.upper().replace("-", "_").partition(".")
    iso_path = f"{folder.upper()}/{stem[:30]}.{suffix[:3]};1"
    if isinstance(source, bytes):
        iso.add_fp(io.BytesIO(source), len(source), iso_path, rr_name=filename, joliet_path=path)
    else:
        iso.add_file(str(source), iso_path, rr_name=filename, joliet_path=path)


def write_seed_iso(seed: Seed, out: Path, extra: dict[str, Path] | None = None) -> Path:
    """Write the seed ISO atomically to `out`; `extra` adds files by name from paths (read as it writes)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in seed.files().items():
        add_iso_file(iso, data, f"/{name}")
    for name, path in (extra or {}).items():
        add_iso_file(iso, path, f"/{name}")
    with atomic_file(out) as tmp:
        iso.write(str(tmp))
        iso.close()
    return out
