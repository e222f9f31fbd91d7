"""The per-machine identity: the K3s token and node name, made once and kept in identity.json (0600)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from .fsutil import read_json, write_json
from .paths import Paths

_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")


class IdentityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Identity:
    token: str
    node_name: str
    created: str

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"Identity(node_name={self.node_name!r}, created={self.created!r})"


def machine_id_prefix(paths: Paths) -> str:
    """The first 8 hex digits of /etc/machine-id (systemd writes it at first boot)."""
    try:
        machine_id = paths.machine_id.read_text().strip()
    except FileNotFoundError:
        raise IdentityError("/etc/machine-id is missing") from None
    if not _MACHINE_ID.match(machine_id):
        raise IdentityError(f"/etc/machine-id is not initialised ({machine_id[:40]!r})")
    return machine_id[:8]


def load_identity(paths: Paths) -> Identity | None:
    data = read_json(paths.identity_file)
    if data is None:
        return None
    return Identity(token=data["token"], node_name=data["node_name"], created=data["created"])


def ensure_identity(
    paths: Paths,
    hostname: str,
    join_token: str | None,
    created: str,
    make_token: Callable[[], str] = lambda: secrets.token_hex(32),
) -> tuple[Identity, bool]:
    """The existing identity, or a new one written to identity.json; True when it was made now."""
    existing = load_identity(paths)
    if existing is not None:
        return existing, False
    identity = Identity(
        token=join_token or make_token(),
        node_name=f"{hostname}-{machine_id_prefix(paths)}",
        created=created,
    )
    write_json(
        paths.identity_file,
        {"token": identity.token, "node_name": identity.node_name, "created": identity.created},
        mode=0o600,
    )
    return identity, True
