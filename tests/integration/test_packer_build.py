"""End to end, the Packer path: `invoke packer.build` on strata's own base qcow2 (built by the chroot path
from the default definition with only the os layer), then `invoke verify --image` on its output: the
same testinfra suite as the chroot bake, on the image's root filesystem and booted (UEFI; the build VM
booted it on SeaBIOS).

K3s comes from the local mirror holding the TEST STAND-IN (tests/standins), as in test_image.py. This
needs root, packer, the Debian mirror and about ten minutes under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from builder import ROOT
from builder.artifacts import artifacts_root
from tests.standins.mirror import standin_mirror

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root"),
    pytest.mark.skipif(shutil.which("packer") is None, reason="needs packer (apt-get install packer)"),
]
NAME = "strata-packer"
FIRMWARE = "uefi"


def invoke_shown(request: pytest.FixtureRequest, env: dict[str, str], *args: str) -> int:
    """`invoke ARGS` with its log shown live (it belongs in the CI log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return subprocess.run(
            [sys.executable, "-m", "invoke", *args], cwd=ROOT, env={**os.environ, **env}, check=False
        ).returncode


@pytest.fixture(scope="module")
def packer_built(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh Packer build of the default definition, then its verification; with the time each took."""
    times: dict[str, Any] = {}
    shutil.rmtree(artifacts_root() / ".work" / NAME / "verify", ignore_errors=True)  # no stale results
    with standin_mirror() as env:
        start = time.monotonic()
        assert invoke_shown(request, env, "packer.build", "--skip-verify") == 0, (
            "packer.build failed; see above"
        )
        times["build"] = time.monotonic() - start
        image = artifacts_root() / NAME / f"{NAME}.qcow2"
        start = time.monotonic()
        code = invoke_shown(request, env, "verify", "--image", str(image), "--firmware", FIRMWARE)
        times["verify"] = time.monotonic() - start
    times["verified"] = code == 0
    print(f"\npacker.build: {times['build']:.0f}s, verify --image ({FIRMWARE}): {times['verify']:.0f}s")
    return times


@pytest.fixture(scope="module")
def out(packer_built: dict[str, Any]) -> Path:
    return artifacts_root() / NAME


def test_verify_accepts_the_packer_image(packer_built: dict[str, Any]) -> None:
    assert packer_built["verified"], "invoke verify --image failed on the Packer-baked qcow2; see above"


def junit(path: Path) -> dict[str, str]:
    """'module::test[params]' -> passed | skipped | failed, from the suite's junit.xml."""
    results = {}
    for case in ET.parse(path).iter("testcase"):
        state = "passed"
        if case.find("skipped") is not None:
            state = "skipped"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        results[f"{case.get('classname')}::{case.get('name')}"] = state
    return results


@pytest.mark.parametrize("mode", ["offline", FIRMWARE])
def test_the_image_suite_passed(packer_built: dict[str, Any], mode: str) -> None:
    """The suite the chroot bake passes (tests/image), in full, on the root filesystem and booted."""
    results = junit(artifacts_root() / ".work" / NAME / "verify" / mode / "junit.xml")
    suites = {name.split("::")[0].rsplit(".", 1)[-1] for name in results}  # e.g. test_os
    assert {"test_os", "test_containerd", "test_k3s", "test_agent"} <= suites
    assert "failed" not in results.values()
    passed = [name for name, state in results.items() if state == "passed"]
    assert len(passed) >= (30 if mode == "offline" else 50), results
    if mode != "offline":
        assert any("test_ready_and_status_api" in name for name in passed)
        assert any("test_identity_made_on_this_boot" in name for name in passed)
    else:
        assert any("test_no_per_machine_secret_in_image" in name for name in passed)


def test_outputs_like_the_chroot_path(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{NAME}.raw", f"{NAME}.qcow2", "SHA256SUMS", "manifest.json", "packages.txt"])
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == 4, check.stdout + check.stderr
    assert not list(out.parent.glob(f".{NAME}.*")), "staging folders left behind"


def test_manifest_records_the_backend_and_base(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "packer" and manifest["name"] == "strata"
    assert manifest["base"]["strata"] is True and manifest["base"]["checksum"].startswith("sha256:")
    assert [layer["name"] for layer in manifest["layers"]] == ["os", "containerd", "k3s", "agent", "apps"]
    assert set(manifest["phases"]) == {"base", "bundle", "packer", "outputs"}
    assert [i["ref"] for i in manifest["images"]] == [
        "localhost/strata/pause:3.10",
        "localhost/strata/busybox:1.37",
        "localhost/strata/hello:2.10",
    ]
    assert manifest["versions"]["containerd"] and manifest["disk"]["firmware"] == ["uefi", "bios"]


def test_packages_installed_in_the_vm(out: Path) -> None:
    """The layers' packages the os-only base lacked were installed by the bundle's runner in the VM."""
    names = {line.split("\t")[0] for line in (out / "packages.txt").read_text().splitlines()}
    assert {"containerd", "runc", "iptables", "openssh-server", "cloud-init", "python3-yaml"} <= names
    base = {
        line.split("\t")[0]
        for line in (artifacts_root() / "strata-packer-base" / "packages.txt").read_text().splitlines()
    }
    assert "containerd" not in base


def test_build_vm_left_nothing_behind(out: Path, tmp_path: Path) -> None:
    """No build key, bundle, journal, network file, default user or random seed from the build VM."""
    from builder.imagefs import mounted_root

    with mounted_root(out / f"{NAME}.qcow2", tmp_path) as root:
        assert (
            not (root / "var/lib/strata/bake").exists()
            and not (root / "var/lib/strata/packages.txt").exists()
        )
        assert not list((root / "root").glob(".ssh/authorized_keys"))
        assert not list((root / "var/log/journal").iterdir())
        assert not list((root / "etc/systemd/network").glob("10-cloud-init-*"))
        assert not list((root / "home").iterdir())
        assert not (root / "var/lib/systemd/random-seed").exists()
        assert (root / "etc/machine-id").read_text().strip() in ("", "uninitialized")
        assert not list((root / "etc/ssh").glob("ssh_host_*"))
        logs = [p for p in (root / "var/log").rglob("*") if not p.is_symlink() and p.is_file()]
        assert logs and [p for p in logs if p.stat().st_size] == []
    assert not (tmp_path / "image.raw").exists()
