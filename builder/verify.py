"""Phase 4: the testinfra suite (tests/image) on the baked tree via chroot, then on booted VMs over SSH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import ROOT, apps, build, host
from .definition import Definition
from .errors import StrataError
from .log import info, step
from .qemu import VM, accel_for_tree, image_info, ssh_keypair
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
        "layers": [layer.name for layer in defn.enabled_layers()],
        "k3s": defn.layer_settings("k3s") if defn.enabled("k3s") else None,
        "agent": defn.layer_settings("agent") if defn.enabled("agent") else None,
        "apps": [f.name for f in apps.app_files(defn)],
        **extra,
    }


def activation_for(defn: Definition, ssh_key: str) -> dict[str, Any]:
    """The activation a verify boot gets from its seed: the definition's hostname, our key for the admin."""
    settings = defn.layer_settings("agent")
    return {
        "hostname": defn.data["os"]["hostname"],
        "domain": settings["domain"],
        "admin": {"user": settings["admin_user"], "ssh_keys": [ssh_key]},
    }


def agent_status(port: int, timeout: float = 10) -> dict[str, Any] | None:
    """GET /status from the agent through a forwarded port; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=timeout) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError):
        return None


def wait_for(vm: VM, what: str, timeout: float, done: Callable[[], bool], interval: float = 3) -> float:
    """Seconds from power-on until `done()` (which may raise to stop early); raises with the serial
    console's tail when the VM exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return time.monotonic() - vm.started
        if not vm.alive():
            raise StrataError(
                f"the VM exited before {what} ({vm.firmware}); serial console:\n{vm.serial_tail()}"
            )
        time.sleep(interval)
    raise StrataError(f"no {what} after {timeout:.0f}s ({vm.firmware}); serial console:\n{vm.serial_tail()}")


def wait_ready(vm: VM, port: int, timeout: float) -> float:
    """Seconds from power-on until the agent reports `ready`; raises on `failed` or timeout."""
    last: dict[str, Any] = {}

    def ready() -> bool:
        last.update(agent_status(port) or {})
        if last.get("state") == "failed":
            raise StrataError(f"activation failed ({vm.firmware}): {json.dumps(last, indent=2)}")
        return last.get("state") == "ready"

    try:
        return wait_for(vm, "the agent's ready", timeout, ready)
    except StrataError as error:
        raise StrataError(f"{error}\nlast agent status: {json.dumps(last, indent=2)}") from None


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
    """Seconds from power-on until SSH answers."""
    probe = ["ssh", "-F", str(ssh_config), "-p", str(vm.ssh_port), "root@127.0.0.1", "true"]

    def answers() -> bool:
        return subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0

    return wait_for(vm, "SSH", timeout, answers, interval=2)


def make_ssh_key(workdir: Path) -> tuple[Path, Path]:
    """The verify boots' SSH key and an ssh_config that uses it."""
    key = workdir / "id_ed25519"
    ssh_keypair(key, "strata-verify")
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


def wait_installed(vm: VM, timeout: float) -> float:
    """Seconds from power-on until the ISO's installer reports it is done (it then reboots)."""

    def installed() -> bool:
        console = vm.serial_log.read_bytes().decode(errors="replace") if vm.serial_log.exists() else ""
        if "strata-install: FAILED" in console or "a shell follows" in console:
            raise StrataError(
                f"the ISO install failed ({vm.firmware}); serial console:\n{vm.serial_tail(40)}"
            )
        return "strata-install: done" in console

    return wait_for(vm, "finished install", timeout, installed)


def boot_and_test(
    defn: Definition, image: Path, firmware: str, accel: str, workdir: Path, installer: Path | None = None
) -> dict[str, float]:
    """Boot `image` on `firmware` with a fresh seed (activation included), wait for SSH and for the
    agent's `ready`, then run the suite over SSH; returns the seconds to SSH and to ready.

    With `installer` (the ISO), boot it instead with a blank disk as large as the qcow2 test disk;
    the seed's strata-install.conf makes the install unattended, and the suite runs on the installed
    system after its reboot."""
    workdir.mkdir(parents=True, exist_ok=True)
    key, ssh_config = make_ssh_key(workdir)
    public_key = ssh_keypair(key, "strata-verify")
    activation = activation_for(defn, public_key) if defn.enabled("agent") else None
    seed = Seed(
        hostname=defn.data["os"]["hostname"],
        ssh_authorized_keys=[public_key],
        activation=activation,
        install={"target": "largest-empty"} if installer else None,
    )
    seed_iso = write_seed_iso(seed, workdir / "seed.iso")
    vcfg = defn.data["verify"]
    api_port = defn.layer_settings("agent")["api_port"] if activation else None
    disk_size = int(image_info(image)["virtual-size"]) + GROW_BY
    if installer:
        image = workdir / "blank.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    vm = VM(
        base=image,
        workdir=workdir,
        firmware=firmware,
        accel=accel,
        memory=vcfg["memory"],
        cpus=vcfg["cpus"],
        disk_size=disk_size,
        seed_iso=seed_iso,
        cdroms=[installer] if installer else [],
        forward=(api_port,) if api_port else (),
    )
    times: dict[str, float] = {}
    with vm:
        if installer:
            with step(f"unattended install from the ISO ({firmware})"):
                times["installed"] = wait_installed(vm, vcfg["ready_timeout"])
            info(f"ISO install ({firmware}, {accel}): {times['installed']:.1f}s")
        with step(f"boot {firmware} until SSH answers"):
            times["ssh"] = wait_ssh(vm, ssh_config, vcfg["boot_timeout"])
        info(f"boot to SSH ({firmware}, {accel}): {times['ssh']:.1f}s")
        if api_port:
            with step(f"activation from the seed until the agent is ready ({firmware})"):
                times["ready"] = wait_ready(vm, vm.ports[api_port], vcfg["ready_timeout"])
            info(f"boot to ready ({firmware}, {accel}): {times['ready']:.1f}s")
        with step(f"testinfra over SSH ({firmware})"):
            context = _context(
                defn,
                "booted",
                installed_from_iso=installer is not None,
                firmware=firmware,
                instance_id=seed.instance_id,
                disk_size=vm.disk_size,
                activation=activation,
                api_url=f"http://127.0.0.1:{vm.ports[api_port]}" if api_port else None,
            )
            run_suite(
                [f"--hosts=ssh://root@127.0.0.1:{vm.ssh_port}", f"--ssh-config={ssh_config}"],
                context,
                workdir,
            )
        record_identity(vm, ssh_config, workdir / "identity.json")
    return times


IDENTITY_SCRIPT = """
import json, pathlib
agent = pathlib.Path("/var/lib/strata/agent/identity.json")
identity = json.loads(agent.read_text()) if agent.exists() else {}
print(json.dumps({
    "machine_id": pathlib.Path("/etc/machine-id").read_text().strip(),
    "ssh_host_key": pathlib.Path("/etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1],
    "k3s_token_sha256": __import__("hashlib").sha256(identity.get("token", "").encode()).hexdigest(),
    "node_name": identity.get("node_name"),
}))
"""


def record_identity(vm: VM, ssh_config: Path, out: Path) -> None:
    """What makes this machine itself (the K3s token as a hash only), so boots of one image can be
    compared: each must differ (tests/integration/test_image.py)."""
    ssh = ["ssh", "-F", str(ssh_config), "-p", str(vm.ssh_port), "root@127.0.0.1", "python3", "-"]
    result = subprocess.run(ssh, input=IDENTITY_SCRIPT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StrataError(f"could not read the machine's identity over SSH: {result.stderr.strip()}")
    out.write_text(result.stdout)


def offline_suite(defn: Definition, tree: Path, workdir: Path) -> None:
    with step("testinfra on the root filesystem (chroot)"):
        run_suite(["--connection=chroot", f"--hosts={tree}"], _context(defn, "offline"), workdir)


def boot_all(
    defn: Definition,
    image: Path,
    accel: str,
    verify_dir: Path,
    only_firmware: str | None,
    installer: Path | None = None,
    parallel: int | None = None,
) -> dict[str, dict[str, float]]:
    """boot_and_test `image` on each verify firmware (and, with `installer`, an install from it on each),
    `parallel` VMs at a time (default verify.parallel); times go to verify_dir/boot-times.json."""
    host.require_tools("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen")
    firmwares = [f for f in defn.data["verify"]["firmware"] if not only_firmware or f == only_firmware]
    boots: dict[str, tuple[str, Path | None]] = {fw: (fw, None) for fw in firmwares}
    if installer:
        boots |= {f"{fw}-iso": (fw, installer) for fw in firmwares}
    workers = max(1, min(parallel or defn.data["verify"]["parallel"], len(boots)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            label: pool.submit(boot_and_test, defn, image, fw, accel, verify_dir / label, medium)
            for label, (fw, medium) in boots.items()
        }
        results = {label: future.result() for label, future in futures.items()}
    (verify_dir / "boot-times.json").write_text(
        json.dumps({"accel": accel, "parallel": workers, "seconds": results}, indent=2)
    )
    return results


def verify(
    defn: Definition,
    booted: bool = True,
    only_firmware: str | None = None,
    iso: bool = True,
    parallel: int | None = None,
) -> dict[str, dict[str, float]]:
    """The suite on the tree, then on the qcow2 booted on each firmware, then (when the definition
    writes an ISO and `iso`) on a blank disk installed from the ISO on each firmware. The boots run
    `parallel` at a time (default verify.parallel); each boot's times are then measured under load."""
    host.require_root("invoke verify")
    work = build.work_dir(defn)
    tree = work / "rootfs"
    if not tree.is_dir():
        raise StrataError(f"nothing prepared for '{defn.data['name']}': run `invoke build` first")
    with step("verify"):
        offline_suite(defn, tree, work / "verify" / "offline")
        if not booted:
            return {}
        installer = None
        if iso and "iso" in defn.data["disk"]["formats"]:
            installer = build.output_dir(defn) / f"{defn.data['name']}.iso"
            if not installer.exists():
                raise StrataError(f"{installer} is missing: run `invoke assemble` (or `invoke build`) first")
        accel = accel_for_tree(defn.data["verify"]["accel"], tree)
        return boot_all(defn, boot_image(defn), accel, work / "verify", only_firmware, installer, parallel)


# ---------------------------------------------------------------- an image baked elsewhere (Packer path)


def verify_image(
    defn: Definition, image: Path, booted: bool = True, only_firmware: str | None = None
) -> dict[str, dict[str, float]]:
    """The same suite on a disk image that has no baked tree here (`invoke verify --image`, the Packer
    path's output): on its root filesystem mounted read-only (chroot), then booted on each firmware.
    Work files go to artifacts/.work/<image name>/verify/."""
    from .artifacts import artifacts_root
    from .imagefs import mounted_root

    host.require_root("invoke verify --image")
    if not image.is_file():
        raise StrataError(f"--image {image}: no such file; give the path of a .qcow2 or .raw disk image")
    work = artifacts_root() / ".work" / image.name.partition(".")[0] / "verify"
    with step(f"verify {image}"):
        with mounted_root(image, work / "mount") as tree:
            offline_suite(defn, tree, work / "offline")
            if not booted:
                return {}
            accel = accel_for_tree(defn.data["verify"]["accel"], tree)
        return boot_all(defn, image, accel, work, only_firmware)
