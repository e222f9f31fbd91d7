"""Unit tests for builder.inputs: layer `fetch:` entries resolved from the definition, and the bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.bake import make_bundle
from builder.definition import load_definition
from builder.errors import StrataError
from builder.inputs import LayerInput, layer_inputs

SHA = "ab" * 32


def test_default_k3s_inputs_point_upstream() -> None:
    inputs = layer_inputs(load_definition(environ={}))
    assert [(i.layer, i.dest, i.mode) for i in inputs] == [
        ("k3s", "/usr/local/bin/k3s", 0o755),
        ("k3s", "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst", 0o644),
    ]
    assert inputs[0].remote.url == "https://github.com/k3s-io/k3s/releases/download/v1.36.4%2Bk3s1/k3s"


def test_mirror_version_and_checksum_from_environment() -> None:
    env = {
        "STRATA_MIRROR": "http://127.0.0.1:8000/k3s/",
        "STRATA_K3S_VERSION": "v1.2.3+k3s1",
        "STRATA_K3S_SHA256": SHA,
        "STRATA_K3S_AIRGAP_IMAGES": "0",
    }
    (k3s,) = layer_inputs(load_definition(environ=env))
    assert k3s.remote.url == "http://127.0.0.1:8000/k3s/v1.2.3%2Bk3s1/k3s"
    assert k3s.remote.sha256 == SHA


def test_disabled_layer_fetches_nothing(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "definitions" / "default.yaml").read_text()
    definition = tmp_path / "d.yaml"
    definition.write_text(
        text + "  k3s: {enabled: false}\n  agent: {enabled: false}\n  apps: {enabled: false}\n"
    )
    assert layer_inputs(load_definition(definition, environ={})) == []


def test_bad_checksum_setting_is_refused_by_field() -> None:
    with pytest.raises(StrataError, match="STRATA_K3S_SHA256"):
        load_definition(environ={"STRATA_K3S_SHA256": "not-a-sha"})


def test_bundle_places_inputs_and_generated_files(tmp_path: Path) -> None:
    defn = load_definition(environ={"STRATA_K3S_AIRGAP_IMAGES": "0"})
    (k3s,) = layer_inputs(defn)
    cached = tmp_path / "cached"
    cached.write_bytes(b"#!/bin/sh\n")
    bundle = make_bundle(
        defn,
        tmp_path / "bundle",
        [],
        [(LayerInput(k3s.layer, k3s.remote, k3s.dest, k3s.mode), cached)],
        {"apps": {"/usr/share/strata/apps/10-x.yaml": "kind: Pod\n"}},
    )
    binary = next(bundle.glob("layers/*-k3s/files/usr/local/bin/k3s"))
    assert binary.read_bytes() == b"#!/bin/sh\n" and binary.stat().st_mode & 0o777 == 0o755
    assert (
        next(bundle.glob("layers/*-apps/files/usr/share/strata/apps/10-x.yaml")).read_text() == "kind: Pod\n"
    )
    config = next(bundle.glob("layers/*-k3s/files/etc/rancher/k3s/config.yaml")).read_text()
    assert "container-runtime-endpoint: unix:///run/containerd/containerd.sock" in config
    assert "  - traefik\n" in config and "  - metrics-server\n" in config
    unit = next(bundle.glob("layers/*-k3s/files/usr/lib/systemd/system/k3s.service")).read_text()
    assert "ExecStart=/usr/local/bin/k3s server" in unit and "Type=notify" in unit
    agent = next(bundle.glob("layers/*-agent/files/etc/strata/agent.json")).read_text()
    assert '"port": 18088' in agent
