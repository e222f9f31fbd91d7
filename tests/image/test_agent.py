"""strata-agent and the apps layer: nothing per-machine baked in; after activation from the seed the
machine has its identity, K3s runs and the built-in workloads answer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

STATE_DIR = "/var/lib/strata/agent"


@pytest.fixture(autouse=True)
def _needs_agent(ctx: dict[str, Any]) -> None:
    if not ctx.get("agent"):
        pytest.skip("the agent layer is not enabled")


def test_installed_and_enabled(host: Any, ctx: dict[str, Any]) -> None:
    assert host.service("strata-agent").is_enabled
    assert host.run("python3 -c 'import strata_agent, yaml, cryptography'").rc == 0
    config = json.loads(host.file("/etc/strata/agent.json").content_string)
    assert config["api"]["port"] == ctx["agent"]["api_port"]


def test_apps_shipped(host: Any, ctx: dict[str, Any]) -> None:
    shipped = host.file("/usr/share/strata/apps").listdir()
    assert sorted(shipped) == sorted(ctx["apps"])


def test_no_activation_state_baked_in(host: Any, ctx: dict[str, Any]) -> None:
    if ctx["mode"] != "offline":
        pytest.skip("only the baked tree is unactivated")
    for name in ("state.json", "identity.json"):
        assert not host.file(f"{STATE_DIR}/{name}").exists
    assert not host.file("/etc/strata/activation.yaml").exists


@pytest.mark.booted
def test_ready_and_status_api(host: Any, ctx: dict[str, Any]) -> None:
    with urllib.request.urlopen(f"{ctx['api_url']}/status", timeout=10) as response:
        status = json.loads(response.read())
    assert status["state"] == "ready"
    hostname = ctx["activation"]["hostname"]
    assert status["node_name"].startswith(f"{hostname}-")
    assert status["node_ip"]
    token = json.loads(host.file(f"{STATE_DIR}/identity.json").content_string)["token"]
    assert token not in json.dumps(status), "the K3s token must never be shown"
    assert host.file(f"{STATE_DIR}/identity.json").mode == 0o600
    assert "ready" in host.check_output("stratactl status")


@pytest.mark.booted
def test_unsigned_commands_refused(ctx: dict[str, Any]) -> None:
    for method, path in (("POST", "/reboot"), ("POST", "/activate"), ("GET", "/anything")):
        request = urllib.request.Request(f"{ctx['api_url']}{path}", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401


@pytest.mark.booted
def test_activation_applied(host: Any, ctx: dict[str, Any]) -> None:
    activation = ctx["activation"]
    assert host.check_output("hostname") == activation["hostname"]
    user = activation["admin"]["user"]
    assert host.user(user).exists and "sudo" in host.user(user).groups
    keys = host.file(f"{host.user(user).home}/.ssh/authorized_keys").content_string.splitlines()
    assert keys.count(activation["admin"]["ssh_keys"][0]) == 1
    hosts = host.file("/etc/hosts").content_string
    assert hosts.count(f"{activation['hostname']}.{activation['domain']}") == 1


@pytest.mark.booted
def test_workloads_answer(host: Any, ctx: dict[str, Any]) -> None:
    hostname = ctx["activation"]["hostname"]
    if "10-strata-status.yaml" in ctx["apps"]:
        page = host.check_output("curl -fsS http://127.0.0.1:8080/")
        assert f"strata: {hostname}." in page
        live = json.loads(host.check_output("curl -fsS http://127.0.0.1:8080/cgi-bin/status"))
        assert live["state"] == "ready"
    if "11-hello.yaml" in ctx["apps"]:
        assert f"Hello from {hostname}" in host.check_output("curl -fsS http://127.0.0.1:8081/")


@pytest.mark.booted
def test_logs_kept(host: Any) -> None:
    assert host.file("/var/log/strata/agent.log").size > 0
    assert host.run("journalctl -b -u strata-agent --no-pager -q").stdout.strip()
