"""Booting images under QEMU: KVM where it works, TCG otherwise; SSH forwarded to a local port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StrataError
from .host import OVMF_CODE, OVMF_VARS, require_file
from .log import info
from .rootfs import cache_root

PROBE_MARK = b"Linux version"
PROBE_SECONDS = 15


def kvm_usable_device() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def probe_kvm(kernel: Path, initrd: Path | None) -> bool:
    """Boot `kernel` under KVM for a few seconds: does it get as far as printing its banner?

    On some hosts /dev/kvm exists but guests hang in early boot; this catches that.
    """
    with tempfile.TemporaryDirectory(prefix="strata-kvm-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        cmd = [
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=kvm",
            "-m",
            "512",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
            "-serial",
            f"file:{log}",
        ]
        if initrd:
            cmd += ["-initrd", str(initrd)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and PROBE_MARK in log.read_bytes():
                    return True
                time.sleep(0.25)
            return log.exists() and PROBE_MARK in log.read_bytes()
        finally:
            proc.kill()
            proc.wait()


def choose_accel(requested: str, kernel: Path | None = None, initrd: Path | None = None) -> str:
    """'kvm' or 'tcg' for `requested` (auto, kvm, tcg); the probe result is cached per host and QEMU."""
    if requested == "tcg":
        return "tcg"
    if not kvm_usable_device():
        if requested == "kvm":
            raise StrataError("verify.accel is kvm but /dev/kvm is missing or not writable; use auto or tcg")
        info("/dev/kvm not usable: using TCG (software emulation)")
        return "tcg"
    cache = cache_root() / "accel-probe.json"
    key = f"{os.uname().release} {qemu_version()}"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if kernel is None and key not in known:
        return "kvm"  # no kernel to probe with, and no earlier probe on this host
    if key not in known:
        assert kernel is not None
        known[key] = probe_kvm(kernel, initrd)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    if known[key]:
        return "kvm"
    if requested == "kvm":
        raise StrataError(
            "verify.accel is kvm but KVM guests hang in early boot on this host; use auto or tcg"
        )
    info("KVM guests do not boot on this host (probe): using TCG (software emulation)")
    return "tcg"


def accel_for_tree(requested: str, tree: Path | None) -> str:
    """choose_accel, probing with the kernel and initrd of a root filesystem `tree` when it has them."""
    kernel = tree / "vmlinuz" if tree else None
    if kernel is None or not kernel.exists():
        return choose_accel(requested)
    initrd = kernel.with_name("initrd.img")
    return choose_accel(requested, kernel.resolve(), initrd.resolve() if initrd.exists() else None)


def image_info(image: Path) -> dict[str, Any]:
    """`qemu-img info` of a disk image: format, virtual-size..."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise StrataError(f"qemu-img info {image} failed: {out.stderr.strip()}")
    return dict(json.loads(out.stdout))


def ssh_keypair(key: Path, comment: str, fresh: bool = False) -> str:
    """An Ed25519 key without passphrase at `key` (made when missing, or anew when `fresh`); returns
    the public key line."""
    if fresh:
        key.unlink(missing_ok=True)
        key.with_name(f"{key.name}.pub").unlink(missing_ok=True)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True
        )
    return key.with_name(f"{key.name}.pub").read_text().strip()


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never the same twice in this process (VMs start in parallel)."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ports_given:
                _ports_given.add(port)
                return port


@dataclass
class VM:
    """A throwaway VM: a copy-on-write overlay over `base`, so the artifact is never modified."""

    base: Path
    workdir: Path
    firmware: str  # uefi | bios
    accel: str
    memory: int = 2048
    cpus: int = 2
    disk_size: int | None = None  # grow the overlay to this many bytes
    seed_iso: Path | None = None
    cdroms: list[Path] = field(default_factory=list)  # attached before the seed, e.g. an installer ISO
    extra_drives: list[Path] = field(default_factory=list)
    forward: tuple[int, ...] = ()  # guest TCP ports forwarded to free host ports (see `ports`)
    ssh_port: int = field(default_factory=free_port)
    ports: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"serial-{self.firmware}.log"

    def _command(self) -> list[str]:
        overlay = self.workdir / f"disk-{self.firmware}.qcow2"
        fmt = "raw" if self.base.suffix == ".raw" else "qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(self.base.resolve()),
                "-F",
                fmt,
                str(overlay),
            ],
            check=True,
        )
        if self.disk_size:
            subprocess.run(["qemu-img", "resize", "-q", str(overlay), str(self.disk_size)], check=True)
        machine = f"q35,accel={self.accel}"
        cmd = [
            "qemu-system-x86_64",
            "-machine",
            machine,
            "-m",
            str(self.memory),
            "-smp",
            str(self.cpus),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.serial_log}",
            "-drive",
            f"file={overlay},if=virtio,format=qcow2,discard=unmap",
            "-netdev",
            ",".join(
                [f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]
                + [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()]
            ),
            "-device",
            "virtio-net-pci,netdev=net0",
            "-device",
            "virtio-rng-pci",
        ]
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        if self.firmware == "uefi":
            require_file(OVMF_CODE, "ovmf")
            vars_copy = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += [
                "-drive",
                f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive",
                f"if=pflash,format=raw,file={vars_copy}",
            ]
        for cdrom in [*self.cdroms, *([self.seed_iso] if self.seed_iso else [])]:
            cmd += ["-drive", f"file={cdrom},media=cdrom,readonly=on"]
        for drive in self.extra_drives:
            cmd += ["-drive", f"file={drive},if=virtio,format=raw"]
        return cmd

    def start(self) -> VM:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {guest: free_port() for guest in self.forward}
        cmd = self._command()
        info(f"booting {self.base.name} ({self.firmware}, {self.accel}), ssh on 127.0.0.1:{self.ssh_port}")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=(self.workdir / "qemu.log").open("wb")
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serial_tail(self, lines: int = 25) -> str:
        if not self.serial_log.exists():
            return "(no serial output)"
        text = self.serial_log.read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
