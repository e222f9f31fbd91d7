"""The K3s layer: laid out as K3s' installer does, on the image's containerd, started at activation."""

from __future__ import annotations

import json
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _needs_k3s(ctx: dict[str, Any]) -> None:
    if not ctx.get("k3s"):
        pytest.skip("the k3s layer is not enabled")


def test_binary_and_links(host: Any) -> None:
    k3s = host.file("/usr/local/bin/k3s")
    assert k3s.is_file and k3s.user == "root" and k3s.mode == 0o755
    for tool in ("kubectl", "crictl"):
        link = host.file(f"/usr/local/bin/{tool}")
        assert link.is_symlink and link.linked_to == "/usr/local/bin/k3s"
    assert host.file("/usr/bin/ctr").exists, "containerd's own ctr is kept, not shadowed by a link"
    assert host.run("/usr/local/bin/k3s --version").rc == 0


def test_config_points_at_containerd_and_disables_addons(host: Any, ctx: dict[str, Any]) -> None:
    config = host.file("/etc/rancher/k3s/config.yaml").content_string
    assert "container-runtime-endpoint: unix:///run/containerd/containerd.sock" in config
    for name in ctx["k3s"]["disable"]:
        assert f"  - {name}\n" in config
    assert host.file("/etc/rancher/k3s/registries.yaml").exists


def test_unit_is_the_installers(host: Any) -> None:
    unit = host.file("/usr/lib/systemd/system/k3s.service").content_string
    for line in ("Type=notify", "Delegate=yes", "KillMode=process", "ExecStart=/usr/local/bin/k3s server"):
        assert line in unit
    agent = host.file("/usr/lib/systemd/system/k3s-agent.service").content_string
    assert "ExecStart=/usr/local/bin/k3s agent" in agent
    assert host.file("/etc/systemd/system/k3s.service.env").mode == 0o600


def test_no_cluster_state_baked_in(host: Any, ctx: dict[str, Any]) -> None:
    if ctx["mode"] != "offline":
        pytest.skip("only the baked tree is free of cluster state")
    assert not host.file("/etc/rancher/k3s/config.yaml.d/50-strata-activation.yaml").exists
    assert not host.file("/var/lib/rancher/k3s/server/token").exists
    assert not host.service("k3s").is_enabled, "k3s starts at activation, not before"


@pytest.mark.booted
def test_node_ready_under_its_own_name(host: Any) -> None:
    status = json.loads(host.check_output("stratactl status --json"))
    assert host.service("k3s").is_running and host.service("k3s").is_enabled
    node = json.loads(host.check_output(f"k3s kubectl get node {status['node_name']} -o json"))
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
