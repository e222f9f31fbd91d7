"""Node IP watch: when the address changes, K3s's drop-in, /etc/hosts and the service follow."""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import hostsfile, k3s, netinfo
from .agent import Agent

log = logging.getLogger(__name__)

IpSource = Callable[[], str | None]


def check_ip_change(agent: Agent, detect: IpSource) -> bool:
    """Compare the detected node IP with the recorded one and follow a change; True when it changed.

    A node IP pinned by the activation is the operator's choice and is left alone.
    """
    activation = agent.activation
    old = agent.facts().get("node_ip")
    if activation is None or activation.node_ip or not old:
        return False
    new = detect()
    if not new or new == old:
        return False
    log.warning("node IP changed: %s -> %s", old, new)
    if k3s.update_dropin_ip(agent.paths.k3s_dropin, new, activation.hostname, activation.fqdn):
        log.info("updated node-ip and tls-san in %s", agent.paths.k3s_dropin)
    hostsfile.update_hosts(agent.paths.hosts_file, activation.hostname, activation.fqdn, new)
    if agent.step_done("start-k3s"):
        service = k3s.service_for(activation.role)
        result = agent.runner.run(["systemctl", "restart", service])
        if result.ok:
            log.info("restarted %s", service)
        else:
            log.error("systemctl restart %s failed: %s", service, result.stderr.strip())
    # Recorded last: after a power cut halfway, the next check sees the change again and redoes it.
    agent.record_ip_change(old, new)
    return True


def detect_ip(agent: Agent) -> IpSource:
    """The node-ip step's detection, without the activation's pinned address."""

    def detect() -> str | None:
        found = netinfo.detect_node_ip(agent.runner)
        return found[0] if found else None

    return detect


class IpWatcher:
    """Checks at most every ip_check_interval seconds; called from the daemon loop and between polls."""

    def __init__(self, agent: Agent, detect: IpSource | None = None) -> None:
        self.agent = agent
        self.detect = detect or detect_ip(agent)
        self.last_check: float | None = None

    def maybe_check(self) -> None:
        now = self.agent.clock.monotonic()
        if self.last_check is not None and now - self.last_check < self.agent.config.ip_check_interval:
            return
        self.last_check = now
        try:
            check_ip_change(self.agent, self.detect)
        except Exception:
            log.exception("node IP check failed")
