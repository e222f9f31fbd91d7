"""Unit tests for builder.qemu: accelerator choice (with a fake probe) and the QEMU command line.

Nothing here boots a VM.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from builder import qemu
from builder.errors import StrataError
from builder.host import OVMF_CODE, OVMF_VARS
from builder.qemu import VM, choose_accel

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
needs_ovmf = pytest.mark.skipif(
    not (OVMF_CODE.exists() and OVMF_VARS.exists()), reason="needs ovmf (OVMF_CODE_4M.fd)"
)


# --------------------------------------------------------------------------- choose_accel


def _no_kvm_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object) -> bool:
        raise AssertionError("must not be called")

    monkeypatch.setattr(qemu, "kvm_usable_device", forbidden)
    monkeypatch.setattr(qemu, "probe_kvm", forbidden)


def test_tcg_is_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_kvm_checks(monkeypatch)
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("tcg", Path("/boot/vmlinuz")) == "tcg"


def test_without_a_usable_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemu, "kvm_usable_device", lambda: False)
    monkeypatch.setattr(qemu, "probe_kvm", lambda *_: pytest.fail("no probe without /dev/kvm"))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    assert choose_accel("auto") == "tcg"
    assert choose_accel("auto", tmp_path / "vmlinuz") == "tcg"
    with pytest.raises(StrataError, match=r"verify\.accel is kvm.*/dev/kvm"):
        choose_accel("kvm")
    assert list(tmp_path.iterdir()) == []


class FakeProbe:
    def __init__(self, result: bool) -> None:
        self.result = result
        self.calls: list[tuple[Path, Path | None]] = []

    def __call__(self, kernel: Path, initrd: Path | None) -> bool:
        self.calls.append((kernel, initrd))
        return self.result


@pytest.fixture
def probe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A usable /dev/kvm, a fixed QEMU version and the cache under tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(qemu, "kvm_usable_device", lambda: True)
    monkeypatch.setattr(qemu, "qemu_version", lambda: "QEMU emulator version 9.9.9")
    monkeypatch.setenv("STRATA_CACHE", str(cache))
    return cache


def test_usable_device_and_no_kernel_trusts_the_device(
    monkeypatch: pytest.MonkeyPatch, probe_env: Path
) -> None:
    monkeypatch.setattr(qemu, "probe_kvm", lambda *_: pytest.fail("no probe without a kernel"))
    assert choose_accel("auto") == "kvm"
    assert choose_accel("kvm") == "kvm"


def test_no_kernel_follows_an_earlier_probe(
    monkeypatch: pytest.MonkeyPatch, probe_env: Path, tmp_path: Path
) -> None:
    """Without a kernel to probe with (the Packer path before its base exists), a failed probe on this
    host and QEMU still means TCG."""
    monkeypatch.setattr(qemu, "probe_kvm", FakeProbe(False))
    assert choose_accel("auto", tmp_path / "vmlinuz") == "tcg"
    monkeypatch.setattr(qemu, "probe_kvm", lambda *_: pytest.fail("the cached result is enough"))
    assert choose_accel("auto") == "tcg"


def test_failed_probe_falls_back_to_tcg_and_is_cached(
    monkeypatch: pytest.MonkeyPatch, probe_env: Path, tmp_path: Path
) -> None:
    probe = FakeProbe(False)
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    assert choose_accel("auto", kernel, initrd) == "tcg"
    assert choose_accel("auto", kernel, initrd) == "tcg"
    assert probe.calls == [(kernel, initrd)]
    cached = json.loads((probe_env / "accel-probe.json").read_text())
    assert list(cached.values()) == [False]
    [key] = cached
    assert "QEMU emulator version 9.9.9" in key
    with pytest.raises(StrataError, match=r"verify\.accel is kvm.*hang"):
        choose_accel("kvm", kernel, initrd)
    assert len(probe.calls) == 1


def test_successful_probe_uses_kvm(monkeypatch: pytest.MonkeyPatch, probe_env: Path, tmp_path: Path) -> None:
    probe = FakeProbe(True)
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    assert choose_accel("auto", tmp_path / "vmlinuz") == "kvm"
    assert choose_accel("kvm", tmp_path / "vmlinuz") == "kvm"
    assert probe.calls == [(tmp_path / "vmlinuz", None)]


def test_probe_cache_is_per_qemu_version(
    monkeypatch: pytest.MonkeyPatch, probe_env: Path, tmp_path: Path
) -> None:
    probe = FakeProbe(False)
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    assert choose_accel("auto", tmp_path / "vmlinuz") == "tcg"
    monkeypatch.setattr(qemu, "qemu_version", lambda: "QEMU emulator version 10.0.0")
    probe.result = True
    assert choose_accel("auto", tmp_path / "vmlinuz") == "kvm"
    assert len(probe.calls) == 2
    cached = json.loads((probe_env / "accel-probe.json").read_text())
    assert sorted(cached.values()) == [False, True]


def test_cached_result_is_used_without_probing(
    monkeypatch: pytest.MonkeyPatch, probe_env: Path, tmp_path: Path
) -> None:
    probe = FakeProbe(False)
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    choose_accel("auto", tmp_path / "vmlinuz")
    cache = probe_env / "accel-probe.json"
    cache.write_text(json.dumps({key: True for key in json.loads(cache.read_text())}))
    assert choose_accel("auto", tmp_path / "vmlinuz") == "kvm"
    assert len(probe.calls) == 1


# --------------------------------------------------------------------------- VM command line


@pytest.fixture
def base(tmp_path: Path) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    return path


def _info(image: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True, check=True
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def _drives(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]


def _vm(base: Path, tmp_path: Path, firmware: str, **kw: object) -> VM:
    workdir = tmp_path / "vm"
    workdir.mkdir(exist_ok=True)
    return VM(base=base, workdir=workdir, firmware=firmware, accel="tcg", ssh_port=2222, **kw)  # type: ignore[arg-type]


@needs_ovmf
def test_uefi_command(base: Path, tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"iso")
    vm = _vm(base, tmp_path, "uefi", seed_iso=seed, memory=1024, cpus=3)
    cmd = vm._command()
    assert cmd[0] == "qemu-system-x86_64"
    assert cmd[cmd.index("-machine") + 1] == "q35,accel=tcg"
    assert cmd[cmd.index("-m") + 1] == "1024"
    assert cmd[cmd.index("-smp") + 1] == "3"
    assert "-cpu" not in cmd
    assert cmd[cmd.index("-serial") + 1] == f"file:{vm.serial_log}"
    vars_copy = vm.workdir / "OVMF_VARS.fd"
    overlay = vm.workdir / "disk-uefi.qcow2"
    assert _drives(cmd) == [
        f"file={overlay},if=virtio,format=qcow2,discard=unmap",
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        f"if=pflash,format=raw,file={vars_copy}",
        f"file={seed},media=cdrom,readonly=on",
    ]
    assert vars_copy.read_bytes() == OVMF_VARS.read_bytes()
    netdev = cmd[cmd.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in netdev.split(",")
    assert netdev.startswith("user,id=net0,")
    assert "virtio-net-pci,netdev=net0" in cmd


def test_bios_command(base: Path, tmp_path: Path) -> None:
    vm = _vm(base, tmp_path, "bios", extra_drives=[tmp_path / "data.raw"])
    cmd = vm._command()
    drives = _drives(cmd)
    assert not any("pflash" in d for d in drives)
    assert not (vm.workdir / "OVMF_VARS.fd").exists()
    assert drives == [
        f"file={vm.workdir / 'disk-bios.qcow2'},if=virtio,format=qcow2,discard=unmap",
        f"file={tmp_path / 'data.raw'},if=virtio,format=raw",
    ]
    assert not any("cdrom" in d for d in drives)
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in cmd[cmd.index("-netdev") + 1]
    assert vm.serial_log.name == "serial-bios.log"


def test_overlay_is_backed_by_the_base(base: Path, tmp_path: Path) -> None:
    vm = _vm(base, tmp_path, "bios")
    vm._command()
    info = _info(vm.workdir / "disk-bios.qcow2")
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base.resolve())
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 32 << 20
    assert _info(base)["virtual-size"] == 32 << 20


def test_overlay_grows_to_disk_size_over_a_raw_base(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    raw = tmp_path / "base.raw"
    with raw.open("wb") as f:
        f.truncate(16 << 20)
    vm = _vm(raw, tmp_path, "bios", disk_size=64 << 20)
    vm._command()
    info = _info(vm.workdir / "disk-bios.qcow2")
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 64 << 20
    assert raw.stat().st_size == 16 << 20  # the base is never modified


def test_kvm_uses_the_host_cpu(base: Path, tmp_path: Path) -> None:
    vm = _vm(base, tmp_path, "bios")
    vm.accel = "kvm"
    cmd = vm._command()
    assert cmd[cmd.index("-machine") + 1] == "q35,accel=kvm"
    assert cmd[cmd.index("-cpu") + 1] == "host"


# --------------------------------------------------------------------------- small helpers


def test_free_port_is_bindable() -> None:
    port = qemu.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_serial_tail_and_stop_without_a_process(tmp_path: Path) -> None:
    vm = VM(base=tmp_path / "base.qcow2", workdir=tmp_path, firmware="bios", accel="tcg", ssh_port=1)
    assert vm.serial_tail() == "(no serial output)"
    vm.serial_log.write_text("".join(f"line {n}\n" for n in range(40)))
    assert vm.serial_tail(3) == "line 37\nline 38\nline 39"
    assert not vm.alive()
    vm.stop()
    assert vm.proc is None
