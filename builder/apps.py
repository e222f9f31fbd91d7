"""The containerized layer: manifests and embedded Helm charts, and the images they need.

Manifests and charts become files under /usr/share/strata/apps in the image; strata-agent fills in
the activation placeholders (${hostname}...) and hands them to K3s' auto-deploy folder. Every image
they reference is found here by reading them, and must be one the containerd layer preloads.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import LAYERS_DIR
from .definition import Definition
from .errors import StrataError
from .oci import normalize_ref

APPS_DIR = "/usr/share/strata/apps"
CHART_SIDECAR = "strata-chart.yaml"  # how a built-in chart is installed; not part of the chart
_EXPRESSION = re.compile(r"\{\{-?\s*(.+?)\s*-?\}\}")
_WORKLOAD_KEYS = ("containers", "initContainers", "ephemeralContainers")


@dataclass(frozen=True)
class AppFile:
    name: str  # file name under APPS_DIR
    text: str
    source: str  # where it came from, for messages
    images: tuple[str, ...]


# ---------------------------------------------------------------- charts


def chart_archive(folder: Path) -> bytes:
    """The chart as a .tgz (Helm's layout, <name>/...), byte-identical for identical content."""
    name = _chart_meta(folder)["name"]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHART_SIDECAR):
            info = tarfile.TarInfo(f"{name}/{path.relative_to(folder).as_posix()}")
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _chart_meta(folder: Path) -> dict[str, Any]:
    chart_file = folder / "Chart.yaml"
    if not chart_file.is_file():
        raise StrataError(f"{folder}: not a Helm chart (no Chart.yaml)")
    meta = yaml.safe_load(chart_file.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise StrataError(f"{chart_file}: expected a mapping with a `name`")
    return meta


def chart_images(folder: Path, release: str, namespace: str, values: dict[str, Any], where: str) -> list[str]:
    """Images named on the `image:` lines of the chart's templates, with simple values filled in."""
    chart_values = (
        yaml.safe_load((folder / "values.yaml").read_text()) if (folder / "values.yaml").exists() else {}
    )
    scope = {
        "Values": {**(chart_values or {}), **values},
        "Release": {"Name": release, "Namespace": namespace},
        "Chart": {"Name": _chart_meta(folder)["name"]},
    }
    images = []
    for template in sorted((folder / "templates").glob("*.y*ml")):
        for number, line in enumerate(template.read_text().splitlines(), 1):
            key, sep, value = line.strip().lstrip("- ").partition(":")
            if key != "image" or not sep:
                continue
            try:
                filled = _EXPRESSION.sub(lambda m: _lookup(scope, m.group(1)), value)
            except (KeyError, TypeError):
                raise StrataError(
                    f"{where}: {template.relative_to(folder)}:{number}: cannot work out the image in "
                    f"{line.strip()!r}; list the chart's images under `images:`"
                ) from None
            images.append(str(yaml.safe_load(filled)))
    return images


def _lookup(scope: dict[str, Any], expression: str) -> str:
    path, _, pipe = expression.partition("|")
    if pipe.strip() not in ("", "quote") or not path.strip().startswith("."):
        raise KeyError(expression)
    current: Any = scope
    for part in path.strip()[1:].split("."):
        current = current[part]
    return json.dumps(str(current)) if pipe.strip() == "quote" else str(current)


def helmchart(name: str, namespace: str, archive: bytes, values: dict[str, Any]) -> str:
    """A K3s HelmChart resource carrying the chart itself (no repository needed at first boot)."""
    spec: dict[str, Any] = {
        "targetNamespace": namespace,
        "createNamespace": True,
        "chartContent": base64.b64encode(archive).decode(),
    }
    if values:
        spec["valuesContent"] = yaml.safe_dump(values, sort_keys=True)
    doc = {
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {"name": name, "namespace": "kube-system"},
        "spec": spec,
    }
    return yaml.safe_dump(doc, sort_keys=False, width=1 << 20)


# ---------------------------------------------------------------- manifests


def manifest_images(text: str, where: str) -> list[str]:
    """Every container image in a multi-document manifest (pods, workloads, jobs, cron jobs...)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise StrataError(f"{where}: invalid YAML: {exc}") from None
    images: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _WORKLOAD_KEYS and isinstance(value, list):
                    images.extend(str(c["image"]) for c in value if isinstance(c, dict) and "image" in c)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(docs)
    return images


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def _manifest_file(index: int, path: Path, where: str) -> AppFile:
    text = path.read_text()
    return AppFile(f"{index:02d}-{path.stem}.yaml", text, where, tuple(manifest_images(text, where)))


def _chart_file(index: int, spec: dict[str, Any], where: str) -> AppFile:
    folder = Path(spec["path"])
    name = spec.get("name") or _chart_meta(folder)["name"]
    values = spec.get("values", {})
    images = chart_images(folder, name, spec.get("namespace", "default"), values, where)
    images += spec.get("images", [])
    text = helmchart(name, spec.get("namespace", "default"), chart_archive(folder), values)
    return AppFile(f"{index:02d}-{name}.yaml", text, where, tuple(images))


def app_files(defn: Definition) -> list[AppFile]:
    """The built-in content, then the definition's manifests, then its charts, in that order."""
    if not defn.enabled("apps"):
        return []
    settings = defn.layer_settings("apps")
    files: list[AppFile] = []
    for name in settings["builtin"]:
        folder = LAYERS_DIR / "apps" / "builtin" / name
        where = f"layers.apps.builtin: {name}"
        if (folder / "Chart.yaml").exists():
            sidecar = folder / CHART_SIDECAR
            spec = yaml.safe_load(sidecar.read_text()) if sidecar.exists() else {}
            files.append(_chart_file(len(files) + 10, {**spec, "path": folder, "name": name}, where))
        else:
            files.append(_manifest_file(len(files) + 10, folder / f"{name}.yaml", where))
    for i, item in enumerate(settings["manifests"]):
        for path in _manifest_files(Path(item)):
            files.append(_manifest_file(len(files) + 10, path, f"layers.apps.manifests[{i}]: {path}"))
    for i, spec in enumerate(settings["charts"]):
        files.append(_chart_file(len(files) + 10, spec, f"layers.apps.charts[{i}]"))
    return files


def check_images(files: list[AppFile], preloaded: list[str]) -> None:
    """Fail, listing every one, if an app uses an image the image does not preload."""
    have = {normalize_ref(ref) for ref in preloaded}
    missing = [(ref, f.source) for f in files for ref in f.images if normalize_ref(ref) not in have]
    if missing:
        rows = "\n".join(f"  - {ref} (used by {source})" for ref, source in missing)
        raise StrataError(
            f"layers.apps: {len(missing)} image(s) used by the apps are not preloaded; add them to "
            f"layers.containerd.images (built from packages or a folder, or an archive):\n{rows}"
        )


def bundle_files(files: list[AppFile]) -> dict[str, str]:
    """What the apps layer adds to the image: {path in the image: content}."""
    return {f"{APPS_DIR}/{f.name}": f.text for f in files}
