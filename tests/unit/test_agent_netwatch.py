"""strata agent: following a node IP change."""

from __future__ import annotations

from pathlib import Path

import yaml
from agent_fakes import DROPIN, activate_and_run, make_machine, ready_machine
from strata_agent.netwatch import IpWatcher, check_ip_change


def test_ip_change_updates_dropin_hosts_restarts_k3s_and_records_event(tmp_path: Path) -> None:
    machine, agent = ready_machine(tmp_path)
    token = yaml.safe_load((machine.root / DROPIN).read_text())["token"]
    assert check_ip_change(agent, lambda: "10.0.0.77")

    dropin = yaml.safe_load((machine.root / DROPIN).read_text())
    assert dropin["node-ip"] == "10.0.0.77"
    assert dropin["tls-san"] == ["10.0.0.77", "box1", "box1.example.com"]
    assert dropin["token"] == token and dropin["node-label"] == ["strata.io/gpu=true"]
    hosts = (machine.root / "etc/hosts").read_text()
    assert "10.0.0.77 box1.example.com box1" in hosts.splitlines()
    assert "10.0.0.5" not in hosts and hosts.count("box1.example.com") == 1
    assert machine.system.restarts == ["k3s.service"]
    state = machine.state()
    assert state["facts"]["node_ip"] == "10.0.0.77"
    [event] = state["events"]
    assert (event["kind"], event["old"], event["new"]) == ("ip-change", "10.0.0.5", "10.0.0.77")
    assert sorted(event) == ["kind", "new", "old", "time"]
    assert event["time"].endswith("Z")
    assert agent.status()["events"] == [event]


def test_no_change_does_nothing(tmp_path: Path) -> None:
    machine, agent = ready_machine(tmp_path)
    dropin_before = (machine.root / DROPIN).stat().st_ino
    hosts_before = (machine.root / "etc/hosts").stat().st_ino
    assert not check_ip_change(agent, lambda: "10.0.0.5")
    assert not check_ip_change(agent, lambda: None)  # no address at all: keep the last one
    assert (machine.root / DROPIN).stat().st_ino == dropin_before
    assert (machine.root / "etc/hosts").stat().st_ino == hosts_before
    assert machine.system.restarts == [] and machine.state()["events"] == []


def test_agent_role_restarts_k3s_agent(tmp_path: Path) -> None:
    machine, agent = ready_machine(tmp_path, "join: {server: 'https://10.0.0.1:6443', token: 'K10t'}\n")
    assert check_ip_change(agent, lambda: "10.0.0.8")
    assert machine.system.restarts == ["k3s-agent.service"]
    assert yaml.safe_load((machine.root / DROPIN).read_text())["server"] == "https://10.0.0.1:6443"


def test_pinned_node_ip_is_left_alone(tmp_path: Path) -> None:
    machine, agent = ready_machine(tmp_path, "hostname: box1\nnode_ip: 192.168.7.7\n")
    asked: list[bool] = []
    assert not check_ip_change(agent, lambda: asked.append(True) or "10.0.0.99")  # type: ignore[func-returns-value]
    assert asked == [] and machine.system.restarts == []


def test_change_before_k3s_starts_is_recorded_and_used_by_k3s_config(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    agent, _ = machine.agent()

    def ip_changes_before_k3s_config(at: str, step: str) -> None:
        if (at, step) == ("before", "k3s-config"):
            assert check_ip_change(agent, lambda: "10.0.0.66")

    agent.hook = ip_changes_before_k3s_config
    assert activate_and_run(agent) == "ready"
    assert machine.system.restarts == []  # K3s was not running yet: it starts with the new address
    assert yaml.safe_load((machine.root / DROPIN).read_text())["node-ip"] == "10.0.0.66"


def test_watcher_checks_at_most_every_interval_with_the_detected_ip(tmp_path: Path) -> None:
    machine, agent = ready_machine(tmp_path)
    machine.system.route_ip = "10.0.0.42"
    watcher = IpWatcher(agent)  # the node-ip step's detection (ip route get)
    watcher.maybe_check()
    assert machine.state()["facts"]["node_ip"] == "10.0.0.42"
    machine.system.route_ip = "10.0.0.43"
    machine.clock.advance(9)
    watcher.maybe_check()
    assert machine.state()["facts"]["node_ip"] == "10.0.0.42"
    machine.clock.advance(1)
    watcher.maybe_check()
    assert machine.state()["facts"]["node_ip"] == "10.0.0.43"
    assert machine.system.restarts == ["k3s.service", "k3s.service"]


def test_watcher_runs_between_polls_of_wait_steps(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, node_ready_after=8)
    agent, _ = machine.agent()
    watcher = IpWatcher(agent, detect=lambda: "10.0.0.55")
    assert activate_and_run(agent, tick=watcher.maybe_check) == "ready"
    assert machine.state()["facts"]["node_ip"] == "10.0.0.55"
    assert machine.system.restarts == ["k3s.service"]
