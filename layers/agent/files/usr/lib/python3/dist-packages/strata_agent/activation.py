"""The activation: what makes this machine its own, and where it comes from.

Sources, first found wins: /etc/strata/activation.yaml, `activation.yaml` on a filesystem labelled
cidata, CIDATA or STRATA, the kernel command line (`strata.activation=<base64url>` or
`strata.hostname=` and friends), then POST /activate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Defaults
from .paths import Paths
from .state import AGENT, SERVER
from .system import Runner
from .validate import ValidationError, check_domain, check_hostname, check_ip, check_user

log = logging.getLogger(__name__)

BOOT_LABELS = ("cidata", "CIDATA", "STRATA")
ACTIVATION_FILE_NAME = "activation.yaml"

_KEYS = {"hostname", "domain", "admin", "node_ip", "join"}
_ADMIN_KEYS = {"user", "password_hash", "ssh_keys"}
_JOIN_KEYS = {"server", "token"}
# strata.<key>= on the kernel command line, and where each lands in the document.
_CMDLINE_KEYS = {
    "hostname": ("hostname",),
    "domain": ("domain",),
    "admin_user": ("admin", "user"),
    "server": ("join", "server"),
    "token": ("join", "token"),
}


class ActivationError(ValueError):
    pass


@dataclass(frozen=True)
class Activation:
    source: str
    hostname: str
    domain: str
    admin_user: str
    password_hash: str | None = field(default=None, repr=False)
    ssh_keys: tuple[str, ...] = ()
    node_ip: str | None = None  # pinned by the activation; detected otherwise
    join_server: str | None = None
    join_token: str | None = field(default=None, repr=False)

    @property
    def role(self) -> str:
        return AGENT if self.join_server else SERVER

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}"

    def public_view(self) -> dict[str, Any]:
        """The activation without the password hash or the join token."""
        view: dict[str, Any] = {
            "source": self.source,
            "hostname": self.hostname,
            "domain": self.domain,
            "admin": {
                "user": self.admin_user,
                "ssh_keys": list(self.ssh_keys),
                "password_set": self.password_hash is not None,
            },
            "node_ip": self.node_ip,
            "role": self.role,
        }
        if self.join_server:
            view["join"] = {"server": self.join_server}
        return view

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "hostname": self.hostname,
            "domain": self.domain,
            "admin_user": self.admin_user,
            "password_hash": self.password_hash,
            "ssh_keys": list(self.ssh_keys),
            "node_ip": self.node_ip,
            "join_server": self.join_server,
            "join_token": self.join_token,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Activation:
        return cls(
            source=data["source"],
            hostname=data["hostname"],
            domain=data["domain"],
            admin_user=data["admin_user"],
            password_hash=data.get("password_hash"),
            ssh_keys=tuple(data.get("ssh_keys") or ()),
            node_ip=data.get("node_ip"),
            join_server=data.get("join_server"),
            join_token=data.get("join_token"),
        )


def _check_keys(doc: Mapping[Any, Any], allowed: set[str], where: str, source: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ActivationError(
                f"{source}: unknown key {where}{key!r} (known: {', '.join(sorted(allowed))})"
            )


def _text(doc: Mapping[str, Any], key: str, where: str, source: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise ActivationError(f"{source}: {where}{key} must be a non-empty single-line string")
    return value.strip()


def parse_activation(doc: object, source: str, defaults: Defaults) -> Activation:
    """Validate an activation document; values it leaves out come from the config's defaults."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ActivationError(f"{source}: the activation must be a mapping, got {type(doc).__name__}")
    _check_keys(doc, _KEYS, "", source)
    admin = doc.get("admin") or {}
    if not isinstance(admin, dict):
        raise ActivationError(f"{source}: admin must be a mapping")
    _check_keys(admin, _ADMIN_KEYS, "admin.", source)
    join = doc.get("join")
    if join is not None and not isinstance(join, dict):
        raise ActivationError(f"{source}: join must be a mapping")
    if join is not None:
        _check_keys(join, _JOIN_KEYS, "join.", source)
    try:
        hostname = check_hostname(_text(doc, "hostname", "", source) or defaults.hostname)
        domain = check_domain(_text(doc, "domain", "", source) or defaults.domain)
        user = check_user(_text(admin, "user", "admin.", source) or defaults.admin_user)
        node_ip = _text(doc, "node_ip", "", source)
        node_ip = check_ip(node_ip) if node_ip else None
    except ValidationError as err:
        raise ActivationError(f"{source}: {err}") from None
    password_hash = _text(admin, "password_hash", "admin.", source)
    if password_hash is not None and ":" in password_hash:
        raise ActivationError(f"{source}: admin.password_hash must be a crypt(3) hash (no ':')")
    keys = admin.get("ssh_keys") or []
    if not isinstance(keys, list) or not all(
        isinstance(key, str) and key.strip() and "\n" not in key.strip() for key in keys
    ):
        raise ActivationError(f"{source}: admin.ssh_keys must be a list of single-line public keys")
    server = token = None
    if join is not None:
        server = _text(join, "server", "join.", source)
        token = _text(join, "token", "join.", source)
        if not server or not token:
            raise ActivationError(f"{source}: join needs both server and token")
        if not server.startswith("https://"):
            raise ActivationError(f"{source}: join.server must be an https:// URL, got {server!r}")
    return Activation(
        source=source,
        hostname=hostname,
        domain=domain,
        admin_user=user,
        password_hash=password_hash,
        ssh_keys=tuple(dict.fromkeys(key.strip() for key in keys)),
        node_ip=node_ip,
        join_server=server,
        join_token=token,
    )


def parse_cmdline(text: str) -> dict[str, Any] | None:
    """The activation document carried by a kernel command line, or None when it carries none."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    doc: dict[str, Any] = {}
    found = False
    for word in words:
        key, sep, value = word.partition("=")
        if not key.startswith("strata.") or not sep:
            continue
        name = key.removeprefix("strata.")
        found = True
        if name == "activation":
            encoded = value.strip()
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                decoded = yaml.safe_load(raw.decode())
            except (binascii.Error, UnicodeDecodeError, yaml.YAMLError) as err:
                raise ActivationError(
                    f"cmdline: strata.activation is not base64url YAML/JSON: {err}"
                ) from None
            if not isinstance(decoded, dict):
                raise ActivationError("cmdline: strata.activation must decode to a mapping")
            doc = _merge(decoded, doc)  # individual strata.* keys win over the encoded document
        elif name in _CMDLINE_KEYS:
            *parents, leaf = _CMDLINE_KEYS[name]
            target = doc
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        else:
            known = ", ".join(f"strata.{key}" for key in ["activation", *_CMDLINE_KEYS])
            raise ActivationError(f"cmdline: unknown key strata.{name} (known: {known})")
    return doc if found else None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class ActivationSources:
    """Looks for an activation in the file, boot-medium and kernel-command-line sources, in that order."""

    def __init__(
        self,
        paths: Paths,
        runner: Runner,
        defaults: Defaults,
        *,
        label_dir: Path | None = None,
        labels: tuple[str, ...] = BOOT_LABELS,
    ) -> None:
        self.paths = paths
        self.runner = runner
        self.defaults = defaults
        self.label_dir = label_dir or paths.label_dir
        self.labels = labels
        # Media already read without an activation.yaml, by (label, inode, mtime) of their link.
        self._seen_empty: set[tuple[str, int, int]] = set()

    def find(self) -> Activation | None:
        """The first activation found; ActivationError when one is found but is not valid."""
        for probe in (self.from_file, self.from_boot_medium, self.from_cmdline):
            activation = probe()
            if activation is not None:
                return activation
        return None

    def from_file(self) -> Activation | None:
        path = self.paths.activation_yaml
        if not path.is_file():
            return None
        return parse_activation(_load_yaml(path, "file"), "file", self.defaults)

    def from_boot_medium(self) -> Activation | None:
        for label in self.labels:
            device = self.label_dir / label
            try:
                link = os.lstat(device)
            except FileNotFoundError:
                continue
            seen = (label, link.st_ino, link.st_mtime_ns)
            if seen in self._seen_empty:
                continue
            source = f"boot-medium:{label}"
            doc = self._read_medium(device, source)
            if doc is None:
                self._seen_empty.add(seen)
                continue
            return parse_activation(doc, source, self.defaults)
        return None

    def _read_medium(self, device: Path, source: str) -> object | None:
        """The activation document on `device` (mounted read-only for the read), or None without one."""
        mountpoint = Path(tempfile.mkdtemp(prefix="strata-activation-"))
        try:
            mounted = self.runner.run(["mount", "-o", "ro", str(device), str(mountpoint)])
            if not mounted.ok:
                raise ActivationError(f"{source}: mount {device} failed: {mounted.stderr.strip()}")
            try:
                path = mountpoint / ACTIVATION_FILE_NAME
                if not path.is_file():
                    return None
                doc = _load_yaml(path, source)
                return {} if doc is None else doc  # an empty file activates with the defaults
            finally:
                unmounted = self.runner.run(["umount", str(mountpoint)])
                if not unmounted.ok:
                    log.warning("umount %s failed: %s", mountpoint, unmounted.stderr.strip())
        finally:
            with contextlib.suppress(OSError):  # still mounted: leave the folder, do not touch the medium
                mountpoint.rmdir()

    def from_cmdline(self) -> Activation | None:
        try:
            text = self.paths.cmdline.read_text()
        except FileNotFoundError:
            return None
        doc = parse_cmdline(text)
        return None if doc is None else parse_activation(doc, "cmdline", self.defaults)


def _load_yaml(path: Path, source: str) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise ActivationError(f"{source}: cannot read {path.name}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ActivationError(f"{source}: {path.name} is not valid YAML: {err}") from None
