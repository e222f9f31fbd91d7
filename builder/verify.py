"""Phase 4: the testinfra suite (tests/image) on the baked tree via chroot, then on booted VMs over SSH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import ROOT, build, host
from .definition import Definition
from .errors import StrataError
from .log import info, step
from .qemu import VM, choose_accel
from .seed import Seed, write_seed_iso

SUITE = ROOT / "tests" / "image"
GROW_BY = 2 << 30  # the test disk is this much larger than the image, to prove the root grows


def _context(defn: Definition, mode: str, **extra: Any) -> dict[str, Any]:
    """What the suite checks the image against (tests/image reads it from STRATA_VERIFY_CONTEXT)."""
    specs = build.image_specs(defn)
    return {
        "mode": mode,
        "hostname": defn.data["os"]["hostname"],
        "images": [s.ref for s in specs],
        "sandbox_image": next((s.ref for s in specs if s.sandbox), None),
        "security_mirror": defn.data["os"]["security_mirror"],
        **extra,
    }


def run_suite(target: list[str], context: dict[str, Any], workdir: Path) -> None:
    """Run tests/image against `target` (testinfra's --hosts/--connection arguments)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx_file = workdir / "context.json"
    ctx_file.write_text(json.dumps(context, indent=2))
    junit = workdir / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(SUITE),
        *target,
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
        f"--junitxml={junit}",
    ]
    env = {**os.environ, "STRATA_VERIFY_CONTEXT": str(ctx_file)}
    if subprocess.call(cmd, cwd=ROOT, env=env) != 0:
        raise StrataError(f"image verification failed ({' '.join(target)}); see the test output above")


def wait_ssh(vm: VM, ssh_config: Path, timeout: float) -> float:
    """Seconds from power-on until SSH answers; raises with the serial console tail if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not vm.alive():
            raise StrataError(f"the VM exited before SSH came up; serial console:\n{vm.serial_tail()}")
        probe = subprocess.run(
            ["ssh", "-F", str(ssh_config), "-p", str(vm.ssh_port), "root@127.0.0.1", "true"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return time.monotonic() - vm.started
        time.sleep(2)
    raise StrataError(f"no SSH after {timeout:.0f}s ({vm.firmware}); serial console:\n{vm.serial_tail()}")


def make_ssh_key(workdir: Path) -> tuple[Path, Path]:
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "strata-verify", "-f", str(key)], check=True
        )
    config = workdir / "ssh_config"
    config.write_text(
        "Host *\n"
        f"  IdentityFile {key}\n  IdentitiesOnly yes\n  User root\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        "  ConnectTimeout 10\n  BatchMode yes\n"
        "  ControlMaster auto\n  ControlPath /tmp/strata-ssh-%C\n  ControlPersist 60\n"
    )
    return key, config


def boot_image(defn: Definition) -> Path:
    out = build.output_dir(defn)
    name = defn.data["name"]
    for candidate in (out / f"{name}.qcow2", out / f"{name}.raw"):
        if candidate.exists():
            return candidate
    raise StrataError(f"no disk image in {out}: run `invoke build` (or `invoke assemble`) first")


def virtual_size(image: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout)["virtual-size"])


def boot_and_test(defn: Definition, image: Path, firmware: str, accel: str, workdir: Path) -> float:
    """Boot `image` on `firmware` with a fresh seed, run the suite over SSH; returns boot-to-SSH seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    key, ssh_config = make_ssh_key(workdir)
    seed = Seed(
        hostname=defn.data["os"]["hostname"], ssh_authorized_keys=[Path(f"{key}.pub").read_text().strip()]
    )
    seed_iso = write_seed_iso(seed, workdir / "seed.iso")
    vcfg = defn.data["verify"]
    vm = VM(
        base=image,
        workdir=workdir,
        firmware=firmware,
        accel=accel,
        memory=vcfg["memory"],
        cpus=vcfg["cpus"],
        disk_size=virtual_size(image) + GROW_BY,
        seed_iso=seed_iso,
    )
    with vm:
        with step(f"boot {firmware} until SSH answers"):
            seconds = wait_ssh(vm, ssh_config, vcfg["boot_timeout"])
        info(f"boot to SSH ({firmware}, {accel}): {seconds:.1f}s")
        with step(f"testinfra over SSH ({firmware})"):
            context = _context(
                defn,
                "booted",
                firmware=firmware,
                instance_id=seed.instance_id,
                disk_size=vm.disk_size,
            )
            run_suite(
                [f"--hosts=ssh://root@127.0.0.1:{vm.ssh_port}", f"--ssh-config={ssh_config}"],
                context,
                workdir,
            )
    return seconds


def verify(defn: Definition, booted: bool = True, only_firmware: str | None = None) -> dict[str, float]:
    host.require_root("invoke verify")
    work = build.work_dir(defn)
    tree = work / "rootfs"
    if not tree.is_dir():
        raise StrataError(f"nothing prepared for '{defn.data['name']}': run `invoke build` first")
    results: dict[str, float] = {}
    with step("verify"):
        with step("testinfra on the baked tree (chroot)"):
            run_suite(
                ["--connection=chroot", f"--hosts={tree}"],
                _context(defn, "offline"),
                work / "verify" / "offline",
            )
        if not booted:
            return results
        host.require_tools("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen")
        image = boot_image(defn)
        kernel, initrd = tree / "vmlinuz", tree / "initrd.img"
        accel = choose_accel(
            defn.data["verify"]["accel"],
            kernel.resolve() if kernel.exists() else None,
            initrd.resolve() if initrd.exists() else None,
        )
        for firmware in defn.data["verify"]["firmware"]:
            if only_firmware and firmware != only_firmware:
                continue
            results[firmware] = boot_and_test(defn, image, firmware, accel, work / "verify" / firmware)
    (work / "verify" / "boot-times.json").write_text(
        json.dumps({"accel": accel, "seconds": results}, indent=2)
    )
    return results
