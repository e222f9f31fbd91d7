"""End to end: build the default image, verify it booted on UEFI and BIOS, check its outputs.

K3s comes from a local mirror holding the TEST STAND-IN (tests/standins), since release binaries cannot
be downloaded here; everything else is the default definition. This needs root, the network to the
Debian mirror (or a warm cache) and about twenty minutes under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from builder import ROOT
from builder.artifacts import artifacts_root
from tests.standins.mirror import standin_mirror

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root"),
]
NAME = "strata"


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def k3s_env() -> Any:
    """The build environment for the local mirror with the K3s stand-in."""
    with standin_mirror() as env:
        yield env


def build_shown(request: pytest.FixtureRequest, env: dict[str, str], *args: str) -> int:
    """`invoke build ARGS` with its step log shown live (it belongs in the CI log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return invoke("build", *args, env=env).returncode


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, k3s_env: dict[str, str]) -> Path:
    """A fresh build of the default definition, verified (chroot, then booted on UEFI and on BIOS)."""
    assert build_shown(request, k3s_env) == 0, (
        "invoke build (with its booted verification) failed; see the log above"
    )
    return artifacts_root() / NAME


def test_outputs_present(built: Path) -> None:
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(
        [f"{NAME}.raw", f"{NAME}.qcow2", f"{NAME}.iso", "SHA256SUMS", "manifest.json", "packages.txt"]
    )


def test_checksums_match(built: Path) -> None:
    out = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=built, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == 5


def test_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["definition"]["name"] == NAME
    assert [layer["name"] for layer in manifest["layers"]] == ["os", "containerd", "k3s", "agent", "apps"]
    assert all(len(layer["sha256"]) == 64 for layer in manifest["layers"])
    assert set(manifest["phases"]) >= {"download", "prepare", "assemble"}
    assert manifest["versions"]["containerd"]
    assert [i["ref"] for i in manifest["images"]] == [
        "localhost/strata/pause:3.10",
        "localhost/strata/busybox:1.37",
        "localhost/strata/hello:2.10",
    ]


def test_qcow2_is_compressed_and_valid(built: Path) -> None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(built / f"{NAME}.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == (built / f"{NAME}.raw").stat().st_size
    assert (built / f"{NAME}.qcow2").stat().st_size < (built / f"{NAME}.raw").stat().st_blocks * 512
    check = subprocess.run(
        ["qemu-img", "check", str(built / f"{NAME}.qcow2")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout


def test_package_list(built: Path) -> None:
    rows = [line.split("\t") for line in (built / "packages.txt").read_text().splitlines()]
    names = {row[0] for row in rows}
    assert {"containerd", "openssh-server", "chrony", "gcc", "net-tools", "cloud-init"} <= names
    assert all(len(row) == 3 and row[1] for row in rows)


def test_disk_boots_both_ways(built: Path) -> None:
    """The partition table has a BIOS boot partition and an ESP, and the MBR carries GRUB's boot code."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(built / f"{NAME}.raw")], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    types = [p["type"] for p in table["partitions"]]
    assert table["label"] == "gpt"
    assert types[:2] == ["21686148-6449-6E6F-744E-656564454649", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"]
    mbr = (built / f"{NAME}.raw").read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa" and b"GRUB" in mbr


def test_iso_boots_bios_and_uefi_from_cd_and_stick(built: Path) -> None:
    """The boot catalog has a BIOS and a UEFI entry; the system area is GRUB's hybrid MBR with an
    active whole-disk entry and an EFI partition over the FAT image, as xorriso reports it."""
    iso = built / f"{NAME}.iso"
    report = subprocess.run(
        ["xorriso", "-indev", str(iso), "-report_el_torito", "plain", "-report_system_area", "plain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = [line.split() for line in report.splitlines() if line.startswith("El Torito boot img :")]
    # "El Torito boot img :   1  BIOS  y   none  0x0000  0x00      4        2089"
    assert [tuple(e[6:9]) for e in entries] == [("BIOS", "y", "none"), ("UEFI", "y", "none")]
    assert "grub2-boot-info" in report and "MBR grub2-mbr" in report
    assert "/boot/grub/efi.img" in report and "/boot/grub/eltorito.img" in report
    mbr = iso.read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa"
    assert (mbr[0x1BE], mbr[0x1C2]) == (0x80, 0x00) and mbr[0x1D2] == 0xEF
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(iso)], capture_output=True, text=True)
    assert label.stdout.strip() == "STRATA_STRATA"
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["artifacts"][f"{NAME}.iso"]["size"] == iso.stat().st_size


def test_killed_assemble_leaves_no_final_files(built: Path, tmp_path: Path) -> None:
    """SIGKILL at several moments of assemble: the final folder never holds a partial set."""
    kill_name = "strata-killtest"
    definition = tmp_path / "kill.yaml"
    definition.write_text(
        (ROOT / "definitions" / "default.yaml").read_text().replace("name: strata", f"name: {kill_name}")
    )
    work, final = artifacts_root() / ".work", artifacts_root() / kill_name
    shutil.rmtree(work / kill_name, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    # cp -a, not shutil.copytree: the tree holds device nodes (/dev/zero...) that must not be read
    subprocess.run(["cp", "-a", str(work / NAME), str(work / kill_name)], check=True)
    # the prepared tree is the default's; record it as prepared for this definition
    from builder.definition import load_definition

    state_file = work / kill_name / "state.json"
    state = json.loads(state_file.read_text())
    state["definition_digest"] = load_definition(definition).tree_digest()
    state_file.write_text(json.dumps(state))
    try:
        for delay in (1, 4, 10, 20, 35):
            proc = subprocess.Popen(
                [sys.executable, "-m", "invoke", "assemble", "--definition", str(definition)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if finished:
                break
            assert not final.exists(), f"killed after {delay}s, yet {final} exists"
        assert invoke("assemble", "--definition", str(definition)).returncode == 0
        assert (
            subprocess.run(["sha256sum", "--check", "SHA256SUMS"], cwd=final, capture_output=True).returncode
            == 0
        )
        assert not list(final.parent.glob(f".{kill_name}.*")), "staging folders left behind"
    finally:
        shutil.rmtree(work / kill_name, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)


def test_bookworm_builds_and_boots(request: pytest.FixtureRequest, k3s_env: dict[str, str]) -> None:
    """Debian 12 is supported: the same layers build, and the image passes the suite booted on UEFI."""
    assert build_shown(request, k3s_env, "--definition", str(ROOT / "definitions" / "bookworm.yaml")) == 0
    manifest = json.loads((artifacts_root() / "strata-bookworm" / "manifest.json").read_text())
    assert manifest["versions"]["debian"] == "bookworm"
    assert manifest["versions"]["systemd"].startswith("252.")


def test_two_machines_from_one_image_differ(built: Path) -> None:
    """The UEFI and BIOS verify boots are two VMs from the same qcow2, activated from seeds with the
    same content: each made its own machine-id, SSH host key, K3s token and node name."""
    verify_dir = artifacts_root() / ".work" / NAME / "verify"
    first, second = (json.loads((verify_dir / fw / "identity.json").read_text()) for fw in ("uefi", "bios"))
    for key in ("machine_id", "ssh_host_key", "k3s_token_sha256", "node_name"):
        assert first[key] and second[key] and first[key] != second[key], key
    empty_token = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert empty_token not in (first["k3s_token_sha256"], second["k3s_token_sha256"])
    assert first["node_name"].startswith("strata-") and second["node_name"].startswith("strata-")
