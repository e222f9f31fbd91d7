"""Fakes for the strata agent's unit tests: a simulated machine behind the command runner, and a clock."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from strata_agent.agent import Agent, Hook
from strata_agent.api import ApiServer
from strata_agent.auth import Authenticator, NonceStore
from strata_agent.config import Config
from strata_agent.paths import Paths
from strata_agent.system import CommandResult

MACHINE_ID = "0123abcd" + "0" * 24
DROPIN = "etc/rancher/k3s/config.yaml.d/50-strata-activation.yaml"  # the agent's K3s drop-in
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF7pbyoBN1lY8Hx5J0kPU7B0wbYVh6tjD7ZCq8nkLZ7f alice@example"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKm3Ns8yA2kX1mN1n4oQb6c2QH1z0oA3v9yCqj6fW2aB bob@example"
H100_LSPCI = """\
0000:00:00.0 Host bridge [0600]: Intel Corporation 440FX - 82441FX PMC [Natoma] [8086:1237] (rev 02)
0000:00:02.0 VGA compatible controller [0300]: Device [1234:1111] (rev 02)
0000:01:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 PCIe] [10de:2331] (rev a1)
0000:01:00.1 Audio device [0403]: NVIDIA Corporation Device [10de:22ba] (rev a1)
"""
H100_SMI = "NVIDIA H100 PCIe, 81559 MiB, 550.54.15\n"
DEBIAN_HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tstrata
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""
DEPLOYMENT_TEMPLATE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: strata-system
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: status
  namespace: strata-system
spec:
  replicas: 1
  template:
    spec:
      containers:
        - name: web
          image: localhost/web
          env:
            - {name: NODE, value: "${node_name}"}
            - {name: ADDRESS, value: "${node_ip}"}
            - {name: GPU, value: "${gpu}"}
            - {name: PRICE, value: "$5 for ${HOME}"}
"""
CHART_TEMPLATE = """\
apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata:
  name: hello
  namespace: kube-system
spec:
  targetNamespace: strata-apps
  valuesContent: |
    greeting: Hello from ${hostname}.${domain}, admin ${admin_user}
"""
ACTIVATION = f"""\
hostname: box1
domain: example.com
admin:
  user: olares
  password_hash: "$6$salt$hash"
  ssh_keys: ["{KEY_A}", "{KEY_B}"]
"""


class SimulatedCrash(BaseException):
    """A power cut: not an Exception, so nothing in the agent catches it."""


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 1000.0
        self.slept = 0.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
        self.slept += seconds


@dataclass
class FakeSystem:
    """The machine as the commands see it; it outlives an agent, as a disk outlives a power cut."""

    root: Path
    users: dict[str, str] = field(default_factory=dict)  # name -> home
    hostname: str = "strata"
    route_ip: str | None = "10.0.0.5"
    addresses: list[tuple[str, str, int]] = field(default_factory=lambda: [("eth0", "10.0.0.5", 24)])
    lspci: str | None = H100_LSPCI  # None: lspci is not installed
    nvidia_smi: str | None = H100_SMI  # None: nvidia-smi is not installed
    node_ready_after: int = 2  # kubectl polls answered "not found" before the node is Ready
    workload_ready_after: int = 1
    never_ready: set[str] = field(default_factory=set)  # workload names
    enabled: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    restarts: list[str] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)
    power: list[str] = field(default_factory=list)
    mounted: dict[str, str] = field(default_factory=dict)  # mountpoint -> device
    polls: dict[str, int] = field(default_factory=dict)
    fail: dict[str, CommandResult] = field(default_factory=dict)  # command prefix -> forced result


class FakeRunner:
    """Answers commands from a FakeSystem and records every call."""

    def __init__(self, system: FakeSystem) -> None:
        self.system = system
        self.calls: list[tuple[str, ...]] = []
        self.inputs: list[str | None] = []
        self._lock = threading.Lock()

    def run(
        self, args: Sequence[str], *, input_text: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        argv = tuple(args)
        with self._lock:
            self.calls.append(argv)
            self.inputs.append(input_text)
            for prefix, result in self.system.fail.items():
                if " ".join(argv).startswith(prefix):
                    return dataclasses.replace(result, args=argv)
            return self._answer(argv, input_text)

    def count(self, *prefix: str) -> int:
        return sum(1 for call in self.calls if call[: len(prefix)] == prefix)

    def _answer(self, argv: tuple[str, ...], stdin: str | None) -> CommandResult:
        system = self.system
        ok = CommandResult(argv, 0)
        match argv:
            case ("hostname", name):
                system.hostname = name
                return ok
            case ("getent", "passwd", user):
                if user not in system.users:
                    return CommandResult(argv, 2)
                return CommandResult(argv, 0, f"{user}:x:1000:1000::{system.users[user]}:/bin/bash\n")
            case ("useradd", "-m", "-s", "/bin/bash", "-G", "sudo", user):
                if user in system.users:
                    return CommandResult(argv, 9, "", f"useradd: user '{user}' already exists\n")
                system.users[user] = f"/home/{user}"
                (system.root / "home" / user).mkdir(parents=True, exist_ok=True)
                return ok
            case ("chpasswd", "-e"):
                user, _, hashed = (stdin or "").strip().partition(":")
                system.passwords[user] = hashed
                return ok
            case ("chown", "-R", owner, path):
                exists = Path(path).exists() and owner.rstrip(":") in system.users
                return ok if exists else CommandResult(argv, 1, "", f"chown: cannot access '{path}'\n")
            case ("ip", "-j", "route", "get", "1.1.1.1"):
                if system.route_ip is None:
                    return CommandResult(argv, 2, "", "RTNETLINK answers: Network is unreachable\n")
                route = [{"dst": "1.1.1.1", "gateway": "10.0.0.1", "dev": "eth0", "prefsrc": system.route_ip}]
                return CommandResult(argv, 0, json.dumps(route))
            case ("ip", "-j", "-4", "addr", "show", "scope", "global"):
                links = [
                    {
                        "ifname": ifname,
                        "addr_info": [{"family": "inet", "local": address, "prefixlen": prefix}],
                    }
                    for ifname, address, prefix in system.addresses
                ]
                return CommandResult(argv, 0, json.dumps(links))
            case ("lspci", "-Dnn"):
                return (
                    CommandResult(argv, 127) if system.lspci is None else CommandResult(argv, 0, system.lspci)
                )
            case ("nvidia-smi", *_):
                if system.nvidia_smi is None:
                    return CommandResult(argv, 127)
                return CommandResult(argv, 0, system.nvidia_smi)
            case ("systemctl", "enable", unit):
                system.enabled.add(unit)
                return ok
            case ("systemctl", "start", unit) | ("systemctl", "start", "--no-block", unit):
                system.started.add(unit)
                return ok
            case ("systemctl", "restart", unit):
                system.restarts.append(unit)
                return ok
            case ("systemctl", ("reboot" | "poweroff") as action):
                system.power.append(action)
                return ok
            case ("k3s", "kubectl", "get", "node", name, "-o", "json"):
                return self._node(argv, name)
            case ("k3s", "kubectl", "get", kind, "-n", namespace, name, "-o", "json"):
                return self._workload(argv, kind, namespace, name)
            case ("mount", "-o", "ro", device, mountpoint):
                shutil.copytree(Path(device).resolve(), mountpoint, dirs_exist_ok=True)
                system.mounted[mountpoint] = device
                return ok
            case ("umount", mountpoint):
                for child in Path(mountpoint).iterdir():
                    child.unlink()
                del system.mounted[mountpoint]
                return ok
        return CommandResult(argv, 127, "", f"{argv[0]}: command not found (fake)\n")

    def _k3s_running(self) -> bool:
        return bool({"k3s.service", "k3s-agent.service"} & self.system.started)

    def _poll(self, key: str) -> int:
        self.system.polls[key] = self.system.polls.get(key, 0) + 1
        return self.system.polls[key]

    def _node(self, argv: tuple[str, ...], name: str) -> CommandResult:
        if not self._k3s_running():
            return CommandResult(argv, 1, "", "The connection to the server 127.0.0.1:6443 was refused\n")
        if self._poll(f"node/{name}") <= self.system.node_ready_after:
            return CommandResult(argv, 1, "", f'Error from server (NotFound): nodes "{name}" not found\n')
        node = {"kind": "Node", "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        return CommandResult(argv, 0, json.dumps(node))

    def _workload(self, argv: tuple[str, ...], kind: str, namespace: str, name: str) -> CommandResult:
        ready = name not in self.system.never_ready and (
            self._poll(f"{kind}/{namespace}/{name}") > self.system.workload_ready_after
        )
        status: dict[str, Any] = {
            "deployment": {"readyReplicas": 1 if ready else 0},
            "statefulset": {"readyReplicas": 1 if ready else 0},
            "daemonset": {"desiredNumberScheduled": 1, "numberReady": 1 if ready else 0},
            "job": {"succeeded": 1} if ready else {"active": 1},
        }[kind]
        return CommandResult(argv, 0, json.dumps({"spec": {"replicas": 1}, "status": status}))


def make_root(tmp_path: Path, *, activation: str | None = ACTIVATION) -> Path:
    """A guest root: machine-id, Debian's /etc/hosts, the apps and (by default) an activation file."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text(MACHINE_ID + "\n")
    (root / "etc" / "hosts").write_text(DEBIAN_HOSTS)
    (root / "etc" / "hostname").write_text("strata\n")
    apps = root / "usr" / "share" / "strata" / "apps"
    apps.mkdir(parents=True)
    (apps / "10-status.yaml").write_text(DEPLOYMENT_TEMPLATE)
    (apps / "11-hello.yaml").write_text(CHART_TEMPLATE)
    (root / "proc").mkdir()
    (root / "proc" / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=UUID=1234 ro quiet\n")
    if activation is not None:
        (root / "etc" / "strata").mkdir(parents=True)
        (root / "etc" / "strata" / "activation.yaml").write_text(activation)
    return root


@dataclass
class Machine:
    """A root folder and the system around it, from which agents are started (again, after crashes)."""

    root: Path
    system: FakeSystem
    clock: FakeClock = field(default_factory=FakeClock)
    config: Config = field(default_factory=Config)

    @property
    def paths(self) -> Paths:
        return Paths(self.root)

    def agent(self, hook: Hook | None = None, runner: FakeRunner | None = None) -> tuple[Agent, FakeRunner]:
        runner = runner or FakeRunner(self.system)
        kwargs: dict[str, Any] = {"hook": hook} if hook is not None else {}
        return Agent(self.paths, self.config, runner, clock=self.clock, **kwargs), runner

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.paths.state_file.read_text())
        return data


def make_machine(tmp_path: Path, *, activation: str | None = ACTIVATION, **system: Any) -> Machine:
    root = make_root(tmp_path, activation=activation)
    return Machine(root, FakeSystem(root, **system))


def activate_and_run(agent: Agent, tick: Callable[[], None] | None = None) -> str:
    assert agent.poll_activation()
    return agent.run_pending(tick)


def ready_machine(tmp_path: Path, activation: str = ACTIVATION) -> tuple[Machine, Agent]:
    """A machine whose agent has activated from `activation` and reached `ready`."""
    machine = make_machine(tmp_path, activation=activation)
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "ready"
    return machine, agent


def openssh_public(key: Ed25519PrivateKey, comment: str) -> str:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " " + comment


def start_api(agent: Agent, machine: Machine, admin_keys: list[str]) -> ApiServer:
    """The agent's real API on a free port of 127.0.0.1, accepting `admin_keys`; stop() it after."""
    authenticator = Authenticator(admin_keys, 300, NonceStore(machine.paths.nonces_file))
    server = ApiServer(agent, authenticator, bind="127.0.0.1", port=0, action_delay=0)
    server.start()
    return server
