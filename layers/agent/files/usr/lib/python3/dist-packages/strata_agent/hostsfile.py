"""The agent's one line in /etc/hosts: `<address> <fqdn> <hostname>`.

The address is 127.0.1.1 (Debian's convention) until the node IP is known, then the node IP, so the
line follows IP changes. Rewriting replaces the line (and any other naming the fqdn, and any other
127.0.1.1 line); it never adds a second one.
"""

from __future__ import annotations

from pathlib import Path

from .fsutil import atomic_write

LOOPBACK_NAME_ADDRESS = "127.0.1.1"


def managed_line(hostname: str, fqdn: str, node_ip: str | None) -> str:
    return f"{node_ip or LOOPBACK_NAME_ADDRESS} {fqdn} {hostname}"


def _is_managed(line: str, fqdn: str) -> bool:
    fields = line.split("#", 1)[0].split()
    return bool(fields) and (fields[0] == LOOPBACK_NAME_ADDRESS or fqdn in fields[1:])


def render_hosts(text: str, hostname: str, fqdn: str, node_ip: str | None) -> str:
    kept: list[str] = []
    insert_at: int | None = None
    for line in text.splitlines():
        if _is_managed(line, fqdn):
            if insert_at is None:
                insert_at = len(kept)
            continue
        kept.append(line)
    if insert_at is None:
        # After the 127.0.0.1 line, as Debian has it.
        localhost = [i for i, line in enumerate(kept) if line.split()[:1] == ["127.0.0.1"]]
        insert_at = localhost[0] + 1 if localhost else 0
    kept.insert(insert_at, managed_line(hostname, fqdn, node_ip))
    return "\n".join(kept) + "\n"


def update_hosts(path: Path, hostname: str, fqdn: str, node_ip: str | None) -> bool:
    """Rewrite the managed line of `path`; True when the file changed."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = "127.0.0.1 localhost\n"
    new = render_hosts(old, hostname, fqdn, node_ip)
    if new == old:
        return False
    atomic_write(path, new, 0o644)
    return True
