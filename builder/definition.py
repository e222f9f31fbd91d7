"""Image definitions: one settings table, layer metadata, env overrides, validation and summaries.

A definition is a schema-versioned YAML file. Every key is checked against `SETTINGS` (and each layer's
`settings` from its layer.yaml); unknown keys, wrong types and bad values are all collected and
reported at once as a DefinitionError. The resolved data has every field, defaults filled in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Final

import yaml

from builder import DEFAULT_DEFINITION, LAYERS_DIR, TEMPLATES_DIR
from builder.errors import DefinitionError, StrataError
from builder.schema import Field, did_you_mean, field_from_spec, parse_env, type_label, validate

SCHEMA_VERSION: Final = 1

_FIRMWARE: Final = ("uefi", "bios")
_LAYER_NAME: Final = r"[a-z0-9][a-z0-9_-]*"


def _choice_list(name: str, help: str, choices: tuple[str, ...], default: list[str], **kw: Any) -> Field:
    return Field(name, "list", help, default=default, items=Field(name, "str", choices=choices), **kw)


_STR_ITEM: Final = Field("item", "str")

SETTINGS: Final[tuple[Field, ...]] = (
    Field(
        "schema",
        "int",
        f"Definition format version; this strata reads {SCHEMA_VERSION}.",
        required=True,
        min=1,
        max=SCHEMA_VERSION,
    ),
    Field(
        "name",
        "str",
        "Image name; artifacts are written to artifacts/<name>/.",
        default="strata",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
    ),
    Field(
        "os",
        "object",
        "The Debian base system.",
        fields=(
            Field(
                "suite",
                "str",
                "Debian suite to bake.",
                default="trixie",
                choices=("trixie", "bookworm"),
                env="STRATA_SUITE",
            ),
            Field("arch", "str", "CPU architecture.", default="amd64", choices=("amd64",)),
            Field(
                "mirror",
                "url",
                "Debian archive mirror.",
                default="http://deb.debian.org/debian",
                env="DEBIAN_MIRROR",
            ),
            Field(
                "security_mirror",
                "url",
                "Debian security archive mirror.",
                default="http://deb.debian.org/debian-security",
                env="DEBIAN_SECURITY_MIRROR",
            ),
            _choice_list(
                "components",
                "Archive components to enable.",
                ("main", "contrib", "non-free", "non-free-firmware"),
                ["main"],
                non_empty=True,
            ),
            Field("packages", "list", "Extra Debian packages to install.", default=[], items=_STR_ITEM),
            Field(
                "hostname",
                "str",
                "Hostname of the booted appliance.",
                default="strata",
                pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            ),
            Field(
                "timezone",
                "str",
                "Time zone, as a tz database name.",
                default="Etc/UTC",
                pattern=r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$",
            ),
            Field("locale", "str", "Default locale.", default="C.UTF-8", pattern=r"^[A-Za-z0-9_.@-]+$"),
            Field(
                "kernel_cmdline", "list", "Extra kernel command-line arguments.", default=[], items=_STR_ITEM
            ),
        ),
    ),
    Field(
        "disk",
        "object",
        "The disk image.",
        fields=(
            Field(
                "size",
                "size",
                'Disk size; "auto" is the content plus headroom.',
                default="auto",
                allow_auto=True,
            ),
            _choice_list(
                "formats",
                "Image formats to write (iso: a hybrid installer ISO for CD and USB stick).",
                ("raw", "qcow2", "iso"),
                ["raw", "qcow2", "iso"],
                non_empty=True,
            ),
            _choice_list(
                "firmware", "Firmware the image boots with.", _FIRMWARE, list(_FIRMWARE), non_empty=True
            ),
        ),
    ),
    Field(
        "iso",
        "object",
        "The installer ISO (when disk.formats lists iso).",
        fields=(
            Field(
                "timeout", "int", "Seconds the boot menu waits before its default, Install.", default=5, min=0
            ),
            Field(
                "install_target",
                "str",
                "Install unattended to this disk: a path, a /dev/disk/by-id name or largest-empty; "
                "empty asks on the console (a seed's strata-install.conf can also name it).",
                default="",
                pattern=r"(largest-empty|/dev/[A-Za-z0-9/_.:+-]+|[A-Za-z0-9_.:+-]+)?",
            ),
            Field(
                "install_force",
                "bool",
                "Let an unattended install erase a disk that holds partitions or a filesystem.",
                default=False,
            ),
        ),
    ),
    Field(
        "verify",
        "object",
        "The boot test in a virtual machine.",
        fields=(
            Field("memory", "int", "VM memory in MiB.", default=2048, min=512),
            Field("cpus", "int", "VM CPU count.", default=2, min=1),
            Field("boot_timeout", "int", "Seconds to wait for the appliance to come up.", default=900, min=1),
            Field(
                "parallel",
                "int",
                "VMs verify boots at once (qcow2 and ISO installs, per firmware); bench uses 1.",
                default=2,
                min=1,
            ),
            Field(
                "ready_timeout",
                "int",
                "Seconds from power-on to wait for the agent to reach `ready` (activation from the seed).",
                default=1800,
                min=1,
            ),
            Field(
                "accel",
                "str",
                "VM accelerator; auto uses kvm when /dev/kvm is usable.",
                default="auto",
                choices=("auto", "kvm", "tcg"),
                env="STRATA_ACCEL",
            ),
            _choice_list(
                "firmware",
                "Firmware to boot-test (default: disk.firmware).",
                _FIRMWARE,
                list(_FIRMWARE),
                non_empty=True,
            ),
        ),
    ),
    Field("layers", "map", "Per-layer settings, keyed by layer folder name.", default={}),
)

_ROOT: Final = Field("definition", "object", fields=SETTINGS)

_LAYER_META: Final = Field(
    "layer",
    "object",
    fields=(
        Field("description", "str", required=True),
        Field("order", "int", required=True),
        Field("default_enabled", "bool", default=True),
        Field("packages", "list", default=[], items=_STR_ITEM),
        Field("settings", "map", default={}),
        Field("requires", "list", default=[], items=Field("layer", "str", pattern=_LAYER_NAME)),
        Field("templates", "map", default={}, items=_STR_ITEM),
        Field(
            "fetch",
            "list",
            default=[],
            items=Field(
                "input",
                "object",
                fields=(
                    Field("name", "str", required=True),
                    Field("url", "str", required=True),
                    Field("sha256", "str", required=True),
                    Field("dest", "str", required=True, pattern=r"/.+"),
                    Field("mode", "str", default="0644", pattern=r"0[0-7]{3}"),
                    Field("when", "str", default=""),
                ),
            ),
        ),
    ),
)


# ---------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _parse_yaml(text: str, file: Path) -> tuple[Any, str | None]:
    """The parsed document, or None and a `<file>: line L, column C: ...` problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader), None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return None, f"{file}: {where}invalid YAML: {exc.problem or exc.context}"
    except yaml.YAMLError as exc:
        return None, f"{file}: invalid YAML: {exc}"


# ---------------------------------------------------------------- layers


@dataclass
class Layer:
    """A folder under layers/ with a layer.yaml: what it bakes in and which settings it takes."""

    name: str
    path: Path
    description: str
    order: int
    default_enabled: bool = True
    packages: list[str] = dataclass_field(default_factory=list)
    settings: tuple[Field, ...] = ()
    requires: list[str] = dataclass_field(default_factory=list)
    templates: dict[str, str] = dataclass_field(default_factory=dict)  # target path -> template
    # remote inputs: name, url, sha256 (Jinja over the layer's settings), dest in the image, mode
    fetch: list[dict[str, str]] = dataclass_field(default_factory=list)


def layer_field(layer: Layer) -> Field:
    """The object Field a layer's entry under `layers:` is validated against."""
    enabled = Field("enabled", "bool", "Bake this layer.", default=layer.default_enabled)
    return Field(layer.name, "object", layer.description, fields=(enabled, *layer.settings))


def discover_layers(layers_dir: Path = LAYERS_DIR) -> list[Layer]:
    """Every folder in `layers_dir` that has a layer.yaml, sorted by (order, name)."""
    if not layers_dir.is_dir():
        raise StrataError(f"layers folder not found: {layers_dir}")
    folders = sorted(p for p in layers_dir.iterdir() if (p / "layer.yaml").is_file())
    layers = [_read_layer(folder) for folder in folders]
    _check_requires_exist(layers)
    return sorted(layers, key=lambda layer: (layer.order, layer.name))


def _read_layer(folder: Path) -> Layer:
    file = folder / "layer.yaml"
    if re.fullmatch(_LAYER_NAME, folder.name) is None:
        raise StrataError(f"{file}: layer folder name {folder.name!r} is not allowed; expected {_LAYER_NAME}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StrataError(f"{file}: cannot read layer metadata ({exc})") from None
    raw, syntax_problem = _parse_yaml(text, file)
    if syntax_problem:
        raise StrataError(syntax_problem)
    problems: list[str] = []
    meta = validate(_LAYER_META, {} if raw is None else raw, "", problems, folder)
    if problems:
        raise StrataError(f"{file}: invalid layer metadata:\n" + "\n".join(f"  - {p}" for p in problems))
    if "enabled" in meta["settings"]:
        raise StrataError(f"{file}: settings.enabled: reserved key; expected another setting name")
    settings = tuple(
        field_from_spec(name, spec, str(file), f"settings.{name}") for name, spec in meta["settings"].items()
    )
    return Layer(
        name=folder.name,
        path=folder,
        description=meta["description"],
        order=meta["order"],
        default_enabled=meta["default_enabled"],
        packages=meta["packages"],
        settings=settings,
        requires=meta["requires"],
        templates=_checked_templates(file, meta["templates"]),
        fetch=meta["fetch"],
    )


def _checked_templates(file: Path, templates: dict[str, str]) -> dict[str, str]:
    for target, template in templates.items():
        if not target.startswith("/"):
            raise StrataError(f"{file}: templates.{target}: expected an absolute target path")
        if not (TEMPLATES_DIR / template).is_file():
            raise StrataError(
                f"{file}: templates.{target}: template {template} not found under {TEMPLATES_DIR}"
            )
    return templates


def _check_requires_exist(layers: list[Layer]) -> None:
    names = sorted(layer.name for layer in layers)
    for layer in layers:
        for required in layer.requires:
            if required not in names:
                raise StrataError(
                    f"{layer.path / 'layer.yaml'}: requires: unknown layer {required!r}"
                    f"{did_you_mean(required, names)}; expected one of: {', '.join(names)}"
                )


# ---------------------------------------------------------------- environment


def _env_fields(layers: list[Layer]) -> list[tuple[str, Field]]:
    """(field path, Field) for every field that an environment variable can override."""
    found: list[tuple[str, Field]] = []
    for field in SETTINGS:
        found += _walk_env(field, field.name)
    for layer in layers:
        found += _walk_env(layer_field(layer), f"layers.{layer.name}")
    return found


def _walk_env(field: Field, path: str) -> list[tuple[str, Field]]:
    found = [(path, field)] if field.env else []
    for sub in field.fields:
        found += _walk_env(sub, f"{path}.{sub.name}")
    return found


def _apply_env(
    raw: dict[str, Any], fields: list[tuple[str, Field]], environ: Mapping[str, str], base_dir: Path
) -> tuple[dict[str, str], list[str]]:
    """Write set, non-empty variables into `raw`; return {field path: variable} and bad-value problems."""
    sources: dict[str, str] = {}
    problems: list[str] = []
    for path, field in fields:
        variable = field.env or ""
        text = environ.get(variable, "")
        if not text:
            continue
        source = f"{variable}={text}"
        try:
            value = parse_env(field, text)
        except ValueError as exc:
            problems.append(f"{source} ({path}): {exc}")
            continue
        found: list[str] = []
        validate(field, value, path, found, base_dir)
        if found:
            problems += [_env_problem(source, problem) for problem in found]
            continue
        _set_dotted(raw, path, value)
        sources[path] = variable
    return sources, problems


def _env_problem(source: str, problem: str) -> str:
    """`verify.accel: ...` becomes `STRATA_ACCEL=foo (verify.accel): ...`."""
    path, _, message = problem.partition(": ")
    return f"{source} ({path}): {message}"


def _set_dotted(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            return  # validation reports the wrong type
        node = node[key]
    node[last] = value


# ---------------------------------------------------------------- loading


@dataclass
class Definition:
    """A validated definition: `data` holds every field, defaults filled in."""

    path: Path
    data: dict[str, Any]
    layers: list[Layer]
    env_sources: dict[str, str] = dataclass_field(default_factory=dict)  # field path -> variable

    def enabled_layers(self) -> list[Layer]:
        """Enabled layers in bake order."""
        return [layer for layer in self.layers if self.data["layers"][layer.name]["enabled"]]

    def enabled(self, name: str) -> bool:
        """Whether layer `name` exists and is enabled."""
        return bool(self.data["layers"].get(name, {}).get("enabled"))

    def layer_settings(self, name: str) -> dict[str, Any]:
        """A layer's resolved settings, `enabled` included."""
        if name not in self.data["layers"]:
            known = ", ".join(layer.name for layer in self.layers)
            raise StrataError(f"unknown layer {name!r}; expected one of: {known}")
        settings: dict[str, Any] = self.data["layers"][name]
        return settings

    def get(self, dotted: str) -> Any:
        """A resolved value by field path, e.g. `get("os.suite")`."""
        value: Any = self.data
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise KeyError(f"no field {dotted!r} in the definition")
            value = value[key]
        return value

    def to_json(self) -> str:
        """The resolved data as stable JSON (sorted keys), for the build manifest."""
        return json.dumps(self.data, sort_keys=True, indent=2, default=str)

    def digest(self) -> str:
        """sha256 of `to_json()`: identifies what an image was baked from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def tree_digest(self) -> str:
        """sha256 of what the prepared tree depends on (not output formats, ISO or verify settings)."""
        keep = {key: self.data[key] for key in ("schema", "name", "os", "layers") if key in self.data}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def load_definition(
    path: Path | None = None, environ: Mapping[str, str] | None = None, layers_dir: Path = LAYERS_DIR
) -> Definition:
    """Read, override from the environment and validate a definition; DefinitionError lists all problems."""
    file = Path(path) if path is not None else DEFAULT_DEFINITION
    raw = _read_definition(file)
    _check_schema_version(file, raw)
    layers = discover_layers(layers_dir)
    base_dir = file.absolute().parent
    environ = os.environ if environ is None else environ
    sources, problems = _apply_env(raw, _env_fields(layers), environ, base_dir)
    data = validate(_ROOT, raw, "", problems, base_dir)
    data["layers"] = _validate_layers(layers, data["layers"], problems, base_dir)
    problems += _firmware_problems(raw, data) + _requires_problems(layers, data)
    if problems:
        raise DefinitionError([f"{file}: {problem}" for problem in problems])
    return Definition(path=file.absolute(), data=data, layers=layers, env_sources=sources)


def _read_definition(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise StrataError(
            f"definition file not found: {file}; pass --definition PATH to an existing file"
        ) from None
    raw, syntax_problem = _parse_yaml(text, file)
    if syntax_problem:
        raise DefinitionError([syntax_problem])
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DefinitionError(
            [f"{file}: top level is a {type(raw).__name__}; expected a mapping of settings"]
        )
    return raw


def _check_schema_version(file: Path, raw: dict[str, Any]) -> None:
    version = raw.get("schema")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise DefinitionError(
            [
                f"{file}: schema: this definition needs a newer strata "
                f"(schema {version}, this strata supports {SCHEMA_VERSION})"
            ]
        )


def _validate_layers(layers: list[Layer], value: Any, problems: list[str], base_dir: Path) -> dict[str, Any]:
    """Each layer's entry (absent or null means all defaults); unknown layer names are problems."""
    entries: dict[str, Any] = value if isinstance(value, dict) else {}
    names = [layer.name for layer in layers]
    for name in entries:
        if name not in names:
            problems.append(
                f"layers.{name}: unknown layer{did_you_mean(name, names)}; "
                f"expected one of the available layers: {', '.join(sorted(names))}"
            )
    return {
        layer.name: validate(
            layer_field(layer), entries.get(layer.name) or {}, f"layers.{layer.name}", problems, base_dir
        )
        for layer in layers
    }


def _firmware_problems(raw: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """verify.firmware defaults to disk.firmware; when set it must be a subset of it."""
    disk, verify = data["disk"]["firmware"], data["verify"]["firmware"]
    if disk is None or verify is None:
        return []
    raw_verify = raw.get("verify")
    if not (isinstance(raw_verify, dict) and raw_verify.get("firmware") is not None):
        data["verify"]["firmware"] = list(disk)
        return []
    extra = [fw for fw in verify if fw not in disk]
    if not extra:
        return []
    return [
        f"verify.firmware: {', '.join(extra)} not in disk.firmware; expected a subset of {', '.join(disk)}"
    ]


def _requires_problems(layers: list[Layer], data: dict[str, Any]) -> list[str]:
    enabled = {name for name, settings in data["layers"].items() if settings and settings["enabled"]}
    return [
        f"layers.{layer.name}: requires layer {required!r}, which is disabled; "
        f"expected layers.{required}.enabled: true or layers.{layer.name}.enabled: false"
        for layer in layers
        if layer.name in enabled
        for required in layer.requires
        if required not in enabled
    ]


# ---------------------------------------------------------------- summary and docs


def summary(defn: Definition) -> str:
    """An aligned, sectioned `key: value` overview; values set from the environment say so."""
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("Definition", [("file", str(defn.path)), ("name", defn.data["name"]), ("digest", defn.digest())])
    ]
    for field in SETTINGS:
        if field.type == "object":
            sections.append((field.name, _rows(field, defn.data[field.name], field.name, defn.env_sources)))
    for layer in defn.layers:
        path = f"layers.{layer.name}"
        rows = _rows(layer_field(layer), defn.data["layers"][layer.name], path, defn.env_sources)
        sections.append((f"Layer {layer.name} ({layer.description})", rows))
    width = max(len(key) for _, rows in sections for key, _ in rows)
    lines: list[str] = []
    for title, rows in sections:
        lines += ["", f"{title}:"] if lines else [f"{title}:"]
        for key, text in rows:
            first, *rest = text.split("\n")
            lines.append(f"  {key:>{width}}: {first}")
            lines += [" " * (width + 4) + line for line in rest]
    return "\n".join(lines) + "\n"


def _rows(
    field: Field, value: dict[str, Any], path: str, sources: Mapping[str, str]
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for sub in field.fields:
        sub_path, sub_value = f"{path}.{sub.name}", value.get(sub.name)
        if sub.type == "object" and isinstance(sub_value, dict):
            rows += [(f"{sub.name}.{key}", text) for key, text in _rows(sub, sub_value, sub_path, sources)]
            continue
        text = _format(sub, sub_value)
        if sub_path in sources:
            text += f" (from {sources[sub_path]})"
        rows.append((sub.name, text))
    return rows


def _format(field: Field, value: Any) -> str:
    if field.type == "size" and isinstance(value, int):
        return _human_size(value)
    if isinstance(value, list):
        if not value:
            return "(none)"
        separator = "\n" if all(isinstance(item, dict) for item in value) else ", "
        return separator.join(_inline(item, outer=True) for item in value)
    return _inline(value, outer=True)


def _inline(value: Any, outer: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        text = ", ".join(
            f"{key}={_inline(item)}" for key, item in value.items() if item not in (None, [], {})
        )
        return text if outer else "{" + text + "}"
    return str(value)


def _human_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            amount = size / factor
            return f"{amount:g} {unit}" if size % factor == 0 else f"{amount:.2f} {unit}"
    return f"{size} bytes"


def env_rows(layers_dir: Path = LAYERS_DIR) -> list[tuple[str, str, str, str]]:
    """(variable, field path, type, help) for every field an environment variable overrides."""
    return [
        (field.env or "", path, type_label(field), field.help)
        for path, field in _env_fields(discover_layers(layers_dir))
    ]


def env_table_markdown(layers_dir: Path = LAYERS_DIR) -> str:
    """The environment overrides as a Markdown table."""
    lines = ["| Variable | Field | Type | Meaning |", "| --- | --- | --- | --- |"]
    for variable, path, type_name, help in env_rows(layers_dir):
        cells = (f"`{variable}`", f"`{path}`", type_name, help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
