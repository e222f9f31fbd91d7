"""Every file the agent touches, resolved under one root prefix ("/" in the guest, a tmp dir in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AGENT_CONFIG = "/etc/strata/agent.json"
STATE_DIR = "/var/lib/strata/agent"
LOG_FILE = "/var/log/strata/agent.log"
K3S_DROPIN = "/etc/rancher/k3s/config.yaml.d/50-strata-activation.yaml"


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

    def under(self, absolute: str) -> Path:
        """`absolute` (a path in the guest) inside the root prefix."""
        return self.root / absolute.lstrip("/")

    @property
    def config_file(self) -> Path:
        return self.under(AGENT_CONFIG)

    @property
    def state_dir(self) -> Path:
        return self.under(STATE_DIR)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def identity_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def nonces_file(self) -> Path:
        return self.state_dir / "nonces.json"

    @property
    def activation_file(self) -> Path:
        """The accepted activation, secrets included (mode 0600), so a resumed run has it all."""
        return self.state_dir / "activation.json"

    @property
    def log_file(self) -> Path:
        return self.under(LOG_FILE)

    @property
    def activation_yaml(self) -> Path:
        return self.under("/etc/strata/activation.yaml")

    @property
    def cmdline(self) -> Path:
        return self.under("/proc/cmdline")

    @property
    def label_dir(self) -> Path:
        return self.under("/dev/disk/by-label")

    @property
    def hostname_file(self) -> Path:
        return self.under("/etc/hostname")

    @property
    def hosts_file(self) -> Path:
        return self.under("/etc/hosts")

    @property
    def machine_id(self) -> Path:
        return self.under("/etc/machine-id")

    @property
    def k3s_dropin(self) -> Path:
        return self.under(K3S_DROPIN)
