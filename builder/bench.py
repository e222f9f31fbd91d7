"""`invoke bench`: each phase cold (empty caches) and warm (package cache kept), sizes, boot-to-SSH time."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from . import ROOT, build, verify
from .definition import Definition, load_definition
from .log import info, step

PHASES: tuple[tuple[str, Callable[[Definition], Any]], ...] = (
    ("download", build.download),
    ("prepare", build.prepare),
    ("assemble", build.assemble),
)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.monotonic()
    fn()
    return round(time.monotonic() - start, 1)


def _fetched(defn: Definition) -> dict[str, int]:
    phases = build.load_state(defn)["phases"]
    return {p: int(phases.get(p, {}).get("fetched_bytes", 0)) for p in ("download", "prepare")}


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
                results[temperature] = {name: _timed(lambda fn=fn: fn(defn)) for name, fn in PHASES}  # type: ignore[misc]
                results[temperature]["fetched_bytes"] = _fetched(defn)
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
    print(f"{'phase':<10}{'cold (s)':>10}{'warm (s)':>10}")
    for name, _ in PHASES:
        print(f"{name:<10}{r['cold'][name]:>10}{r['warm'][name]:>10}")
    for t in ("cold", "warm"):
        mb = {k: round(v / 1e6, 1) for k, v in r[t]["fetched_bytes"].items()}
        print(f"downloaded ({t}, MB): {mb}")
    for name, size in r["sizes_mib"].items():
        print(f"{name}: {size} MiB")
    for firmware, seconds in r["boot_to_ssh_s"].items():
        print(f"boot to SSH ({firmware}, {r['accel']}): {seconds:.1f}s")
