"""`invoke bench`: each phase cold (empty caches) and warm (package cache kept), sizes, and the time
from power-on to SSH and to the agent's `ready` on each firmware; then the Packer backend's build time
beside the chroot one."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ROOT, build, verify
from .definition import Definition, load_definition
from .log import info, step

PHASES: tuple[tuple[str, Callable[[Definition], Any]], ...] = (
    ("download", build.download),
    ("prepare", build.prepare),
    ("assemble", build.assemble),
)


def received_bytes() -> int:
    """Bytes received on every network interface but loopback (from /proc/net/dev)."""
    total = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, data = line.split(":", 1)
        if name.strip() != "lo":
            total += int(data.split()[0])
    return total


def _timed(fn: Callable[[], Any]) -> float:
    start = time.monotonic()
    fn()
    return round(time.monotonic() - start, 1)


def _measure(defn: Definition) -> dict[str, Any]:
    """Seconds and MB received for each phase."""
    out: dict[str, Any] = {}
    for name, fn in PHASES:
        before = received_bytes()
        out[name] = _timed(lambda fn=fn: fn(defn))  # type: ignore[misc]
        out[f"{name}_mb_received"] = round((received_bytes() - before) / 1e6, 1)
    return out


def _measure_packer(defn: Definition) -> dict[str, Any]:
    """The Packer backend's build after the chroot runs (package cache warm): strata's base (os layer,
    chroot path), the layer bundle, `packer build` and the outputs, each in seconds."""
    from . import packer

    before = received_bytes()
    total = _timed(lambda: packer.build_image(defn))
    manifest = json.loads((packer.output_dir(defn) / "manifest.json").read_text())
    return {
        "total": total,
        "mb_received": round((received_bytes() - before) / 1e6, 1),
        "phases": {name: phase["seconds"] for name, phase in manifest["phases"].items()},
        "sizes_mib": {name: round(a["size"] / 2**20, 1) for name, a in manifest["artifacts"].items()},
    }


def run(defn: Definition) -> dict[str, Any]:
    root = ROOT / "artifacts" / ".bench"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["STRATA_ARTIFACTS"] = str(root / "artifacts")
    os.environ["STRATA_CACHE"] = str(root / "cache")
    results: dict[str, Any] = {"validate_s": _timed(lambda: load_definition(defn.path))}
    try:
        for temperature in ("cold", "warm"):
            with step(f"bench: {temperature}"):
                if temperature == "warm":
                    shutil.rmtree(build.work_dir(defn), ignore_errors=True)
                results[temperature] = _measure(defn)
        out = build.output_dir(defn)
        results["sizes_mib"] = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(out.iterdir())}
        results["boot_s"] = verify.verify(defn, booted=True, parallel=1)  # one VM at a time: clean times
        accel_file = build.work_dir(defn) / "verify" / "boot-times.json"
        results["accel"] = json.loads(accel_file.read_text())["accel"]
        if shutil.which("packer"):
            with step("bench: packer backend"):
                results["packer"] = _measure_packer(defn)
        else:
            info("packer is not installed (apt-get install packer): the Packer backend is not timed")
    finally:
        os.environ.pop("STRATA_ARTIFACTS")
        os.environ.pop("STRATA_CACHE")
    report = ROOT / "artifacts" / "bench.json"
    report.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    shutil.rmtree(root, ignore_errors=True)
    info(f"written {report}")
    return results


def print_table(r: dict[str, Any]) -> None:
    print(f"\nvalidate: {r['validate_s']}s")
    print(f"{'phase':<10}{'cold (s)':>10}{'cold MB in':>12}{'warm (s)':>10}{'warm MB in':>12}")
    for name, _ in PHASES:
        mb = f"{name}_mb_received"
        print(f"{name:<10}{r['cold'][name]:>10}{r['cold'][mb]:>12}{r['warm'][name]:>10}{r['warm'][mb]:>12}")
    for name, size in r["sizes_mib"].items():
        print(f"{name}: {size} MiB")
    for firmware, times in r["boot_s"].items():
        for what, seconds in times.items():
            print(f"boot to {what} ({firmware}, {r['accel']}): {seconds:.1f}s")
    if "packer" in r:
        chroot = sum(r["warm"][name] for name, _ in PHASES)
        parts = " + ".join(f"{name} {r['warm'][name]}" for name, _ in PHASES)
        print(f"\n{'backend':<10}{'build (s)':>10}  parts (s)")
        print(f"{'chroot':<10}{chroot:>10.1f}  {parts} (warm)")
        parts = " + ".join(f"{name} {seconds}" for name, seconds in r["packer"]["phases"].items())
        print(f"{'packer':<10}{r['packer']['total']:>10.1f}  {parts}")
        for name, size in r["packer"]["sizes_mib"].items():
            print(f"{name}: {size} MiB")
