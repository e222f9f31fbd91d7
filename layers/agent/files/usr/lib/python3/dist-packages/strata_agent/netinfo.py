"""The node's IPv4 addresses, from `ip -j` (iproute2's JSON output)."""

from __future__ import annotations

import json
from typing import Any

from .system import Runner

ROUTE_PROBE = "1.1.1.1"
ROUTE_COMMAND = ("ip", "-j", "route", "get", ROUTE_PROBE)
ADDR_COMMAND = ("ip", "-j", "-4", "addr", "show", "scope", "global")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_route_prefsrc(text: str) -> str | None:
    """The preferred source address of `ip -j route get` (a JSON list of routes)."""
    routes = _json(text)
    if isinstance(routes, list):
        for route in routes:
            if isinstance(route, dict) and isinstance(route.get("prefsrc"), str):
                return str(route["prefsrc"])
    return None


def parse_addresses(text: str) -> list[dict[str, Any]]:
    """IPv4 addresses from `ip -j -4 addr show`: interface, address and prefix length, in order."""
    found: list[dict[str, Any]] = []
    links = _json(text)
    if not isinstance(links, list):
        return found
    for link in links:
        if not isinstance(link, dict):
            continue
        for info in link.get("addr_info") or []:
            if isinstance(info, dict) and info.get("family") == "inet" and isinstance(info.get("local"), str):
                found.append(
                    {
                        "interface": link.get("ifname"),
                        "address": info["local"],
                        "prefix": info.get("prefixlen"),
                    }
                )
    return found


def global_addresses(runner: Runner) -> list[dict[str, Any]]:
    result = runner.run(ADDR_COMMAND)
    return parse_addresses(result.stdout) if result.ok else []


def detect_node_ip(runner: Runner) -> tuple[str, str] | None:
    """(address, method): the default route's source address, else the first global IPv4 address."""
    route = runner.run(ROUTE_COMMAND)
    if route.ok and (source := parse_route_prefsrc(route.stdout)):
        return source, "route"
    addresses = global_addresses(runner)
    if addresses:
        return str(addresses[0]["address"]), "address"
    return None
