"""Checks for names that end up in system files: hostnames, domains, user names, addresses."""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class ValidationError(ValueError):
    pass


def check_hostname(value: str) -> str:
    """An RFC 1123 label, lower-cased (Kubernetes node names must be lower case)."""
    name = value.lower()
    if not _LABEL.match(name):
        raise ValidationError(
            f"hostname {value!r} is not an RFC 1123 label (1-63 letters, digits or '-', "
            "not starting or ending with '-')"
        )
    return name


def check_domain(value: str) -> str:
    domain = value.lower().rstrip(".")
    if not domain or len(domain) > 253 or not all(_LABEL.match(label) for label in domain.split(".")):
        raise ValidationError(f"domain {value!r} is not a DNS name made of RFC 1123 labels")
    return domain


def check_user(value: str) -> str:
    if not _USER.match(value):
        raise ValidationError(
            f"user name {value!r} is not valid (lower case letters, digits, '_' or '-', at most 32)"
        )
    return value


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValidationError(f"{value!r} is not an IP address") from None
