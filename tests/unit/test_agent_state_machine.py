"""strata agent: the state machine end to end against a simulated machine."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from agent_fakes import DROPIN, KEY_A, KEY_B, MACHINE_ID, Machine, activate_and_run, make_machine
from strata_agent.agent import Conflict, UnknownStep
from strata_agent.config import Config
from strata_agent.state import ALL_STEPS, PHASES

NODE_NAME = f"box1-{MACHINE_ID[:8]}"


def test_full_run_reaches_ready_with_exact_transitions(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, runner = machine.agent()
    assert agent.current_state == "waiting-for-activation"
    assert activate_and_run(agent) == "ready"

    state = machine.state()
    assert [(t["from"], t["to"]) for t in state["transitions"]] == [
        ("waiting-for-activation", "activating"),
        ("activating", "starting-orchestration"),
        ("starting-orchestration", "deploying"),
        ("deploying", "ready"),
    ]
    assert list(state["steps"]) == list(ALL_STEPS)
    for record in state["steps"].values():
        assert record["status"] == "done"
        assert record["started"] <= record["finished"]
        assert record["seconds"] >= 0
    assert state["current_step"] is None and state["failed"] is None
    assert state["role"] == "server"
    assert state["activation"]["source"] == "file"
    facts = state["facts"]
    assert facts["node_name"] == NODE_NAME
    assert facts["node_ip"] == "10.0.0.5" and facts["node_ip_source"] == "route"
    assert facts["gpu"]["present"] is True

    # What the commands did to the machine.
    system = machine.system
    assert system.hostname == "box1"
    assert system.users == {"olares": "/home/olares"}
    assert system.passwords == {"olares": "$6$salt$hash"}
    assert {"k3s.service"} <= system.enabled and {"containerd.service", "k3s.service"} <= system.started
    assert runner.count("useradd") == 1
    assert ("systemctl", "start", "--no-block", "k3s.service") in runner.calls
    # wait-node polled until the node was Ready (2 "not found" answers, then Ready).
    assert runner.count("k3s", "kubectl", "get", "node", NODE_NAME, "-o", "json") == 3
    kubectl_get = ("k3s", "kubectl", "get")
    assert (*kubectl_get, "deployment", "-n", "strata-system", "status", "-o", "json") in runner.calls
    assert (*kubectl_get, "job", "-n", "kube-system", "helm-install-hello", "-o", "json") in runner.calls


def test_files_written_by_the_steps(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, _ = machine.agent()
    activate_and_run(agent)
    root = machine.root
    assert (root / "etc/hostname").read_text() == "box1\n"
    hosts = (root / "etc/hosts").read_text()
    assert "10.0.0.5 box1.example.com box1" in hosts.splitlines()
    assert hosts.count("box1.example.com") == 1 and "127.0.1.1" not in hosts
    keys = root / "home/olares/.ssh/authorized_keys"
    assert keys.read_text().splitlines() == [KEY_A, KEY_B]
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600

    identity = json.loads((root / "var/lib/strata/agent/identity.json").read_text())
    assert len(identity["token"]) == 64 and int(identity["token"], 16) >= 0
    assert identity["node_name"] == NODE_NAME
    assert stat.S_IMODE((root / "var/lib/strata/agent/identity.json").stat().st_mode) == 0o600

    dropin_path = root / DROPIN
    dropin = yaml.safe_load(dropin_path.read_text())
    assert dropin == {
        "token": identity["token"],
        "node-name": NODE_NAME,
        "node-ip": "10.0.0.5",
        "tls-san": ["10.0.0.5", "box1", "box1.example.com"],
        "node-label": ["strata.io/gpu=true"],
    }
    assert stat.S_IMODE(dropin_path.stat().st_mode) == 0o600

    target = root / "var/lib/rancher/k3s/server/manifests"
    assert sorted(p.name for p in target.iterdir()) == ["strata-10-status.yaml", "strata-11-hello.yaml"]
    status = (target / "strata-10-status.yaml").read_text()
    assert f'value: "{NODE_NAME}"' in status and 'value: "10.0.0.5"' in status and 'value: "true"' in status
    assert 'value: "$5 for ${HOME}"' in status  # shell syntax passes through
    assert "Hello from box1.example.com, admin olares" in (target / "strata-11-hello.yaml").read_text()

    state = json.loads((root / "var/lib/strata/agent/state.json").read_text())
    assert state["facts"]["workloads"] == [
        {"kind": "Deployment", "namespace": "strata-system", "name": "status"},
        {"kind": "Job", "namespace": "kube-system", "name": "helm-install-hello"},
    ]
    # Secrets stay out of state.json; the full activation is kept 0600 for resumed runs.
    assert identity["token"] not in json.dumps(state) and "$6$salt$hash" not in json.dumps(state)
    assert stat.S_IMODE((root / "var/lib/strata/agent/activation.json").stat().st_mode) == 0o600


def test_agent_role_joins_and_skips_deploying(tmp_path: Path) -> None:
    activation = "hostname: worker1\njoin: {server: 'https://10.0.0.1:6443', token: 'K10secret::s:abc'}\n"
    machine = make_machine(tmp_path, activation=activation, lspci=None)
    agent, runner = machine.agent()
    assert activate_and_run(agent) == "ready"
    state = machine.state()
    assert state["role"] == "agent"
    assert list(state["steps"]) == [*PHASES["activating"], *PHASES["starting-orchestration"]]
    assert [t["to"] for t in state["transitions"]] == ["activating", "starting-orchestration", "ready"]
    assert ("systemctl", "enable", "k3s-agent.service") in runner.calls
    assert "k3s.service" not in machine.system.started
    dropin = yaml.safe_load((machine.root / DROPIN).read_text())
    assert dropin["server"] == "https://10.0.0.1:6443"
    assert dropin["token"] == "K10secret::s:abc"
    assert "node-label" not in dropin  # no GPU: lspci is not even installed
    assert state["facts"]["gpu"] == {"present": False, "devices": [], "driver": None}
    assert not (machine.root / "var/lib/rancher/k3s/server/manifests").exists()
    assert "K10secret" not in json.dumps(state)
    # The defaults fill what the activation left out.
    assert state["facts"]["domain"] == "strata.local" and machine.system.users == {"strata": "/home/strata"}


def test_pinned_node_ip_is_used_without_detection(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, activation="hostname: box1\nnode_ip: 192.168.7.7\n")
    agent, runner = machine.agent()
    activate_and_run(agent)
    assert machine.state()["facts"]["node_ip"] == "192.168.7.7"
    assert machine.state()["facts"]["node_ip_source"] == "activation"
    assert runner.count("ip", "-j", "route") == 0


def test_node_ip_falls_back_to_the_first_global_address(tmp_path: Path) -> None:
    addresses = [("enp1s0", "172.16.0.9", 16), ("eth1", "10.9.9.9", 8)]
    machine = make_machine(tmp_path, route_ip=None, addresses=addresses)
    agent, _ = machine.agent()
    activate_and_run(agent)
    assert machine.state()["facts"]["node_ip"] == "172.16.0.9"
    assert machine.state()["facts"]["node_ip_source"] == "address"


def test_existing_user_is_not_recreated_and_keys_are_merged(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    machine.system.users["olares"] = "/srv/olares"
    ssh = machine.root / "srv/olares/.ssh"
    ssh.mkdir(parents=True)
    # The same key as KEY_A with another comment counts as present.
    (ssh / "authorized_keys").write_text(KEY_A.rsplit(" ", 1)[0] + " old-comment\nssh-rsa AAAAB3 carol\n")
    agent, runner = machine.agent()
    activate_and_run(agent)
    assert runner.count("useradd") == 0
    lines = (ssh / "authorized_keys").read_text().splitlines()
    assert lines == [KEY_A.rsplit(" ", 1)[0] + " old-comment", "ssh-rsa AAAAB3 carol", KEY_B]
    assert ("chown", "-R", "olares:", str(ssh)) in runner.calls


def _fail_at_wait_node(tmp_path: Path) -> Machine:
    machine = make_machine(tmp_path, node_ready_after=10**6)
    machine.config = Config(node_ready_timeout=30, poll_interval=2)
    return machine


def test_step_failure_records_step_error_and_log_tail(tmp_path: Path) -> None:
    machine = _fail_at_wait_node(tmp_path)
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    state = machine.state()
    last = state["transitions"][-1]
    assert (last["from"], last["to"]) == ("starting-orchestration", "failed")
    failed = state["failed"]
    assert failed["step"] == "wait-node"
    assert failed["error"].startswith(f"node {NODE_NAME}: not ready after 30 s")
    assert any("not registered yet" in line for line in failed["log_tail"])
    assert state["steps"]["wait-node"]["status"] == "failed"
    assert state["steps"]["write-manifests"]["status"] == "pending"
    assert machine.clock.slept == pytest.approx(30)


def test_rerun_after_failure_recovers_without_redoing_earlier_steps(tmp_path: Path) -> None:
    machine = _fail_at_wait_node(tmp_path)
    agent, runner = machine.agent()
    activate_and_run(agent)
    machine.system.node_ready_after = 0
    calls_before = len(runner.calls)
    agent.request_rerun("wait-node")
    assert agent.wake.is_set()
    assert machine.state()["state"] == "starting-orchestration" and machine.state()["failed"] is None
    assert agent.run_pending() == "ready"
    later = runner.calls[calls_before:]
    assert not any(call[0] in ("hostname", "useradd", "getent", "lspci") for call in later)
    assert machine.state()["transitions"][-3:][0]["to"] == "starting-orchestration"


def test_rerun_marks_that_step_and_every_later_one_pending(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, runner = machine.agent()
    activate_and_run(agent)
    agent.request_rerun("k3s-config")
    steps = machine.state()["steps"]
    assert [steps[s]["status"] for s in ALL_STEPS] == ["done"] * 5 + ["pending"] * 5
    assert machine.state()["state"] == "starting-orchestration"
    before = runner.count("hostname")
    assert agent.run_pending() == "ready"
    assert runner.count("hostname") == before


def test_rerun_refusals(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, _ = machine.agent()
    with pytest.raises(Conflict, match="not activated"):
        agent.request_rerun("hostname")
    with pytest.raises(UnknownStep):
        agent.request_rerun("no-such-step")
    assert agent.poll_activation()
    agent.state.current_step = "hostname"  # as while the daemon loop runs it
    with pytest.raises(Conflict, match="hostname is running"):
        agent.request_rerun("gpu")


def test_rerun_of_a_server_only_step_on_an_agent_node_conflicts(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, activation="join: {server: 'https://10.0.0.1:6443', token: 't'}\n")
    agent, _ = machine.agent()
    activate_and_run(agent)
    with pytest.raises(Conflict, match="not a step of the agent role"):
        agent.request_rerun("write-manifests")


def test_failed_step_is_retried_when_the_daemon_starts_again(tmp_path: Path) -> None:
    machine = _fail_at_wait_node(tmp_path)
    agent, _ = machine.agent()
    activate_and_run(agent)
    machine.system.node_ready_after = 0
    fresh, runner = machine.agent()
    assert fresh.current_state == "failed"
    assert fresh.retry_failed()
    assert fresh.run_pending() == "ready"
    assert runner.count("useradd") == 0 and runner.count("hostname") == 0


def test_command_failure_fails_the_step_with_the_command_in_the_error(tmp_path: Path) -> None:
    from strata_agent.system import CommandResult

    machine = make_machine(tmp_path)
    machine.system.fail["systemctl start containerd.service"] = CommandResult(
        ("systemctl",), 1, "", "Job for containerd.service failed.\n"
    )
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    failed = machine.state()["failed"]
    assert failed["step"] == "start-k3s"
    assert failed["error"] == (
        "systemctl start containerd.service exited 1: Job for containerd.service failed."
    )
    assert "  Job for containerd.service failed." in failed["log_tail"]


def test_uninitialised_machine_id_fails_the_identity_step(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    (machine.root / "etc/machine-id").write_text("uninitialized\n")
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    assert machine.state()["failed"]["step"] == "identity"
    assert "machine-id is not initialised" in machine.state()["failed"]["error"]


def test_workloads_timeout_lists_the_ones_not_ready(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, never_ready={"helm-install-hello"})
    machine.config = Config(workloads_timeout=20)
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    failed = machine.state()["failed"]
    assert failed["step"] == "wait-workloads"
    assert failed["error"] == (
        "workloads: not ready after 20 s (waiting for Job kube-system/helm-install-hello)"
    )


def test_ready_is_kept_across_restarts(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, _ = machine.agent()
    activate_and_run(agent)
    again, runner = machine.agent()
    assert again.current_state == "ready"
    assert not again.poll_activation()
    assert again.run_pending() == "ready"
    assert runner.calls == []


def test_tick_is_called_between_polls(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, node_ready_after=3)
    agent, _ = machine.agent()
    ticks: list[float] = []
    activate_and_run(agent, tick=lambda: ticks.append(machine.clock.monotonic()))
    assert len(ticks) >= 3
