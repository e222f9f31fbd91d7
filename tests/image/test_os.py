"""The OS layer: base services, tools, console, cloud-init, per-machine identity and root growth."""

from __future__ import annotations

import re
from typing import Any

import pytest

PACKAGES = [
    "openssh-server",
    "chrony",
    "gcc",
    "net-tools",
    "cloud-init",
    "systemd-resolved",
    "linux-image-amd64",
    "containerd",
    "runc",
]
ENABLED = [
    "ssh",
    "chrony",
    "systemd-resolved",
    "systemd-networkd",
    "strata-growroot",
    "strata-ssh-keygen",
    "serial-getty@ttyS0",
    "cloud-init-local",
    "cloud-final",
    "containerd",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_installed(host: Any, name: str) -> None:
    assert host.package(name).is_installed


@pytest.mark.parametrize("unit", ENABLED)
def test_unit_enabled(host: Any, unit: str) -> None:
    assert host.run(f"systemctl is-enabled {unit}.service").stdout.strip() == "enabled"


def test_net_tools_and_gcc_present(host: Any) -> None:
    for tool in ("ifconfig", "netstat", "route", "gcc", "make"):
        assert host.exists(tool), tool
    assert host.run("gcc --version").rc == 0


def test_dns_via_resolved(host: Any) -> None:
    assert host.check_output("readlink /etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"


def test_security_updates_source(host: Any, ctx: dict[str, Any]) -> None:
    sources = host.file("/etc/apt/sources.list.d/debian.sources").content_string
    assert ctx["security_mirror"] in sources and "-security" in sources


def test_cloud_init_datasources(host: Any) -> None:
    cfg = host.file("/etc/cloud/cloud.cfg.d/90-strata.cfg").content_string
    for source in ("NoCloud", "ConfigDrive", "Ec2", "GCE", "Azure", "OpenStack"):
        assert source in cfg


def test_serial_and_vga_console(host: Any) -> None:
    grub = host.file("/boot/grub/grub.cfg").content_string
    assert "console=tty0" in grub and "console=ttyS0,115200n8" in grub


def test_no_per_machine_secret_in_image(host: Any, ctx: dict[str, Any]) -> None:
    if ctx["mode"] != "offline":
        pytest.skip("the booted machine has made its own")
    assert host.run("ls /etc/ssh/ | grep ssh_host_ || true").stdout.strip() == ""
    assert host.file("/etc/machine-id").content_string.strip() in ("", "uninitialized")
    assert not host.file("/var/lib/dbus/machine-id").exists
    assert not host.file("/var/lib/systemd/random-seed").exists
    assert host.run("ls -A /var/lib/cloud 2>/dev/null").stdout.strip() == ""


@pytest.mark.booted
@pytest.mark.parametrize("unit", ["ssh", "chrony", "containerd", "systemd-resolved", "systemd-networkd"])
def test_service_active(host: Any, unit: str) -> None:
    assert host.service(unit).is_running


@pytest.mark.booted
def test_boot_finished_without_failed_units(host: Any) -> None:
    host.run("systemctl is-system-running --wait")
    failed = host.run("systemctl list-units --failed --plain --no-legend").stdout.strip()
    assert failed == ""


@pytest.mark.booted
def test_name_resolution_configured(host: Any, ctx: dict[str, Any]) -> None:
    status = host.run("resolvectl status").stdout
    assert re.search(r"DNS Servers?: \S+", status), status
    assert host.run("getent hosts localhost").rc == 0
    assert host.run(f"getent hosts {ctx['hostname']}").rc == 0


@pytest.mark.booted
def test_hostname_from_seed(host: Any, ctx: dict[str, Any]) -> None:
    assert host.run("hostname").stdout.strip() == ctx["hostname"]


@pytest.mark.booted
def test_gcc_compiles_and_runs(host: Any) -> None:
    cmd = "cd $(mktemp -d) && printf 'int main(){return 42;}' > t.c && gcc -o t t.c && ./t"
    assert host.run(cmd).rc == 42


def _boot_time(host: Any) -> int:
    stat = host.file("/proc/stat").content_string
    return int(re.search(r"^btime (\d+)", stat, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.booted
def test_identity_made_on_this_boot(host: Any) -> None:
    booted_at = _boot_time(host)
    machine_id = host.file("/etc/machine-id")
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id.content_string.strip())
    assert machine_id.mtime.timestamp() >= booted_at - 2
    for kind in ("ed25519", "ecdsa", "rsa"):
        key = host.file(f"/etc/ssh/ssh_host_{kind}_key")
        assert key.exists, kind
        assert key.mtime.timestamp() >= booted_at - 2, kind


@pytest.mark.booted
def test_instance_from_seed(host: Any, ctx: dict[str, Any]) -> None:
    assert host.run("cloud-init query instance_id").stdout.strip() == ctx["instance_id"]


@pytest.mark.booted
def test_root_fills_disk(host: Any, ctx: dict[str, Any]) -> None:
    src = host.run("findmnt -no SOURCE /").stdout.strip()
    disk = "/dev/" + host.run(f"lsblk -no PKNAME {src}").stdout.strip()
    disk_bytes = int(host.run(f"blockdev --getsize64 {disk}").stdout)
    assert disk_bytes == ctx["disk_size"]
    fs_bytes = int(host.run("df -B1 --output=size / | tail -1").stdout)
    assert fs_bytes > 0.93 * disk_bytes, (fs_bytes, disk_bytes)


@pytest.mark.booted
def test_booted_on_expected_firmware(host: Any, ctx: dict[str, Any]) -> None:
    assert host.file("/sys/firmware/efi").exists == (ctx["firmware"] == "uefi")
