"""The apps: manifest templates rendered into K3s's auto-deploy folder, and the workloads they create."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .fsutil import atomic_write

TARGET_PREFIX = "strata-"
HELM_API_VERSION = "helm.cattle.io/v1"
_KINDS = {"Deployment": "deployment", "DaemonSet": "daemonset", "StatefulSet": "statefulset", "Job": "job"}


class ManifestError(RuntimeError):
    pass


@dataclass(frozen=True)
class Workload:
    kind: str  # Deployment, DaemonSet, StatefulSet or Job
    namespace: str
    name: str

    @property
    def resource(self) -> str:
        """The kubectl resource name."""
        return _KINDS[self.kind]

    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Workload:
        return cls(kind=data["kind"], namespace=data["namespace"], name=data["name"])


class Placeholders(string.Template):
    """Only ${lowercase_name} is a placeholder: shell's $VAR, ${HOME} and $(VAR) pass through untouched."""

    flags = re.NOFLAG  # string.Template's default is case-insensitive
    pattern = r"(?P<escaped>(?!))|\$\{(?P<braced>[a-z][a-z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!))"  # type: ignore[assignment]


def render_templates(source: Path, values: Mapping[str, str]) -> list[tuple[str, str]]:
    """(target name, text) for each *.yaml in `source`, sorted; ManifestError names file and placeholder."""
    rendered = []
    templates = sorted(source.glob("*.yaml")) if source.is_dir() else []
    for template in templates:
        try:
            text = Placeholders(template.read_text()).substitute(values)
        except KeyError as err:
            known = ", ".join(f"${{{name}}}" for name in sorted(values))
            raise ManifestError(
                f"{template.name}: unknown placeholder ${{{err.args[0]}}}; known: {known}"
            ) from None
        rendered.append((TARGET_PREFIX + template.name, text))
    return rendered


def write_rendered(target: Path, rendered: Iterable[tuple[str, str]]) -> list[str]:
    """Write each file atomically; an unchanged file is left alone. The names written now are returned."""
    written = []
    for name, text in rendered:
        path = target / name
        try:
            if path.read_text() == text:
                continue
        except FileNotFoundError:
            pass
        atomic_write(path, text, 0o644)
        written.append(name)
    return written


def discover_workloads(files: Iterable[tuple[str, str]]) -> list[Workload]:
    """The workloads to wait for in (name, YAML text) files: Deployments, DaemonSets, StatefulSets,
    and for each HelmChart its helm-install Job."""
    found: list[Workload] = []
    for name, text in files:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            raise ManifestError(f"{name}: not valid YAML: {err}") from None
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            meta = _mapping(doc.get("metadata"))
            object_name = meta.get("name")
            if not isinstance(object_name, str):
                continue
            kind = doc.get("kind")
            if kind in ("Deployment", "DaemonSet", "StatefulSet"):
                found.append(Workload(kind, str(meta.get("namespace") or "default"), object_name))
            elif kind == "HelmChart" and doc.get("apiVersion") == HELM_API_VERSION:
                namespace = str(meta.get("namespace") or "kube-system")
                found.append(Workload("Job", namespace, f"helm-install-{object_name}"))
    return list(dict.fromkeys(found))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def workload_ready(kind: str, obj: Mapping[str, Any]) -> bool:
    """Whether a `kubectl get -o json` object counts as ready."""
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    if kind in ("Deployment", "StatefulSet"):
        return _int(status.get("readyReplicas")) >= _int(spec.get("replicas"), 1)
    if kind == "DaemonSet":
        desired = _int(status.get("desiredNumberScheduled"))
        return desired > 0 and _int(status.get("numberReady")) >= desired
    if kind == "Job":
        return _int(status.get("succeeded")) >= 1
    raise ValueError(f"no readiness rule for {kind}")


def parse_object(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
