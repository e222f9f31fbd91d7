"""Unit tests for builder.schema and builder.definition, on fake layer trees in tmp_path."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from builder.definition import (
    Definition,
    discover_layers,
    env_rows,
    env_table_markdown,
    load_definition,
    summary,
)
from builder.errors import DefinitionError, StrataError
from builder.schema import Field, field_from_spec, parse_env, parse_size, validate

CONTAINERD_LAYER = """\
description: Container runtime and preloaded images
order: 20
requires: [os]
settings:
  registry_mirrors:
    type: list
    help: Registry mirrors to pull through
    default: []
    env: REGISTRY_MIRRORS
    items: {type: str}
  images:
    type: list
    help: Images to preload
    default: []
    items:
      type: object
      exactly_one_of: [build, archive]
      fields:
        ref: {type: str, required: true}
        build:
          type: object
          fields:
            packages: {type: list, items: {type: str}}
            folder: {type: path}
            entrypoint: {type: list, items: {type: str}}
            cmd: {type: list, items: {type: str}}
        archive: {type: path}
        sandbox: {type: bool, default: false}
"""


def write_layers(root: Path, extra: dict[str, str] | None = None) -> Path:
    """A layers dir with `os` (no settings) and `containerd`, plus `extra` {name: layer.yaml text}."""
    texts = {"os": "description: Debian base\norder: 10\n", "containerd": CONTAINERD_LAYER} | (extra or {})
    layers_dir = root / "layers"
    for name, text in texts.items():
        (layers_dir / name).mkdir(parents=True)
        (layers_dir / name / "layer.yaml").write_text(text)
    return layers_dir


Loader = Callable[..., Definition]


@pytest.fixture
def layers_dir(tmp_path: Path) -> Path:
    return write_layers(tmp_path)


@pytest.fixture
def load(tmp_path: Path, layers_dir: Path) -> Loader:
    """Write a definition (dedented YAML) next to the layers and load it with a clean environment."""

    def _load(text: str, env: dict[str, str] | None = None, name: str = "def.yaml") -> Definition:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return load_definition(path, environ=env or {}, layers_dir=layers_dir)

    return _load


def problems_of(load: Loader, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(DefinitionError) as caught:
        load(text, env)
    return str(caught.value)


# ---------------------------------------------------------------- resolved data


def test_defaults_are_filled_in(load: Loader) -> None:
    defn = load("schema: 1\n")
    assert defn.get("os.suite") == "trixie"
    assert defn.get("os.components") == ["main"]
    assert defn.get("disk.size") == "auto"
    assert defn.get("disk.formats") == ["raw", "qcow2", "iso"]
    assert defn.get("verify.firmware") == ["uefi", "bios"]
    assert defn.data["name"] == "strata"
    assert defn.layer_settings("containerd") == {"enabled": True, "registry_mirrors": [], "images": []}
    assert defn.layer_settings("os") == {"enabled": True}
    assert [layer.name for layer in defn.enabled_layers()] == ["os", "containerd"]


def test_nested_object_defaults_and_paths(load: Loader, tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_text("")
    defn = load(
        """\
        schema: 1
        layers:
          containerd:
            images:
              - {ref: a, archive: img.tar}
              - {ref: b, build: {packages: [curl], folder: .}}
        """
    )
    first, second = defn.layer_settings("containerd")["images"]
    assert first == {"ref": "a", "build": None, "archive": str(tmp_path / "img.tar"), "sandbox": False}
    assert second["build"] == {"packages": ["curl"], "folder": str(tmp_path), "entrypoint": [], "cmd": []}


def test_null_layer_entry_means_defaults(load: Loader) -> None:
    defn = load("schema: 1\nlayers:\n  containerd:\n")
    assert defn.layer_settings("containerd")["enabled"] is True


def test_sizes(load: Loader) -> None:
    assert load("schema: 1\ndisk: {size: 1.5G}\n").get("disk.size") == 1536 * 1024**2
    assert load("schema: 1\ndisk: {size: 4096}\n").get("disk.size") == 4096
    assert "disk.size: got string '12X'" in problems_of(load, "schema: 1\ndisk: {size: 12X}\n")
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size(True) is None
    assert parse_size("0") is None


def test_verify_firmware_follows_disk_firmware(load: Loader) -> None:
    assert load("schema: 1\ndisk: {firmware: [uefi]}\n").get("verify.firmware") == ["uefi"]
    text = "schema: 1\ndisk: {firmware: [uefi]}\nverify: {firmware: [uefi, bios]}\n"
    assert "verify.firmware: bios not in disk.firmware" in problems_of(load, text)


# ---------------------------------------------------------------- problems


def test_unknown_top_level_key(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nflavour: vanilla\n")
    assert (
        "def.yaml: flavour: unknown key; expected one of: schema, name, os, disk, iso, verify, layers"
        in message
    )


def test_unknown_nested_key_suggests_close_match(load: Loader) -> None:
    assert "os.suit: unknown key (did you mean 'suite'?)" in problems_of(
        load, "schema: 1\nos: {suit: trixie}\n"
    )


def test_wrong_type(load: Loader) -> None:
    assert "os.packages: got int 3; expected a list of strings" in problems_of(
        load, "schema: 1\nos: {packages: 3}\n"
    )


def test_bool_must_be_real_bool_and_int_must_not_be_bool(load: Loader) -> None:
    text = """\
        schema: 1
        verify: {cpus: true}
        layers: {containerd: {enabled: "yes"}}
        """
    message = problems_of(load, text)
    assert "verify.cpus: got bool True; expected an integer >= 1" in message
    assert "layers.containerd.enabled: got string 'yes'; expected true or false" in message


def test_bad_choice(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nos: {suite: sid}\n")
    assert "os.suite: unsupported value 'sid'; expected one of trixie, bookworm" in message


def test_bad_pattern_url_and_range(load: Loader) -> None:
    text = "schema: 1\nname: Big_Name\nos: {mirror: 'ftp://x'}\nverify: {memory: 100}\n"
    message = problems_of(load, text)
    assert "name: 'Big_Name' is not allowed; expected a string matching" in message
    assert "os.mirror: 'ftp://x' is not a usable URL" in message
    assert "verify.memory: 100 is out of range; expected an integer >= 512" in message


def test_empty_list_where_one_is_needed(load: Loader) -> None:
    assert "disk.formats: is empty" in problems_of(load, "schema: 1\ndisk: {formats: []}\n")


def test_missing_required_key_names_full_path(load: Loader, tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_text("")
    text = """\
        schema: 1
        layers:
          containerd:
            images:
              - {ref: a, archive: img.tar}
              - {ref: b, archive: img.tar}
              - {archive: img.tar}
        """
    message = problems_of(load, text)
    assert "layers.containerd.images[2].ref: missing required key; expected a string" in message


def test_exactly_one_of(load: Loader, tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_text("")
    text = """\
        schema: 1
        layers:
          containerd:
            images:
              - {ref: a}
              - {ref: b, archive: img.tar, build: {}}
        """
    message = problems_of(load, text)
    assert "layers.containerd.images[0]: sets none of build, archive; expected exactly one of" in message
    assert "layers.containerd.images[1]: sets both build and archive" in message


def test_missing_referenced_file(load: Loader, tmp_path: Path) -> None:
    text = "schema: 1\nlayers: {containerd: {images: [{ref: a, archive: nope.tar}]}}\n"
    message = problems_of(load, text)
    assert f"layers.containerd.images[0].archive: file not found: {tmp_path / 'nope.tar'}" in message


def test_unknown_layer_lists_available_layers(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nlayers: {containerdd: {}}\n")
    assert "layers.containerdd: unknown layer (did you mean 'containerd'?)" in message
    assert "expected one of the available layers: containerd, os" in message


def test_required_layer_disabled(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nlayers: {os: {enabled: false}}\n")
    assert "layers.containerd: requires layer 'os', which is disabled" in message
    assert (
        load("schema: 1\nlayers: {os: {enabled: false}, containerd: {enabled: false}}\n").enabled_layers()
        == []
    )


def test_schema_newer_than_supported(load: Loader) -> None:
    message = problems_of(load, "schema: 2\nos: {whatever: 1}\n")
    assert "schema: this definition needs a newer strata (schema 2, this strata supports 1)" in message
    assert "whatever" not in message  # keys of a newer schema are not reported


def test_schema_is_required(load: Loader) -> None:
    assert "schema: missing required key; expected an integer between 1 and 1" in problems_of(
        load, "name: x\n"
    )


def test_yaml_syntax_error_names_line(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nname: a\n  bad: indent\n")
    assert "def.yaml: line 3, column" in message
    assert "invalid YAML" in message


def test_duplicate_keys_are_rejected(load: Loader) -> None:
    assert "duplicate key 'schema'" in problems_of(load, "schema: 1\nschema: 1\n")


def test_top_level_must_be_a_mapping(load: Loader) -> None:
    assert "top level is a list; expected a mapping" in problems_of(load, "- schema\n")


def test_definition_file_not_found(tmp_path: Path, layers_dir: Path) -> None:
    with pytest.raises(StrataError, match=r"definition file not found: .*nope\.yaml; pass --definition PATH"):
        load_definition(tmp_path / "nope.yaml", environ={}, layers_dir=layers_dir)


def test_all_problems_are_reported_at_once(load: Loader) -> None:
    message = problems_of(load, "schema: 1\nos: {suite: sid}\ndisk: {formats: [vmdk]}\n")
    assert "os.suite: unsupported value 'sid'" in message
    assert "disk.formats[0]: unsupported value 'vmdk'; expected one of raw, qcow2" in message


# ---------------------------------------------------------------- environment


def test_env_override_list(load: Loader) -> None:
    defn = load("schema: 1\n", env={"REGISTRY_MIRRORS": "a, b,,", "STRATA_ACCEL": ""})
    assert defn.layer_settings("containerd")["registry_mirrors"] == ["a", "b"]
    assert defn.get("verify.accel") == "auto"  # empty variables are ignored
    assert defn.env_sources == {"layers.containerd.registry_mirrors": "REGISTRY_MIRRORS"}


def test_env_overrides_file_value(load: Loader) -> None:
    defn = load("schema: 1\nverify: {accel: tcg}\n", env={"STRATA_ACCEL": "KVM"})
    assert defn.get("verify.accel") == "kvm"


def test_bad_env_value_names_variable_and_field(load: Loader) -> None:
    message = problems_of(load, "schema: 1\n", env={"STRATA_ACCEL": "foo"})
    assert (
        "STRATA_ACCEL=foo (verify.accel): unsupported value 'foo'; expected one of auto, kvm, tcg" in message
    )


def test_parse_env() -> None:
    assert parse_env(Field("x", "bool"), "Yes") is True
    assert parse_env(Field("x", "bool"), "0") is False
    assert parse_env(Field("x", "int"), " 42 ") == 42
    assert parse_env(Field("x", "list", items=Field("i", "int")), "1, 2") == [1, 2]
    with pytest.raises(ValueError, match="expected one of 1, 0, true"):
        parse_env(Field("x", "bool"), "maybe")
    with pytest.raises(ValueError, match="expected an integer"):
        parse_env(Field("x", "int"), "many")


# ---------------------------------------------------------------- outputs


def test_to_json_and_digest_are_stable(load: Loader) -> None:
    first = load("schema: 1\nos: {suite: bookworm, arch: amd64}\n", name="a.yaml")
    reordered = load("os: {arch: amd64, suite: bookworm}\nschema: 1\n", name="b.yaml")
    assert first.to_json() == reordered.to_json()
    assert first.digest() == reordered.digest()
    assert len(first.digest()) == 64
    assert load("schema: 1\n", name="c.yaml").digest() != first.digest()


def test_summary_marks_env_values(load: Loader) -> None:
    text = summary(
        load("schema: 1\nlayers: {containerd: {enabled: false}}\n", env={"REGISTRY_MIRRORS": "m1"})
    )
    assert "registry_mirrors: m1 (from REGISTRY_MIRRORS)" in text
    assert "enabled: no" in text
    assert "suite: trixie" in text
    assert "Layer containerd" in text


def test_env_table_lists_layer_variables(layers_dir: Path) -> None:
    assert (
        "REGISTRY_MIRRORS",
        "layers.containerd.registry_mirrors",
        "list of str",
        "Registry mirrors to pull through",
    ) in env_rows(layers_dir)
    table = env_table_markdown(layers_dir)
    assert table.startswith("| Variable | Field | Type | Meaning |\n")
    assert "| `REGISTRY_MIRRORS` | `layers.containerd.registry_mirrors` |" in table
    assert "`STRATA_ACCEL`" in table


# ---------------------------------------------------------------- layers


def test_layers_are_sorted_by_order_then_name(tmp_path: Path) -> None:
    layers_dir = write_layers(tmp_path, {"aaa": "description: a\norder: 20\n"})
    assert [layer.name for layer in discover_layers(layers_dir)] == ["os", "aaa", "containerd"]


@pytest.mark.parametrize(
    ("layer_yaml", "expected"),
    [
        ("description: x\norder: 1\nflavour: y\n", "flavour: unknown key"),
        ("description: x\n", "order: missing required key"),
        (
            "description: x\norder: 1\nsettings: {a: {type: lst}}\n",
            "settings.a.type: unsupported value 'lst'",
        ),
        (
            "description: x\norder: 1\nsettings: {a: {type: str, colour: 1}}\n",
            "settings.a.colour: unknown key",
        ),
        ("description: x\norder: 1\nsettings: {a: [1]}\n", "settings.a: got list [1]; expected a mapping"),
        (
            "description: x\norder: 1\nsettings: {a: {type: str, items: {type: str}}}\n",
            "'items' is not allowed",
        ),
        (
            "description: x\norder: 1\nsettings: {a: {type: int, default: x}}\n",
            "settings.a: default: got string",
        ),
        ("description: x\norder: 1\nrequires: [k8s]\n", "requires: unknown layer 'k8s'"),
        ("description: x\n  order: 1\n", "line 2, column"),
    ],
)
def test_malformed_layer_yaml_names_the_file(tmp_path: Path, layer_yaml: str, expected: str) -> None:
    layers_dir = write_layers(tmp_path, {"broken": layer_yaml})
    with pytest.raises(StrataError) as caught:
        discover_layers(layers_dir)
    message = str(caught.value)
    assert str(layers_dir / "broken" / "layer.yaml") in message
    assert expected in message


def test_field_from_spec_nested() -> None:
    spec: dict[str, Any] = {
        "type": "map",
        "help": "Named things",
        "items": {"type": "object", "fields": {"n": {"type": "int", "min": 1, "default": 1}}},
    }
    field = field_from_spec("things", spec, "layer.yaml")
    problems: list[str] = []
    value = validate(field, {"a": {}, "b": {"n": 0}}, "things", problems, Path("."))
    assert value == {"a": {"n": 1}, "b": {"n": None}}
    assert problems == ["things.b.n: 0 is out of range; expected an integer >= 1"]
