"""Preloaded container images: built from Debian packages or folders, or taken from user archives."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StrataError
from .log import info, step
from .oci import build_oci_archive, inspect_archive, normalize_ref
from .proc import run
from .rootfs import extract_packages

IMAGES_FIELD = "layers.containerd.images"
MERGED_USR = ("bin", "sbin", "lib", "lib64")


@dataclass(frozen=True)
class ImageSpec:
    field: str  # where the image is declared, e.g. layers.containerd.images[1]
    ref: str  # fully-qualified reference it is imported as
    sandbox: bool
    build: dict[str, Any] | None
    archive: Path | None


@dataclass(frozen=True)
class PreparedImage:
    ref: str
    archive: Path
    source_ref: str  # the name the archive gives the image
    digest: str


def image_specs(settings: dict[str, Any]) -> list[ImageSpec]:
    """The images the containerd layer preloads, checked as a whole (unique refs, one sandbox)."""
    specs = [
        ImageSpec(
            field=f"{IMAGES_FIELD}[{i}]",
            ref=normalize_ref(item["ref"]),
            sandbox=item["sandbox"],
            build=item.get("build"),
            archive=Path(item["archive"]) if item.get("archive") else None,
        )
        for i, item in enumerate(settings.get("images", []))
    ]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.ref in seen:
            raise StrataError(f"{spec.field}.ref: {spec.ref} is already declared at {seen[spec.ref]}")
        seen[spec.ref] = spec.field
    sandboxes = [s.field for s in specs if s.sandbox]
    if specs and len(sandboxes) != 1:
        raise StrataError(
            f"{IMAGES_FIELD}: exactly one image must set `sandbox: true` (the pod sandbox image); "
            f"found {len(sandboxes)}{': ' + ', '.join(sandboxes) if sandboxes else ''}"
        )
    return specs


def check_archives(specs: list[ImageSpec]) -> None:
    """Validate user-provided archives early (download phase), so a bad one fails in seconds."""
    for spec in specs:
        if spec.archive is not None:
            _source_ref(spec)


def _source_ref(spec: ImageSpec) -> str:
    """The name the archive gives the image (imported under it, then tagged as spec.ref)."""
    assert spec.archive is not None
    refs = [normalize_ref(r) for r in inspect_archive(spec.archive).refs]
    if spec.ref in refs:
        return spec.ref
    if len(refs) == 1:
        return refs[0]
    if not refs:
        raise StrataError(
            f"{spec.field}.archive: {spec.archive} does not name its image; save it with a tag "
            "(docker save NAME:TAG, or skopeo copy ... oci-archive:FILE:NAME:TAG)"
        )
    raise StrataError(
        f"{spec.field}.archive: {spec.archive} holds several images ({', '.join(refs)}) "
        f"and none is {spec.ref}; set ref to one of them"
    )


def _build_tree(os_settings: dict[str, Any], spec: ImageSpec, tree: Path) -> None:
    assert spec.build is not None
    packages = spec.build.get("packages", [])
    if packages:
        extract_packages(os_settings, tree, packages)
        for sub in ("dev", "var/cache/apt", "var/lib/apt", "var/log"):
            shutil.rmtree(tree / sub, ignore_errors=True)
        for name in MERGED_USR:
            if (tree / "usr" / name).is_dir() and not (tree / name).exists():
                (tree / name).symlink_to(f"usr/{name}")
    else:
        tree.mkdir(parents=True)
    folder = spec.build.get("folder")
    if folder:
        # cp -a keeps owners, modes, links and special files exactly (copytree would read device nodes)
        run(["cp", "-a", "--", f"{folder}/.", str(tree)], what=f"copying {folder}")


def prepare_images(os_settings: dict[str, Any], specs: list[ImageSpec], work: Path) -> list[PreparedImage]:
    """Build or check every image; returns archives ready to stage into the root filesystem."""
    out_dir = work / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = []
    for spec in specs:
        with step(f"image {spec.ref}"):
            if spec.archive is not None:
                prepared.append(PreparedImage(spec.ref, spec.archive, _source_ref(spec), ""))
                continue
            assert spec.build is not None
            tree = work / "image-trees" / spec.ref.replace("/", "_").replace(":", "_")
            try:
                _build_tree(os_settings, spec, tree)
                image = build_oci_archive(
                    tree,
                    out_dir / f"{len(prepared):02d}.tar",
                    spec.ref,
                    entrypoint=spec.build.get("entrypoint") or None,
                    cmd=spec.build.get("cmd") or None,
                    env=spec.build.get("env") or None,
                    arch=os_settings["arch"],
                )
            finally:
                shutil.rmtree(tree, ignore_errors=True)
            info(f"{spec.ref}: {image.size / 2**20:.1f} MiB, {image.manifest_digest}")
            prepared.append(PreparedImage(spec.ref, image.archive, image.ref, image.manifest_digest))
    return prepared
