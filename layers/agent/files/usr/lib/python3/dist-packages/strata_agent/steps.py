"""The steps, each idempotent: running one again after a crash gives the same machine, nothing doubled.

A step returns the facts it found (merged into state.json when it is marked done) or raises StepError.
"""

from __future__ import annotations

import logging
import shlex
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gpu as gpu_detect
from . import hostsfile, k3s, manifests, netinfo
from .activation import Activation
from .config import Config
from .fsutil import atomic_write
from .identity import IdentityError, ensure_identity, load_identity
from .paths import Paths
from .state import timestamp
from .system import Clock, CommandResult, Runner

log = logging.getLogger(__name__)

Facts = dict[str, Any]
LOG_TAIL_LINES = 30


class StepError(RuntimeError):
    pass


class StepLog:
    """What one step did, for the failure report's log tail; also sent to the agent log."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.lines: deque[str] = deque(maxlen=500)

    def add(self, message: str, level: int = logging.INFO) -> None:
        self.lines.append(message)
        log.log(level, "[%s] %s", self.step, message)

    def tail(self, count: int = LOG_TAIL_LINES) -> list[str]:
        return list(self.lines)[-count:]


@dataclass
class StepContext:
    paths: Paths
    config: Config
    runner: Runner
    clock: Clock
    activation: Activation
    facts: Mapping[str, Any]  # what earlier steps recorded
    log: StepLog
    tick: Callable[[], None] = field(default=lambda: None)  # called between polls (IP watch)

    def run(self, args: Sequence[str], *, input_text: str | None = None, check: bool = True) -> CommandResult:
        """Run a command, noting it in the step log; a failure raises StepError when `check`."""
        result = self.runner.run(args, input_text=input_text)
        self.log.add(f"$ {shlex.join(args)} -> exit {result.returncode}", logging.DEBUG)
        if not result.ok:
            output = (result.stderr.strip() or result.stdout.strip()).splitlines()
            for line in output[-10:]:
                self.log.add(f"  {line}", logging.DEBUG)
            if check:
                detail = output[-1] if output else "no output"
                raise StepError(f"{shlex.join(args)} exited {result.returncode}: {detail}")
        return result

    def fact(self, key: str) -> Any:
        if key not in self.facts:
            raise StepError(f"{key} is not known yet: an earlier step has not recorded it")
        return self.facts[key]

    def wait_until(self, what: str, timeout: float, probe: Callable[[], tuple[bool, str]]) -> None:
        """Poll `probe` (-> done, description) every poll_interval until done or `timeout` seconds."""
        deadline = self.clock.monotonic() + timeout
        last = None
        while True:
            done, description = probe()
            if description != last:
                self.log.add(f"{what}: {description}")
                last = description
            if done:
                return
            if self.clock.monotonic() >= deadline:
                raise StepError(f"{what}: not ready after {timeout:g} s ({description})")
            self.tick()
            self.clock.sleep(self.config.poll_interval)


def step_hostname(ctx: StepContext) -> Facts:
    act = ctx.activation
    atomic_write(ctx.paths.hostname_file, act.hostname + "\n", 0o644)
    ctx.run(["hostname", act.hostname])
    # A node IP known from an earlier run keeps its line too (this step may be rerun).
    hostsfile.update_hosts(ctx.paths.hosts_file, act.hostname, act.fqdn, ctx.facts.get("node_ip"))
    ctx.log.add(f"hostname {act.hostname}, fqdn {act.fqdn}")
    return {"hostname": act.hostname, "domain": act.domain, "fqdn": act.fqdn}


def _passwd_home(result: CommandResult) -> str | None:
    fields = result.stdout.strip().split(":")
    return fields[5] if result.ok and len(fields) >= 7 and fields[5] else None


def _key_identity(line: str) -> tuple[str, ...]:
    """A public key line without its comment (options, type and blob), to spot the same key twice."""
    fields = line.split()
    for i, word in enumerate(fields):
        if word.startswith(("ssh-", "ecdsa-", "sk-")) and i + 1 < len(fields):
            return tuple(fields[: i + 2])
    return tuple(fields)


def step_admin_user(ctx: StepContext) -> Facts:
    act = ctx.activation
    user = act.admin_user
    entry = ctx.run(["getent", "passwd", user], check=False)
    if not entry.ok:
        ctx.run(["useradd", "-m", "-s", "/bin/bash", "-G", "sudo", user])
        entry = ctx.run(["getent", "passwd", user], check=False)
        ctx.log.add(f"created user {user}")
    home = _passwd_home(entry) or f"/home/{user}"
    if act.password_hash:
        ctx.run(["chpasswd", "-e"], input_text=f"{user}:{act.password_hash}\n")
        ctx.log.add(f"set the password of {user}")
    if act.ssh_keys:
        ssh_dir = ctx.paths.under(home) / ".ssh"
        keys_file = ssh_dir / "authorized_keys"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        ssh_dir.chmod(0o700)
        try:
            lines = keys_file.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        present = {_key_identity(line) for line in lines if line.strip()}
        added = [key for key in act.ssh_keys if _key_identity(key) not in present]
        atomic_write(keys_file, "".join(line + "\n" for line in [*lines, *added]), 0o600)
        ctx.run(["chown", "-R", f"{user}:", str(ssh_dir)])
        ctx.log.add(
            f"{len(added)} SSH key(s) added for {user}, {len(act.ssh_keys) - len(added)} already there"
        )
    return {"admin_user": user, "admin_home": home}


def step_identity(ctx: StepContext) -> Facts:
    act = ctx.activation
    try:
        identity, created = ensure_identity(
            ctx.paths, act.hostname, act.join_token, timestamp(ctx.clock.now())
        )
    except IdentityError as err:
        raise StepError(str(err)) from None
    ctx.log.add(f"{'new' if created else 'kept the'} identity: node name {identity.node_name}")
    return {"node_name": identity.node_name}


def step_node_ip(ctx: StepContext) -> Facts:
    if ctx.activation.node_ip:
        ctx.log.add(f"node IP {ctx.activation.node_ip} (from the activation)")
        found: tuple[str, str] | None = (ctx.activation.node_ip, "activation")
    else:
        found = netinfo.detect_node_ip(ctx.runner)
    if found is None:
        raise StepError("no node IP: no default route source address and no global IPv4 address")
    node_ip, method = found
    act = ctx.activation
    hostsfile.update_hosts(ctx.paths.hosts_file, act.hostname, act.fqdn, node_ip)
    ctx.log.add(f"node IP {node_ip} (by {method})")
    return {"node_ip": node_ip, "node_ip_source": method}


def step_gpu(ctx: StepContext) -> Facts:
    found, notes = gpu_detect.detect_gpu(ctx.runner)
    for note in notes:
        ctx.log.add(note)
    names = [device.get("model") or device["name"] for device in found["devices"]]
    ctx.log.add(f"GPU: {', '.join(names) if names else 'none'}")
    return {"gpu": found}


def step_k3s_config(ctx: StepContext) -> Facts:
    act = ctx.activation
    identity = load_identity(ctx.paths)
    if identity is None:
        raise StepError("identity.json is missing: rerun the identity step")
    config = k3s.dropin_config(
        token=identity.token,
        node_name=identity.node_name,
        node_ip=ctx.fact("node_ip"),
        hostname=act.hostname,
        fqdn=act.fqdn,
        server=act.join_server,
        gpu=bool(ctx.fact("gpu").get("present")),
    )
    k3s.write_dropin(ctx.paths.k3s_dropin, config)
    ctx.log.add(f"wrote {ctx.paths.k3s_dropin.name} (node-ip {config['node-ip']})")
    return {}


def step_start_k3s(ctx: StepContext) -> Facts:
    service = k3s.service_for(ctx.activation.role)
    ctx.run(["systemctl", "start", "containerd.service"])
    ctx.run(["systemctl", "enable", service])
    ctx.run(["systemctl", "start", "--no-block", service])
    ctx.log.add(f"started {service}")
    return {"k3s_service": service}


def node_ready(result: CommandResult) -> tuple[bool, str]:
    if not result.ok:
        lines = result.stderr.strip().splitlines()
        return False, f"not registered yet ({lines[-1] if lines else f'exit {result.returncode}'})"
    node = manifests.parse_object(result.stdout) or {}
    for condition in (node.get("status") or {}).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            status = condition.get("status")
            return status == "True", f"Ready={status}"
    return False, "no Ready condition yet"


def step_wait_node(ctx: StepContext) -> Facts:
    name = ctx.fact("node_name")
    command = k3s.kubectl_get("node", name)
    ctx.wait_until(f"node {name}", ctx.config.node_ready_timeout, lambda: node_ready(ctx.runner.run(command)))
    return {}


def step_write_manifests(ctx: StepContext) -> Facts:
    act = ctx.activation
    values = {
        "hostname": act.hostname,
        "domain": act.domain,
        "node_ip": str(ctx.fact("node_ip")),
        "node_name": str(ctx.fact("node_name")),
        "admin_user": act.admin_user,
        "gpu": "true" if ctx.fact("gpu").get("present") else "false",
    }
    source = ctx.paths.under(ctx.config.manifests_source)
    try:
        rendered = manifests.render_templates(source, values)
        workloads = manifests.discover_workloads(rendered)
        written = manifests.write_rendered(ctx.paths.under(ctx.config.manifests_target), rendered)
    except manifests.ManifestError as err:
        raise StepError(str(err)) from None
    ctx.log.add(f"{len(rendered)} manifest(s) from {source}, {len(written)} written now")
    for workload in workloads:
        ctx.log.add(f"will wait for {workload.label()}")
    return {"manifests": [name for name, _ in rendered], "workloads": [w.to_json() for w in workloads]}


def step_wait_workloads(ctx: StepContext) -> Facts:
    waiting = [manifests.Workload.from_json(item) for item in ctx.facts.get("workloads", [])]

    def probe() -> tuple[bool, str]:
        for workload in list(waiting):
            result = ctx.runner.run(k3s.kubectl_get(workload.resource, workload.name, workload.namespace))
            obj = manifests.parse_object(result.stdout) if result.ok else None
            if obj is not None and manifests.workload_ready(workload.kind, obj):
                ctx.log.add(f"{workload.label()} is ready")
                waiting.remove(workload)
        labels = ", ".join(w.label() for w in waiting)
        return not waiting, f"waiting for {labels}" if waiting else "all ready"

    ctx.wait_until("workloads", ctx.config.workloads_timeout, probe)
    return {}


STEP_FUNCTIONS: dict[str, Callable[[StepContext], Facts]] = {
    "hostname": step_hostname,
    "admin-user": step_admin_user,
    "identity": step_identity,
    "node-ip": step_node_ip,
    "gpu": step_gpu,
    "k3s-config": step_k3s_config,
    "start-k3s": step_start_k3s,
    "wait-node": step_wait_node,
    "write-manifests": step_write_manifests,
    "wait-workloads": step_wait_workloads,
}
