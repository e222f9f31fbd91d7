"""strata agent: a power cut at any point of any step, then a fresh agent on the same disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_fakes import KEY_A, KEY_B, SimulatedCrash, activate_and_run, make_machine
from strata_agent.activation import Activation
from strata_agent.state import ALL_STEPS, PHASES

# The commands only each step runs (identity, k3s-config and write-manifests only write files).
STEP_COMMANDS: dict[str, list[tuple[str, ...]]] = {
    "hostname": [("hostname",)],
    "admin-user": [("getent",), ("useradd",), ("chpasswd",), ("chown",)],
    "node-ip": [("ip",)],
    "gpu": [("lspci",), ("nvidia-smi",)],
    "start-k3s": [("systemctl", "start"), ("systemctl", "enable")],
    "wait-node": [("k3s", "kubectl", "get", "node")],
    "wait-workloads": [("k3s", "kubectl", "get", "deployment"), ("k3s", "kubectl", "get", "job")],
}
MANIFESTS = "var/lib/rancher/k3s/server/manifests"


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("point", ["before", "after"])
@pytest.mark.parametrize("step", ALL_STEPS)
def test_power_cut_then_resume(tmp_path: Path, step: str, point: str) -> None:
    machine = make_machine(tmp_path)

    def power_cut(at: str, running: str) -> None:
        if (at, running) == (point, step):
            raise SimulatedCrash()

    first, first_runner = machine.agent(hook=power_cut)
    with pytest.raises(SimulatedCrash):
        activate_and_run(first)
    crashed = machine.state()
    assert crashed["current_step"] == step
    assert crashed["steps"][step]["status"] == "running"
    identity_file = machine.paths.identity_file
    token_at_crash = json.loads(identity_file.read_text())["token"] if identity_file.exists() else None
    manifests_at_crash = _inodes(machine.root / MANIFESTS)

    executed: list[str] = []

    def record(at: str, running: str) -> None:
        if at == "before":
            executed.append(running)

    fresh, runner = machine.agent(hook=record)
    assert not fresh.poll_activation()  # activated already: the activation file is not read again
    assert fresh.run_pending() == "ready"

    # The crashed step and the ones after it ran, once each; nothing finished was redone.
    first_undone = ALL_STEPS.index(step)
    assert executed == list(ALL_STEPS[first_undone:])
    for finished in ALL_STEPS[:first_undone]:
        for prefix in STEP_COMMANDS.get(finished, []):
            assert runner.count(*prefix) == 0, f"{finished} ran {prefix} again"

    # Nothing doubled.
    state = machine.state()
    assert [t["to"] for t in state["transitions"]] == [*PHASES, "ready"]
    assert all(record["status"] == "done" for record in state["steps"].values())
    keys = (machine.root / "home/olares/.ssh/authorized_keys").read_text().splitlines()
    assert keys == [KEY_A, KEY_B]
    hosts = (machine.root / "etc/hosts").read_text()
    assert hosts.count("box1.example.com") == 1
    assert hosts.splitlines()[1] == "10.0.0.5 box1.example.com box1"
    if token_at_crash is not None:
        assert json.loads(identity_file.read_text())["token"] == token_at_crash
    assert first_runner.count("useradd") + runner.count("useradd") == 1
    manifests_now = _inodes(machine.root / MANIFESTS)
    assert sorted(manifests_now) == ["strata-10-status.yaml", "strata-11-hello.yaml"]
    for name, inode in manifests_at_crash.items():
        assert manifests_now[name] == inode, f"{name} was written again"
    assert machine.system.enabled == {"k3s.service"}


def test_power_cut_between_saving_the_activation_and_the_state(tmp_path: Path) -> None:
    """An API activation (no file to find again) survives a cut before state.json says so."""
    machine = make_machine(tmp_path, activation=None)
    agent, _ = machine.agent()

    def cut(state: object) -> None:
        raise SimulatedCrash()

    agent.store.save = cut  # type: ignore[method-assign]
    api_activation = Activation(source="api", hostname="viaapi", domain="example.org", admin_user="ops")
    with pytest.raises(SimulatedCrash):
        agent.activate(api_activation)
    assert not machine.paths.state_file.exists()

    fresh, _ = machine.agent()
    assert fresh.current_state == "waiting-for-activation"
    assert fresh.poll_activation()
    assert fresh.run_pending() == "ready"
    assert machine.state()["activation"]["source"] == "api"
    assert machine.system.hostname == "viaapi"


def test_stop_during_a_wait_leaves_the_step_to_be_redone(tmp_path: Path) -> None:
    from strata_agent.system import AgentStopping

    machine = make_machine(tmp_path, node_ready_after=5)
    agent, _ = machine.agent()

    def stop_on_sleep(seconds: float) -> None:
        raise AgentStopping()

    machine.clock.sleep = stop_on_sleep  # type: ignore[method-assign]
    with pytest.raises(AgentStopping):
        activate_and_run(agent)
    assert machine.state()["steps"]["wait-node"]["status"] == "running"
    del machine.clock.sleep
    fresh, runner = machine.agent()
    assert fresh.run_pending() == "ready"
    assert runner.count("systemctl") == 0
