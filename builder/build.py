"""The build phases, as in the Olares installer: download, prepare, assemble (verify is in verify.py).

Each phase records its timing in the work folder's state.json; assemble puts them in manifest.json.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import apps, bake, disk, host, images, inputs, iso, rootfs
from .artifacts import artifacts_root, atomic_file, sha256_file, staged_output, write_sha256sums
from .definition import Definition
from .errors import StrataError
from .log import info, step

VERSION = version("strata")
BUILD_TOOLS = ("mmdebstrap", "mkfs.ext4", "mkfs.vfat", "mcopy", "mmd", "sfdisk", "qemu-img")


def work_dir(defn: Definition) -> Path:
    return artifacts_root() / ".work" / str(defn.data["name"])


def output_dir(defn: Definition) -> Path:
    return artifacts_root() / str(defn.data["name"])


def load_state(defn: Definition) -> dict[str, Any]:
    path = work_dir(defn) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"phases": {}}


def save_state(defn: Definition, state: dict[str, Any]) -> None:
    with atomic_file(work_dir(defn) / "state.json") as tmp:
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))


def record_phase(defn: Definition, phase: str, seconds: float, **extra: Any) -> None:
    state = load_state(defn)
    state["phases"][phase] = {"seconds": round(seconds, 1), **extra}
    if phase == "prepare":
        state["definition_digest"] = defn.tree_digest()
    save_state(defn, state)


def forget_phase(defn: Definition, phase: str) -> None:
    """Mark `phase` not done, so a failed or killed rerun is never mistaken for a finished one."""
    state = load_state(defn)
    state["phases"].pop(phase, None)
    if phase == "prepare":
        state.pop("definition_digest", None)
    save_state(defn, state)


def image_specs(defn: Definition) -> list[images.ImageSpec]:
    if not defn.enabled("containerd"):
        return []
    return images.image_specs(defn.layer_settings("containerd"))


def app_files(defn: Definition, specs: list[images.ImageSpec]) -> list[apps.AppFile]:
    """The apps layer's manifests and charts, checked to use preloaded images only."""
    files = apps.app_files(defn)
    apps.check_images(files, [spec.ref for spec in specs])
    return files


def download(defn: Definition) -> None:
    """Fetch and verify every remote input, so a missing one fails in seconds, not after the build."""
    host.require_root("invoke download")
    host.require_tools("mmdebstrap")
    start = time.monotonic()
    with step("download"):
        specs = image_specs(defn)
        images.check_archives(specs)
        app_files(defn, specs)
        inputs.fetch_inputs(defn)
        wanted = bake.layer_packages(defn) + [
            p for s in specs if s.build for p in s.build.get("packages", [])
        ]
        rootfs.download_packages(defn.data["os"], wanted)
    record_phase(defn, "download", time.monotonic() - start)


def prepare(defn: Definition) -> None:
    """Build the root filesystem and bake the enabled layers into it."""
    host.require_root("invoke prepare")
    host.require_tools("mmdebstrap")
    work = work_dir(defn)
    forget_phase(defn, "prepare")
    start = time.monotonic()
    with step("prepare"):
        bundle = layer_bundle(defn, work)
        tree = work / "rootfs"
        with step(f"root filesystem (Debian {defn.data['os']['suite']})"):
            rootfs.create_rootfs(defn.data["os"], tree, bake.layer_packages(defn))
        with step("bake layers: " + ", ".join(layer.name for layer in defn.enabled_layers())):
            bake.bake_chroot(tree, bundle, work / "packages.txt")
    record_phase(defn, "prepare", time.monotonic() - start)


def layer_bundle(defn: Definition, work: Path) -> Path:
    """The enabled layers as one bundle in `work`/bundle (their container images, fetched inputs and
    generated files included), with `work`/images.json; the chroot bake and the Packer path both run it."""
    specs = image_specs(defn)
    generated = {"apps": apps.bundle_files(app_files(defn, specs))}
    with step("container images"):
        prepared = images.prepare_images(defn.data["os"], specs, work)
    bundle = bake.make_bundle(defn, work / "bundle", prepared, inputs.fetch_inputs(defn), generated)
    (work / "images.json").write_text(
        json.dumps([{"ref": i.ref, "digest": i.digest} for i in prepared], indent=2)
    )
    return bundle


def _versions(work: Path) -> dict[str, str]:
    table = dict(line.split("\t")[:2] for line in (work / "packages.txt").read_text().splitlines() if line)
    wanted = (
        "linux-image-amd64",
        "systemd",
        "containerd",
        "runc",
        "openssh-server",
        "cloud-init",
        "grub-efi-amd64-bin",
    )
    return {name: table[name] for name in wanted if name in table}


def assemble(defn: Definition) -> Path:
    """Turn the prepared tree into disk images, SHA256SUMS, manifest.json and packages.txt."""
    host.require_root("invoke assemble")
    host.require_tools(*BUILD_TOOLS)
    work = work_dir(defn)
    tree = work / "rootfs"
    state = load_state(defn)
    if not tree.is_dir() or "prepare" not in state["phases"]:
        raise StrataError(
            f"nothing prepared for '{defn.data['name']}': run `invoke prepare` (or `invoke build`) first"
        )
    if state.get("definition_digest") != defn.tree_digest():
        raise StrataError("the definition changed since `invoke prepare`; run `invoke prepare` again")
    name = defn.data["name"]
    ids = disk.DiskIds.derive(f"{name}:{defn.digest()}")
    start = time.monotonic()
    with step("assemble"), staged_output(output_dir(defn)) as out:
        disk.write_boot_config(tree, ids, defn.data["os"]["kernel_cmdline"], f"strata {name}")
        raw = out / f"{name}.raw"
        with step("raw disk image"):
            disk.assemble_raw(tree, work, raw, ids, defn.data["disk"]["size"], defn.data["disk"]["firmware"])
        iso_names, known_sha256 = [], {}
        if "iso" in defn.data["disk"]["formats"]:
            known_sha256[raw.name] = sha256_file(raw)  # the installer checks the disk it writes with it
            with step("installer ISO"):
                iso.build_iso(defn, tree, raw, known_sha256[raw.name], out / f"{name}.iso", work / "iso")
            iso_names.append(f"{name}.iso")
        names = disk_formats(defn, raw) + iso_names
        phases = dict(load_state(defn)["phases"])
        phases["assemble"] = {"seconds": round(time.monotonic() - start, 1)}
        disk_info = {
            "root_fs_uuid": ids.root_fs,
            "disk_guid": ids.disk,
            "firmware": defn.data["disk"]["firmware"],
        }
        write_manifest(defn, out, names, work, phases, disk_info, known_sha256)
    record_phase(defn, "assemble", time.monotonic() - start)
    for n in names:
        info(f"{output_dir(defn) / n}: {(output_dir(defn) / n).stat().st_size / 2**20:.0f} MiB")
    return output_dir(defn)


def disk_formats(defn: Definition, raw: Path) -> list[str]:
    """The definition's disk formats made from the raw disk `raw` (in a staging folder): their names.
    qcow2 is zlib-compressed; the raw disk goes unless `raw` is one of the formats."""
    names = [raw.name]
    if "qcow2" in defn.data["disk"]["formats"]:
        qcow2 = raw.with_suffix(".qcow2")
        with step("qcow2 (compressed)"):
            disk.to_qcow2(raw, qcow2)
        names.append(qcow2.name)
    if "raw" not in defn.data["disk"]["formats"]:
        raw.unlink()
        names.remove(raw.name)
    return names


def write_manifest(
    defn: Definition,
    out: Path,
    names: list[str],
    work: Path,
    phases: dict[str, Any],
    disk_info: dict[str, Any],
    known_sha256: dict[str, str] | None = None,
    **extra: Any,
) -> None:
    """packages.txt (from `work`), manifest.json and SHA256SUMS in the staging folder `out`, whichever
    backend baked the disks `names` (each hashed once; `known_sha256` has digests already computed);
    `extra` adds top-level manifest keys (the Packer path's base)."""
    shutil.copyfile(work / "packages.txt", out / "packages.txt")
    digests = {n: (known_sha256 or {}).get(n) or sha256_file(out / n) for n in names}
    manifest = {
        "strata": VERSION,
        "name": defn.data["name"],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_host": platform.node(),
        "definition": json.loads(defn.to_json()),
        "definition_digest": defn.digest(),
        "versions": {"debian": defn.data["os"]["suite"], **_versions(work)},
        "layers": [
            {"name": layer.name, "order": layer.order, "sha256": bake.layer_digest(layer)}
            for layer in defn.enabled_layers()
        ],
        "images": json.loads((work / "images.json").read_text()),
        "disk": disk_info,
        "phases": phases,
        "artifacts": {n: {"size": (out / n).stat().st_size, "sha256": digests[n]} for n in names},
        **extra,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_sha256sums(out, [*names, "manifest.json", "packages.txt"], digests)
