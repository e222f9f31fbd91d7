"""Agent configuration: /etc/strata/agent.json, read once at start. Every key is optional.

    {
      "api": {
        "bind": "0.0.0.0",          # address the HTTP API listens on ("::" for IPv6)
        "port": 18088               # its TCP port
      },
      "admin_keys": [],             # OpenSSH public key lines ("ssh-ed25519 AAAA... comment"); only
                                    # Ed25519 keys count. Empty: every signed endpoint answers 403
      "signature_window": 300,      # seconds a signed request stays valid (either side of now)
      "manifests_source": "/usr/share/strata/apps",                  # *.yaml templates to deploy
      "manifests_target": "/var/lib/rancher/k3s/server/manifests",   # K3s auto-deploy folder
      "node_ready_timeout": 600,    # seconds wait-node waits for the node to be Ready
      "workloads_timeout": 900,     # seconds wait-workloads waits for every workload
      "poll_interval": 2,           # seconds between polls (activation sources, kubectl)
      "ip_check_interval": 10,      # seconds between node IP checks
      "defaults": {                 # used where the activation leaves a value out
        "hostname": "strata",
        "domain": "strata.local",
        "admin_user": "strata"
      }
    }

Unknown keys and wrong types are rejected with the key's path, so a typo is not silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_json
from .validate import ValidationError, check_domain, check_hostname, check_user


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Defaults:
    hostname: str = "strata"
    domain: str = "strata.local"
    admin_user: str = "strata"


@dataclass(frozen=True)
class Config:
    api_bind: str = "0.0.0.0"
    api_port: int = 18088
    admin_keys: tuple[str, ...] = ()
    signature_window: int = 300
    manifests_source: str = "/usr/share/strata/apps"
    manifests_target: str = "/var/lib/rancher/k3s/server/manifests"
    node_ready_timeout: float = 600
    workloads_timeout: float = 900
    poll_interval: float = 2
    ip_check_interval: float = 10
    defaults: Defaults = field(default_factory=Defaults)


_TOP_KEYS = {
    "api",
    "admin_keys",
    "signature_window",
    "manifests_source",
    "manifests_target",
    "node_ready_timeout",
    "workloads_timeout",
    "poll_interval",
    "ip_check_interval",
    "defaults",
}


def _mapping(value: object, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(allowed))})")
    return value


def _number(data: Mapping[str, Any], key: str, default: float, where: str, *, integer: bool = False) -> Any:
    value: Any = data.get(key, default)
    numeric = isinstance(value, int) or (isinstance(value, float) and not integer)
    if isinstance(value, bool) or not numeric or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{where}.{key}: expected {kind}, got {value!r}")
    return value


def _string(data: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def parse_config(data: object) -> Config:
    """A Config from the decoded agent.json (None: all defaults)."""
    base = Config()
    top = _mapping({} if data is None else data, "agent.json", _TOP_KEYS)
    api = _mapping(top.get("api", {}), "agent.json.api", {"bind", "port"})
    port = _number(api, "port", base.api_port, "agent.json.api", integer=True)
    if port > 65535:
        raise ConfigError(f"agent.json.api.port: {port} is not a TCP port")
    keys = top.get("admin_keys", [])
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ConfigError("agent.json.admin_keys: expected a list of OpenSSH public key lines")
    raw_defaults = _mapping(
        top.get("defaults", {}), "agent.json.defaults", {"hostname", "domain", "admin_user"}
    )
    where = "agent.json.defaults"
    defaults = Defaults(
        hostname=_string(raw_defaults, "hostname", base.defaults.hostname, where),
        domain=_string(raw_defaults, "domain", base.defaults.domain, where),
        admin_user=_string(raw_defaults, "admin_user", base.defaults.admin_user, where),
    )
    try:
        check_hostname(defaults.hostname)
        check_domain(defaults.domain)
        check_user(defaults.admin_user)
    except ValidationError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Config(
        api_bind=_string(api, "bind", base.api_bind, "agent.json.api"),
        api_port=port,
        admin_keys=tuple(key.strip() for key in keys if key.strip()),
        signature_window=_number(top, "signature_window", base.signature_window, "agent.json", integer=True),
        manifests_source=_string(top, "manifests_source", base.manifests_source, "agent.json"),
        manifests_target=_string(top, "manifests_target", base.manifests_target, "agent.json"),
        node_ready_timeout=_number(top, "node_ready_timeout", base.node_ready_timeout, "agent.json"),
        workloads_timeout=_number(top, "workloads_timeout", base.workloads_timeout, "agent.json"),
        poll_interval=_number(top, "poll_interval", base.poll_interval, "agent.json"),
        ip_check_interval=_number(top, "ip_check_interval", base.ip_check_interval, "agent.json"),
        defaults=defaults,
    )


def load_config(path: Path) -> Config:
    """The config at `path`; a missing file means all defaults."""
    try:
        return parse_config(read_json(path))
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
