"""strata agent: agent.json, /etc/hosts handling, and the files the layer installs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from strata_agent.config import Config, ConfigError, Defaults, load_config, parse_config
from strata_agent.hostsfile import render_hosts

LAYER = Path(__file__).resolve().parents[2] / "layers" / "agent"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "agent.json")
    assert config == Config()
    assert (config.api_bind, config.api_port, config.signature_window) == ("0.0.0.0", 18088, 300)
    assert config.manifests_target == "/var/lib/rancher/k3s/server/manifests"
    assert config.defaults == Defaults("strata", "strata.local", "strata")


def test_owner_rendered_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(
        '{"api": {"bind": "0.0.0.0", "port": 18099}, "admin_keys": ["ssh-ed25519 AAAA x"],'
        ' "node_ready_timeout": 60, "workloads_timeout": 90,'
        ' "defaults": {"hostname": "edge", "domain": "lab.example", "admin_user": "ops"}}'
    )
    config = load_config(path)
    assert config.api_port == 18099 and config.admin_keys == ("ssh-ed25519 AAAA x",)
    assert (config.node_ready_timeout, config.workloads_timeout, config.poll_interval) == (60, 90, 2)
    assert config.defaults == Defaults("edge", "lab.example", "ops")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"api": {"prot": 1}}, "agent.json.api.prot: unknown key"),
        ({"admin_key": []}, "agent.json.admin_key: unknown key"),
        ({"api": {"port": 70000}}, "not a TCP port"),
        ({"api": {"port": "80"}}, "agent.json.api.port: expected a positive integer"),
        ({"poll_interval": 0}, "agent.json.poll_interval: expected a positive number"),
        ({"signature_window": 1.5}, "signature_window: expected a positive integer"),
        ({"workloads_timeout": True}, "workloads_timeout: expected a positive number"),
        ({"admin_keys": "ssh-ed25519 AAAA"}, "admin_keys: expected a list"),
        ({"defaults": {"hostname": "bad_name"}}, "not an RFC 1123 label"),
        ([], "agent.json: expected an object"),
    ],
)
def test_invalid_config(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_not_json(tmp_path: Path) -> None:
    (tmp_path / "agent.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "agent.json")


def test_hosts_managed_line_replaces_debian_and_cloud_init_lines() -> None:
    text = "127.0.0.1 localhost\n127.0.1.1 strata\n::1 localhost\n127.0.1.1 box1.example.com box1\n"
    assert render_hosts(text, "box1", "box1.example.com", None) == (
        "127.0.0.1 localhost\n127.0.1.1 box1.example.com box1\n::1 localhost\n"
    )
    assert render_hosts(text, "box1", "box1.example.com", "10.0.0.5") == (
        "127.0.0.1 localhost\n10.0.0.5 box1.example.com box1\n::1 localhost\n"
    )
    once = render_hosts(text, "box1", "box1.example.com", "10.0.0.5")
    assert render_hosts(once, "box1", "box1.example.com", "10.0.0.6").count("box1.example.com") == 1


def test_hosts_keeps_foreign_lines() -> None:
    text = "127.0.0.1 localhost\n10.0.0.1 gateway # the router\n"
    assert render_hosts(text, "b", "b.example", None) == (
        "127.0.0.1 localhost\n127.0.1.1 b.example b\n10.0.0.1 gateway # the router\n"
    )


def test_launchers_are_executable_python_scripts() -> None:
    for path, target in [
        (LAYER / "files/usr/sbin/stratad", "strata_agent.daemon"),
        (LAYER / "files/usr/bin/stratactl", "strata_agent.cli"),
    ]:
        assert os.access(path, os.X_OK)
        text = path.read_text()
        assert text.startswith("#!/usr/bin/python3\n") and f"from {target} import main" in text


def test_service_unit() -> None:
    unit = (LAYER / "files/usr/lib/systemd/system/strata-agent.service").read_text().splitlines()
    for line in [
        "ExecStart=/usr/sbin/stratad",
        "Restart=on-failure",
        "After=network-online.target cloud-final.service containerd.service",
        "Wants=network-online.target",
        "WantedBy=multi-user.target",
        "StandardOutput=journal",
        "Type=simple",
    ]:
        assert line in unit


def test_install_script() -> None:
    script = LAYER / "install.d/70-enable-agent"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert "systemctl enable strata-agent.service" in text
    assert "mkdir -p /var/lib/strata/agent /var/log/strata" in text
