"""The ISO's installer (templates/iso/strata-install) run on this host against a fake /sys and /dev:
disk choice, refusals (boot medium, too small, not empty without force), writing and verifying."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from builder import TEMPLATES_DIR

INSTALLER = TEMPLATES_DIR / "iso" / "strata-install"
GiB = 1 << 30
IMAGE_BYTES = 3 * (1 << 20) + 4096  # not a whole number of chunks


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Path]:
    """Disks: vda 8 GiB empty, vdb 16 GiB with a partition, sda 32 GiB empty (the boot stick),
    nvme0n1 1 GiB-ish too small... plus sr0 and loop0, which are never disks to install to."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    disks = {"vda": 8 * GiB, "vdb": 16 * GiB, "sda": 32 * GiB, "nvme0n1": 2 << 20, "sr0": GiB, "loop0": GiB}
    for name, size in disks.items():
        block = sysfs / "block" / name
        (block / "device").mkdir(parents=True)
        (block / "size").write_text(f"{size // 512}\n")
        (block / "device" / "model").write_text(f"Model {name}   \n")
        (dev / name).parent.mkdir(parents=True, exist_ok=True)
        with (dev / name).open("wb") as f:
            f.truncate(8 << 20)
    (sysfs / "block" / "vdb" / "vdb1").mkdir()
    (sysfs / "block" / "vdb" / "vdb1" / "partition").write_text("1\n")
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "disk" / "by-id" / "virtio-serial-A").symlink_to(dev / "vda")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    return {"sys": sysfs, "dev": dev, "image": image, "tmp": tmp_path}


def installer(
    m: dict[str, Path], *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ["PATH"],
        "STRATA_SYSFS": str(m["sys"]),
        "STRATA_DEV": str(m["dev"]),
        "STRATA_IMAGE": str(m["image"]),
        "STRATA_IMAGE_BYTES": str(IMAGE_BYTES),
        "STRATA_IMAGE_SHA256": hashlib.sha256(m["image"].read_bytes()).hexdigest(),
        "STRATA_INSTALL_LOG": str(m["tmp"] / "install.log"),
        "STRATA_BOOT_DISK": "sda",
        "STRATA_CMDLINE": str(m["tmp"] / "cmdline"),
    }
    if not (m["tmp"] / "cmdline").exists():
        (m["tmp"] / "cmdline").write_text("quiet\n")
    return subprocess.run(
        ["sh", str(INSTALLER), *args], env={**base, **env}, input=stdin, capture_output=True, text=True
    )


def test_lists_disks_never_cdrom_or_loop(machine: dict[str, Path]) -> None:
    out = installer(machine, "disks")
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert sorted(names) == ["nvme0n1", "sda", "vda", "vdb"]
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "8.0 GiB" in rows["vda"] and "Model vda" in rows["vda"] and "not offered" not in rows["vda"]
    assert "not offered: it is the boot medium" in rows["sda"]
    assert "too small" in rows["nvme0n1"]


def test_largest_empty_skips_boot_medium_and_partitioned(machine: dict[str, Path]) -> None:
    out = installer(machine, "choose", "largest-empty")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vda"  # sda is bigger but is the boot medium; vdb has a partition


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        pytest.param(("/dev/sda", "1"), ["refusing sda: it is the boot medium"], id="boot-medium-forced"),
        pytest.param(
            ("nvme0n1", "1"),
            ["refusing nvme0n1: it is too small (2.0 MiB; the image needs 3.0 MiB)"],
            id="too-small",
        ),
        pytest.param(("/dev/nope",), ["target /dev/nope is not a disk here", "vda"], id="unknown"),
    ],
)
def test_choose_refuses(machine: dict[str, Path], args: tuple[str, ...], messages: list[str]) -> None:
    out = installer(machine, "choose", *args)
    assert out.returncode == 1
    for message in messages:
        assert message in out.stderr


def test_refuses_a_partitioned_disk_unless_forced(machine: dict[str, Path]) -> None:
    refused = installer(machine, "choose", "vdb")
    assert refused.returncode == 1
    assert "refusing vdb: it is not empty (it holds partitions); set strata.install.force=1" in refused.stderr
    assert installer(machine, "choose", "vdb", "1").stdout.strip() == "vdb"


def test_refuses_a_disk_holding_a_partition_table_the_kernel_has_not_read(machine: dict[str, Path]) -> None:
    subprocess.run(
        ["sfdisk", "-q", str(machine["dev"] / "vda")], input="label: gpt\n,1M\n", text=True, check=True
    )
    out = installer(machine, "choose", "vda")
    assert out.returncode == 1 and "it holds gpt" in out.stderr


def test_by_id_names_resolve(machine: dict[str, Path]) -> None:
    assert installer(machine, "choose", "virtio-serial-A").stdout.strip() == "vda"
    by_path = installer(machine, "choose", str(machine["dev"] / "disk" / "by-id" / "virtio-serial-A"))
    assert by_path.stdout.strip() == "vda"


def test_no_empty_disk_says_why_for_each(machine: dict[str, Path]) -> None:
    out = installer(machine, "choose", "largest-empty", STRATA_IMAGE_BYTES=str(20 * GiB))
    assert out.returncode == 1
    assert "no empty disk large enough" in out.stderr
    assert "vda: it is too small" in out.stderr and "sda: it is the boot medium" in out.stderr


def test_unattended_install_writes_and_verifies(machine: dict[str, Path]) -> None:
    (machine["tmp"] / "cmdline").write_text("boot=strata strata.install.target=largest-empty\n")
    out = installer(machine, "run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vda"
    written = (machine["dev"] / "vda").read_bytes()[:IMAGE_BYTES]
    assert written == machine["image"].read_bytes()
    log = (machine["tmp"] / "install.log").read_text()
    assert "unattended: target largest-empty" in log and "verified: sha256" in log
    assert "written 100%" in out.stderr


def test_verification_failure_is_reported(machine: dict[str, Path]) -> None:
    (machine["tmp"] / "cmdline").write_text("strata.install.target=vda\n")
    out = installer(machine, "run", STRATA_IMAGE_SHA256="0" * 64)
    assert out.returncode == 1
    assert "FAILED: verification failed on /dev/vda" in out.stderr
    assert "FAILED: verification failed" in (machine["tmp"] / "install.log").read_text()


def test_seed_file_drives_unattended_install(machine: dict[str, Path]) -> None:
    seed = machine["tmp"] / "strata-install.conf"
    seed.write_text("target=vdb\nforce=1\n")
    out = installer(machine, "run", SEED_CONF=str(seed))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vdb"


def test_interactive_needs_the_name_typed_twice(machine: dict[str, Path]) -> None:
    out = installer(machine, "run", stdin="sda\nvdb\nvda\nvdb\nvdb\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vdb"
    assert "Not sda: it is the boot medium." in out.stderr
    assert "Names differ; nothing written." in out.stderr
    assert (machine["dev"] / "vda").read_bytes()[:16] == bytes(16), "the unconfirmed disk is untouched"


def test_interactive_quit_writes_nothing(machine: dict[str, Path]) -> None:
    out = installer(machine, "run", stdin="q\n")
    assert out.returncode == 1 and "cancelled by the user" in out.stderr
