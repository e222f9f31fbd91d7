"""stratactl: status for people (from the API or state.json) and signed commands."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fakes import Machine, activate_and_run, make_machine, openssh_public, ready_machine, start_api
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from strata_agent import cli
from strata_agent.api import ApiServer
from strata_agent.auth import Authenticator, NonceStore

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Machine, str]]:
    machine, agent = ready_machine(tmp_path)
    server = start_api(agent, machine, [openssh_public(KEY, "cli@test")])
    yield machine, f"http://127.0.0.1:{server.port}"
    server.stop()


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_bytes(KEY.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    return path


def test_status_from_the_api(served: tuple[Machine, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = served
    assert cli.main(["--url", url, "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("state:       ready\n")
    assert "hostname:    box1.example.com" in out
    assert "node name:   box1-0123abcd" in out and "node IP:     10.0.0.5" in out
    assert "GPU:         NVIDIA H100 PCIe (driver 550.54.15)" in out
    assert "10.0.0.5/24 (eth0)" in out
    assert "  wait-workloads   done" in out


def test_status_json(served: tuple[Machine, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = served
    assert cli.main(["--url", url, "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "ready" and data["addresses"][0]["address"] == "10.0.0.5"


def test_status_falls_back_to_state_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    machine = make_machine(tmp_path, node_ready_after=10**6)
    machine.config = machine.config.__class__(node_ready_timeout=4)
    agent, _ = machine.agent()
    activate_and_run(agent)
    assert cli.main(["--root", str(machine.root), "--url", "http://127.0.0.1:9", "status"]) == 0
    out = capsys.readouterr().out
    assert "does not answer" in out and "state:       failed" in out
    assert "failed:      step wait-node: node box1-0123abcd: not ready after 4 s" in out
    assert "  | " in out  # the log tail


def test_status_without_api_or_state_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--root", str(tmp_path), "--url", "http://127.0.0.1:9", "status"]) == 1
    assert "no answer" in capsys.readouterr().err


def test_signed_rerun(
    served: tuple[Machine, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine, url = served
    assert cli.main(["--url", url, "--key", str(_key_file(tmp_path)), "rerun", "wait-workloads"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rerun": "wait-workloads"}
    assert machine.state()["steps"]["wait-workloads"]["status"] == "pending"


def test_signed_reboot(served: tuple[Machine, str], tmp_path: Path) -> None:
    machine, url = served
    assert cli.main(["--url", url, "--key", str(_key_file(tmp_path)), "reboot"]) == 0
    deadline = time.monotonic() + 5
    while not machine.system.power and time.monotonic() < deadline:
        time.sleep(0.01)
    assert machine.system.power == ["reboot"]


def test_unreadable_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "key"
    bad.write_text("not a key")
    assert cli.main(["--url", "http://127.0.0.1:9", "--key", str(bad), "shutdown"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_refused_command_exits_1(
    served: tuple[Machine, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = served
    activation = tmp_path / "activation.yaml"
    activation.write_text("hostname: again\n")
    assert cli.main(["--url", url, "--key", str(_key_file(tmp_path)), "activate", str(activation)]) == 1
    assert "already activated" in capsys.readouterr().out


def test_activate_from_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    machine = make_machine(tmp_path, activation=None)
    agent, _ = machine.agent()
    public = KEY.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    server = ApiServer(agent, Authenticator([public], 300, NonceStore(None)), bind="127.0.0.1", port=0)
    server.start()
    try:
        doc = tmp_path / "act.yaml"
        doc.write_text("hostname: remote1\nadmin: {user: ops}\n")
        key = str(_key_file(tmp_path))
        assert cli.main(["--url", f"http://127.0.0.1:{server.port}", "--key", key, "activate", str(doc)]) == 0
    finally:
        server.stop()
    assert machine.state()["activation"]["hostname"] == "remote1"
    assert machine.state()["activation"]["source"] == "api"


def test_signed_commands_need_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--url", "http://127.0.0.1:9", "reboot"]) == 2
    assert "--key" in capsys.readouterr().err


def test_default_url_uses_the_configured_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc/strata").mkdir(parents=True)
    (tmp_path / "etc/strata/agent.json").write_text('{"api": {"port": 1}}')
    assert cli.main(["--root", str(tmp_path), "status"]) == 1
    assert "http://127.0.0.1:1" in capsys.readouterr().err
