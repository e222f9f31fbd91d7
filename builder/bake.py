"""Applying layers to a root filesystem through one bundle that runs the same in a chroot or a VM.

A bundle is a folder: `run` (templates/bake/run), `env`, `definition.json`, `packages` (the Debian
packages the layers need, one a line), `images/` and `layers/NN-name/` each with `files/` (the layer's
files plus its rendered templates), `install.d/` and `finalise.d/`. The chroot bake and the Packer
path (builder/packer.py) run the same bundle.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from . import TEMPLATES_DIR
from .chroot import chroot_run, mounted
from .definition import Definition, Layer
from .errors import StrataError
from .images import PreparedImage
from .inputs import LayerInput
from .log import info

BAKE_DIR = "var/lib/strata/bake"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")  # left in a layer by running its tests
PHASES = ("install.d", "finalise.d")
INSTALLED_PACKAGES = "installed-packages.txt"  # written by the runner: package, version, arch


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return " ".join(env_value(v) for v in value if not isinstance(v, dict | list))
    return "" if value is None else str(value)


def bake_env(defn: Definition) -> dict[str, str]:
    """Settings as STRATA_OS_<KEY> and STRATA_<LAYER>_<KEY>; structured ones via definition.json."""
    env = {f"STRATA_OS_{k.upper()}": env_value(v) for k, v in defn.data["os"].items()}
    for layer in defn.enabled_layers():
        for key, value in defn.layer_settings(layer.name).items():
            name = f"STRATA_{layer.name.upper().replace('-', '_')}_{key.upper()}"
            if name in env:
                raise StrataError(
                    f"{layer.path / 'layer.yaml'}: settings.{key}: {name} is already taken; rename it"
                )
            if not isinstance(value, dict):
                env[name] = env_value(value)
    env["STRATA_NAME"] = defn.data["name"]
    return env


def layer_packages(defn: Definition) -> list[str]:
    """The Debian packages of the definition (os.packages) and of its enabled layers, in order."""
    packages = list(defn.data["os"]["packages"])
    for layer in defn.enabled_layers():
        packages += layer.packages
    return packages


def render(template: str, context: dict[str, Any]) -> str:
    loader = jinja2.FileSystemLoader(str(TEMPLATES_DIR))
    jenv = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return jenv.get_template(template).render(**context)


def _layer_into(bundle: Path, index: int, layer: Layer, defn: Definition) -> Path:
    dest = bundle / "layers" / f"{index:02d}-{layer.name}"
    dest.mkdir(parents=True)
    for part in ("files", *PHASES):
        if (layer.path / part).is_dir():
            shutil.copytree(layer.path / part, dest / part, symlinks=True, ignore=IGNORED)
    context = {"definition": defn.data, "settings": defn.layer_settings(layer.name), "layer": layer.name}
    for target, template in layer.templates.items():
        out = dest / "files" / target.lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(template, context))
    return dest


def make_bundle(
    defn: Definition,
    bundle: Path,
    images: list[PreparedImage],
    inputs: Sequence[tuple[LayerInput, Path]] = (),
    generated: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write the bundle for `defn`'s enabled layers, their fetched inputs, the files generated for
    them ({layer: {path in the image: text}}) and the prepared images."""
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    shutil.copy2(TEMPLATES_DIR / "bake" / "run", bundle / "run")
    env = bake_env(defn)
    (bundle / "env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))
    (bundle / "definition.json").write_text(defn.to_json())
    (bundle / "packages").write_text("".join(f"{p}\n" for p in dict.fromkeys(layer_packages(defn))))
    folders = {}
    for index, layer in enumerate(defn.enabled_layers()):
        folders[layer.name] = _layer_into(bundle, index, layer, defn)

    def placed(layer_name: str, dest: str) -> Path:
        target = folders[layer_name] / "files" / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    for item, cached in inputs:
        target = placed(item.layer, item.dest)
        shutil.copyfile(cached, target)
        target.chmod(item.mode)
    for layer_name, files in (generated or {}).items():
        for dest, text in files.items():
            placed(layer_name, dest).write_text(text)
    if images:
        (bundle / "images").mkdir()
        rows = []
        for n, image in enumerate(images):
            name = f"{n:02d}.tar"
            shutil.copyfile(image.archive, bundle / "images" / name)
            rows.append(f"{image.ref}\t{name}\t{image.source_ref}\n")
        (bundle / "images" / "images.tsv").write_text("".join(rows))
    return bundle


def bake_chroot(rootfs: Path, bundle: Path, packages_txt: Path) -> None:
    """Run the bundle inside `rootfs`, copy out the runner's list of installed packages to
    `packages_txt`, then remove the bundle from the tree."""
    inside = rootfs / BAKE_DIR
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(bundle, inside, symlinks=True)
    try:
        with mounted(rootfs):
            chroot_run(rootfs, [f"/{BAKE_DIR}/run"], show=lambda _line: True, what="layer bake")
        shutil.copyfile(inside / INSTALLED_PACKAGES, packages_txt)
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    info("layers baked")


def layer_digest(layer: Layer) -> str:
    """sha256 over a layer folder's files (paths, modes and contents) and the templates it renders."""
    h = hashlib.sha256()
    files = [
        (str(p.relative_to(layer.path)), p)
        for p in sorted(layer.path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    files += [(f"templates/{t}", TEMPLATES_DIR / t) for t in sorted(layer.templates.values())]
    for name, path in files:
        h.update(json.dumps([name, path.stat().st_mode]).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
