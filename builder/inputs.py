"""Remote inputs that layers declare under `fetch:` in layer.yaml (e.g. the K3s binary).

Each entry's url and sha256 are Jinja over the layer's settings, so a version, mirror or checksum in
the definition (or its environment variable) picks the file. Fetched in the download phase, verified,
and placed in the layer's files at `dest` when the bundle is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from .definition import Definition, Layer
from .download import Remote, fetch
from .errors import StrataError

SKIP = ("", "False", "false", "0", "no", "None")  # a rendered `when:` that leaves the input out


@dataclass(frozen=True)
class LayerInput:
    layer: str
    remote: Remote
    dest: str  # absolute path in the image
    mode: int


def _render(layer: Layer, key: str, text: str, defn: Definition) -> str:
    context = {"settings": defn.layer_settings(layer.name), "definition": defn.data}
    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(**context)
    except jinja2.TemplateError as exc:
        raise StrataError(f"{layer.path / 'layer.yaml'}: {key}: cannot render {text!r}: {exc}") from None


def layer_inputs(defn: Definition) -> list[LayerInput]:
    """The remote inputs of every enabled layer, with url and sha256 resolved from the definition."""
    inputs = []
    for layer in defn.enabled_layers():
        for i, entry in enumerate(layer.fetch):
            key = f"fetch[{i}]"
            if entry["when"] and _render(layer, f"{key}.when", entry["when"], defn) in SKIP:
                continue
            name = f"{layer.name}: {entry['name']}"
            remote = Remote(
                url=_render(layer, f"{key}.url", entry["url"], defn),
                sha256=_render(layer, f"{key}.sha256", entry["sha256"], defn).strip().lower(),
                name=name,
            )
            inputs.append(LayerInput(layer.name, remote, entry["dest"], int(entry["mode"], 8)))
    return inputs


def fetch_inputs(defn: Definition) -> list[tuple[LayerInput, Path]]:
    """Every layer input, from the sha256-addressed cache (downloaded or resumed when missing)."""
    return [(item, fetch(item.remote)) for item in layer_inputs(defn)]
