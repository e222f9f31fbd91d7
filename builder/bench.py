"""`invoke bench`: each phase cold (empty caches) and warm (package cache kept), sizes, boot-to-SSH time."""

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
        results["boot_to_ssh_s"] = verify.verify(defn, booted=True)
        accel_file = build.work_dir(defn) / "verify" / "boot-times.json"
        results["accel"] = json.loads(accel_file.read_text())["accel"]
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
    for firmware, seconds in r["boot_to_ssh_s"].items():
        print(f"boot to SSH ({firmware}, {r['accel']}): {seconds:.1f}s")
