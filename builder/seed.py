"""NoCloud seed ISOs (volume label `cidata`) written with pycdlib from templates/cloud-init/."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pycdlib

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

    def files(self) -> dict[str, bytes]:
        context = vars(self)
        return {name: render(f"cloud-init/{name}.j2", context).encode() for name in SEED_FILES}


def write_seed_iso(seed: Seed, out: Path) -> Path:
    """Write the seed ISO atomically to `out`."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in seed.files().items():
        iso_name = "/" + name.upper().replace("-", "_") + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    with atomic_file(out) as tmp:
        iso.write(str(tmp))
        iso.close()
    return out
