"""K3s: the activation drop-in config, service names and kubectl commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .fsutil import write_json
from .state import AGENT

GPU_LABEL = "strata.io/gpu=true"


def service_for(role: str) -> str:
    return "k3s-agent.service" if role == AGENT else "k3s.service"


def tls_sans(node_ip: str, hostname: str, fqdn: str) -> list[str]:
    return [node_ip, hostname, fqdn]


def dropin_config(
    *,
    token: str,
    node_name: str,
    node_ip: str,
    hostname: str,
    fqdn: str,
    server: str | None,
    gpu: bool,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "token": token,
        "node-name": node_name,
        "node-ip": node_ip,
        "tls-san": tls_sans(node_ip, hostname, fqdn),
    }
    if server:
        config["server"] = server
    if gpu:
        config["node-label"] = [GPU_LABEL]
    return config


def write_dropin(path: Path, config: dict[str, Any]) -> None:
    """JSON is YAML; mode 0600 as it holds the cluster token."""
    write_json(path, config, mode=0o600)


def read_dropin(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def update_dropin_ip(path: Path, node_ip: str, hostname: str, fqdn: str) -> bool:
    """Point an existing drop-in at a new node IP; False when there is none or nothing changed."""
    config = read_dropin(path)
    if config is None:
        return False
    updated = {**config, "node-ip": node_ip, "tls-san": tls_sans(node_ip, hostname, fqdn)}
    if updated == config:
        return False
    write_dropin(path, updated)
    return True


def kubectl_get(kind: str, name: str, namespace: str | None = None) -> list[str]:
    args = ["k3s", "kubectl", "get", kind]
    if namespace is not None:
        args += ["-n", namespace]
    return [*args, name, "-o", "json"]
