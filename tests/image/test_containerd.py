"""The containerd layer: configuration and the preloaded images, usable with no registry."""

from __future__ import annotations

from typing import Any

import pytest


def test_config_uses_systemd_cgroups_and_preloaded_sandbox(host: Any, ctx: dict[str, Any]) -> None:
    config = host.file("/etc/containerd/config.toml").content_string
    assert "SystemdCgroup = true" in config
    assert f'sandbox_image = "{ctx["sandbox_image"]}"' in config


def test_preloaded_list_matches_definition(host: Any, ctx: dict[str, Any]) -> None:
    listed = host.file("/usr/share/strata/preloaded-images").content_string.split()
    assert listed == ctx["images"]


def test_images_in_content_store(host: Any) -> None:
    blobs = host.run("ls /var/lib/containerd/io.containerd.content.v1.content/blobs/sha256 | wc -l")
    assert int(blobs.stdout) > 0


@pytest.mark.booted
def test_every_image_listed_by_containerd(host: Any, ctx: dict[str, Any]) -> None:
    listed = set(host.check_output("ctr -n k8s.io images ls -q").split())
    assert set(ctx["images"]) <= listed


@pytest.mark.booted
def test_image_runs_offline(host: Any, ctx: dict[str, Any]) -> None:
    hello = next((ref for ref in ctx["images"] if "/hello:" in ref), None)
    if hello is None:
        pytest.skip("the definition preloads no hello image")
    out = host.run(f"ctr -n k8s.io run --rm {hello} strata-verify-hello")
    assert out.rc == 0, out.stderr
    assert "Hello, world!" in out.stdout


@pytest.mark.booted
def test_nothing_pulled_at_boot(host: Any) -> None:
    log = host.run("journalctl -b -u containerd --no-pager").stdout
    assert "PullImage" not in log
