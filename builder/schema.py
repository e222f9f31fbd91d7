"""A small declarative field-spec language, shared by Python settings tables and layer.yaml files.

A `Field` describes one setting. `validate()` checks a value against it, collecting every problem as
`<field path>: <what is wrong>; expected <what>` and returning the value normalised (defaults filled in,
paths made absolute, sizes in bytes). `field_from_spec()` builds a Field from a YAML mapping.
"""

from __future__ import annotations

import copy
import difflib
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from builder.errors import StrataError


class _Missing(enum.Enum):
    MISSING = "MISSING"


MISSING: Final = _Missing.MISSING
"""Default of a field that has no default."""

TYPES: Final = ("str", "int", "bool", "list", "object", "map", "path", "url", "size", "any")
"""Field types; `any` accepts anything and is meant for internal tables."""

_SIZE_UNITS: Final = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_ENV_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_ENV_FALSE: Final = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Field:
    """One setting: its type, documentation, default and constraints."""

    name: str
    type: str
    help: str = ""
    default: Any = MISSING
    required: bool = False
    choices: tuple[Any, ...] | None = None
    items: Field | None = None  # element type of a list, value type of a map; None accepts anything
    fields: tuple[Field, ...] = ()  # keys of an object
    env: str | None = None  # environment variable that overrides the field
    pattern: str | None = None  # regex a str must fully match
    min: int | None = None
    max: int | None = None
    exactly_one_of: tuple[str, ...] = ()  # object keys of which exactly one must be set
    allow_auto: bool = False  # a size may be "auto"
    non_empty: bool = False  # a list must have at least one item


# ---------------------------------------------------------------- descriptions


def describe(field: Field) -> str:
    """What a valid value looks like, for the `expected ...` part of a problem."""
    if field.choices is not None:
        return "one of " + ", ".join(str(c) for c in field.choices)
    match field.type:
        case "str":
            return f"a string matching {field.pattern}" if field.pattern else "a string"
        case "int":
            return "an integer" + _bounds(field)
        case "bool":
            return "true or false"
        case "list":
            return ("a non-empty list of " if field.non_empty else "a list of ") + plural(field.items)
        case "map":
            return "a mapping of names to " + plural(field.items)
        case "object":
            return "a mapping with keys: " + ", ".join(f.name for f in field.fields)
        case "path":
            return "a path (relative to the definition file) to an existing file or folder"
        case "url":
            return "an http://, https:// or file:// URL"
        case "size":
            auto = ' or "auto"' if field.allow_auto else ""
            return f'a size in bytes or with a unit, like "512M" or "4G"{auto}'
    return "any value"


def plural(field: Field | None) -> str:
    """Name of several values of a field's type, as in "a list of strings"."""
    if field is None or field.type == "any":
        return "values"
    if field.choices is not None:
        return "values from " + ", ".join(str(c) for c in field.choices)
    names = {"str": "strings", "int": "integers", "bool": "booleans", "list": "lists", "url": "URLs"}
    names |= {"object": "mappings", "map": "mappings", "path": "paths", "size": "sizes"}
    return names[field.type]


def type_label(field: Field) -> str:
    """Short type name for docs tables, e.g. `list of str` or `choice (auto, kvm, tcg)`."""
    if field.choices is not None:
        return "choice (" + ", ".join(str(c) for c in field.choices) + ")"
    if field.type in ("list", "map") and field.items is not None:
        return f"{field.type} of {type_label(field.items)}"
    return field.type


def _bounds(field: Field) -> str:
    if field.min is not None and field.max is not None:
        return f" between {field.min} and {field.max}"
    if field.min is not None:
        return f" >= {field.min}"
    if field.max is not None:
        return f" <= {field.max}"
    return ""


def _shown(value: Any) -> str:
    """`int 3`, `string 'yes'`, `null`: how a wrong value is quoted in a problem."""
    if value is None:
        return "null"
    kinds = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} {text}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _add(problems: list[str], path: str, what: str, expected: str) -> None:
    problems.append(f"{path}: {what}; expected {expected}")


def _wrong_type(field: Field, value: Any, path: str, problems: list[str]) -> None:
    _add(problems, path, f"got {_shown(value)}", describe(field))


# ---------------------------------------------------------------- validation

_Checker = Callable[[Field, Any, str, list[str], Path], Any]


def validate(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    """Check `value` against `field`; append problems; return the normalised value (None if invalid)."""
    return _CHECKERS[field.type](field, value, path, problems, base_dir)


def _check_any(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    return value


def _check_choices(field: Field, value: Any, path: str, problems: list[str]) -> bool:
    if field.choices is None or value in field.choices:
        return True
    _add(problems, path, f"unsupported value {value!r}", describe(field))
    return False


def _check_str(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, str):
        _wrong_type(field, value, path, problems)
        return None
    if not _check_choices(field, value, path, problems):
        return None
    if field.pattern is not None and re.fullmatch(field.pattern, value) is None:
        _add(problems, path, f"{value!r} is not allowed", describe(field))
        return None
    return value


def _check_int(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        _wrong_type(field, value, path, problems)
        return None
    if not _check_choices(field, value, path, problems):
        return None
    too_small = field.min is not None and value < field.min
    too_big = field.max is not None and value > field.max
    if too_small or too_big:
        _add(problems, path, f"{value} is out of range", describe(field))
        return None
    return value


def _check_bool(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, bool):
        _wrong_type(field, value, path, problems)
        return None
    return value


def _check_list(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, list):
        _wrong_type(field, value, path, problems)
        return None
    if field.non_empty and not value:
        _add(problems, path, "is empty", describe(field))
        return None
    if field.items is None:
        return list(value)
    return [validate(field.items, item, f"{path}[{i}]", problems, base_dir) for i, item in enumerate(value)]


def _check_map(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, dict):
        _wrong_type(field, value, path, problems)
        return None
    result: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            _add(problems, _join(path, key), f"key {key!r} is not a string", "string keys")
            continue
        result[key] = (
            item if field.items is None else validate(field.items, item, _join(path, key), problems, base_dir)
        )
    return result


def _check_object(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, dict):
        _wrong_type(field, value, path, problems)
        return None
    known = [f.name for f in field.fields]
    for key in value:
        if key not in known:
            _add(
                problems,
                _join(path, key),
                "unknown key" + did_you_mean(key, known),
                "one of: " + ", ".join(known),
            )
    result: dict[str, Any] = {}
    for sub in field.fields:
        sub_path = _join(path, sub.name)
        if value.get(sub.name) is None:
            result[sub.name] = _absent(sub, field, sub_path, problems, base_dir)
        else:
            result[sub.name] = validate(sub, value[sub.name], sub_path, problems, base_dir)
    _check_exactly_one(field, value, path, problems)
    return result


def did_you_mean(key: object, known: list[str]) -> str:
    """` (did you mean 'suite'?)` when `key` is close to one of `known`, else ``."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _absent(sub: Field, parent: Field, path: str, problems: list[str], base_dir: Path) -> Any:
    """Value of a key that is missing (or null) in an object."""
    if sub.required:
        _add(problems, path, "missing required key", describe(sub))
        return None
    if sub.default is not MISSING:
        if sub.default is None:
            return None
        return validate(sub, copy.deepcopy(sub.default), path, problems, base_dir)
    if sub.name in parent.exactly_one_of:
        return None
    empty: dict[str, Any] = {"object": {}, "list": [], "map": {}}
    if sub.type in empty:
        return validate(sub, copy.deepcopy(empty[sub.type]), path, problems, base_dir)
    return None


def _check_exactly_one(field: Field, value: Mapping[str, Any], path: str, problems: list[str]) -> None:
    if not field.exactly_one_of:
        return
    present = [name for name in field.exactly_one_of if value.get(name) is not None]
    if len(present) == 1:
        return
    options = ", ".join(field.exactly_one_of)
    what = "sets both " + " and ".join(present) if present else "sets none of " + options
    _add(problems, path or "(top level)", what, "exactly one of: " + options)


def _check_path(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, str) or not value:
        _wrong_type(field, value, path, problems)
        return None
    resolved = (base_dir / Path(value).expanduser()).resolve()
    if not resolved.exists():
        _add(problems, path, f"file not found: {resolved}", describe(field))
        return None
    return str(resolved)


def _check_url(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if not isinstance(value, str):
        _wrong_type(field, value, path, problems)
        return None
    parts = urlsplit(value)
    web = parts.scheme in ("http", "https") and bool(parts.netloc)
    local = parts.scheme == "file" and bool(parts.path)
    if not (web or local):
        _add(problems, path, f"{value!r} is not a usable URL", describe(field))
        return None
    return value


def _check_size(field: Field, value: Any, path: str, problems: list[str], base_dir: Path) -> Any:
    if field.allow_auto and value == "auto":
        return "auto"
    size = parse_size(value)
    if size is None:
        _add(problems, path, f"got {_shown(value)}", describe(field))
    return size


def parse_size(value: Any) -> int | None:
    """Bytes from an int or a string like "512M", "1.5G", "4GiB" (binary units); None if invalid."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        return None
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    return size if size > 0 else None


_CHECKERS: Final[dict[str, _Checker]] = {
    "str": _check_str,
    "int": _check_int,
    "bool": _check_bool,
    "list": _check_list,
    "object": _check_object,
    "map": _check_map,
    "path": _check_path,
    "url": _check_url,
    "size": _check_size,
    "any": _check_any,
}


# ---------------------------------------------------------------- environment


def parse_env(field: Field, raw: str) -> Any:
    """Turn an environment variable's text into a value for `field`; ValueError says what was expected.

    Lists are comma-separated; paths are resolved against the current directory; choices match
    case-insensitively. Whether a value is allowed is left for `validate()`.
    """
    text = raw.strip()
    match field.type:
        case "bool":
            if text.lower() in _ENV_TRUE | _ENV_FALSE:
                return text.lower() in _ENV_TRUE
            raise ValueError("expected one of 1, 0, true, false, yes, no")
        case "int":
            try:
                return int(text)
            except ValueError:
                raise ValueError("expected an integer") from None
        case "list":
            parts = [part.strip() for part in text.split(",") if part.strip()]
            return parts if field.items is None else [parse_env(field.items, part) for part in parts]
        case "object" | "map" | "any":
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError(f"expected {describe(field)}, written as JSON") from None
        case "path":
            return str(Path(text).expanduser().absolute())
    by_lower = {str(choice).lower(): choice for choice in field.choices or ()}
    return by_lower.get(text.lower(), text)


# ---------------------------------------------------------------- specs from YAML

_ENV_NAME: Final = r"[A-Z][A-Z0-9_]*"
_ANY: Final = Field("value", "any")
_SPEC: Final = Field(
    "spec",
    "object",
    fields=(
        Field("type", "str", required=True, choices=tuple(t for t in TYPES if t != "any")),
        Field("help", "str", default=""),
        Field("default", "any"),
        Field("required", "bool", default=False),
        Field("choices", "list", default=None, items=_ANY, non_empty=True),
        Field("items", "map", default=None),
        Field("fields", "map", default=None),
        Field("env", "str", pattern=_ENV_NAME),
        Field("pattern", "str"),
        Field("min", "int"),
        Field("max", "int"),
        Field("exactly_one_of", "list", items=Field("key", "str"), default=[]),
        Field("allow_auto", "bool", default=False),
        Field("non_empty", "bool", default=False),
    ),
)


def field_from_spec(name: str, spec: Any, where: str, key_path: str | None = None) -> Field:
    """Build a Field from a YAML spec such as `{type: list, items: {type: str}, env: MIRRORS}`.

    `where` names the file the spec came from and `key_path` the spec's key in it (default: `name`);
    a malformed spec raises StrataError naming both.
    """
    key = key_path or name
    problems: list[str] = []
    data = validate(_SPEC, spec, key, problems, Path.cwd())
    if problems:
        raise StrataError(f"{where}: " + f"\n{where}: ".join(problems))
    field = Field(
        name=name,
        type=data["type"],
        help=data["help"],
        default=spec.get("default", MISSING),
        required=data["required"],
        choices=tuple(data["choices"]) if data["choices"] is not None else None,
        items=_sub_spec("items", data["items"], where, f"{key}.items"),
        fields=tuple(
            field_from_spec(n, s, where, f"{key}.fields.{n}") for n, s in (data["fields"] or {}).items()
        ),
        env=data["env"],
        pattern=data["pattern"],
        min=data["min"],
        max=data["max"],
        exactly_one_of=tuple(data["exactly_one_of"]),
        allow_auto=data["allow_auto"],
        non_empty=data["non_empty"],
    )
    conflicts = spec_conflicts(field)
    if conflicts:
        raise StrataError(f"{where}: " + f"\n{where}: ".join(f"{key}: {c}" for c in conflicts))
    return field


def _sub_spec(name: str, spec: dict[str, Any] | None, where: str, key: str) -> Field | None:
    return None if spec is None else field_from_spec(name, spec, where, key)


def spec_conflicts(field: Field) -> list[str]:
    """Attributes that make no sense together, e.g. `items` on a str or a default that fails its own type."""
    only_for = {
        "items": (field.items is not None, ("list", "map")),
        "fields": (bool(field.fields), ("object",)),
        "exactly_one_of": (bool(field.exactly_one_of), ("object",)),
        "pattern": (field.pattern is not None, ("str",)),
        "min": (field.min is not None, ("int",)),
        "max": (field.max is not None, ("int",)),
        "choices": (field.choices is not None, ("str", "int")),
        "allow_auto": (field.allow_auto, ("size",)),
        "non_empty": (field.non_empty, ("list",)),
    }
    conflicts = [
        f"'{attr}' is not allowed for type {field.type}; expected it only on {' or '.join(types)}"
        for attr, (used, types) in only_for.items()
        if used and field.type not in types
    ]
    return conflicts + _reference_conflicts(field) + _default_conflicts(field)


def _reference_conflicts(field: Field) -> list[str]:
    names = [f.name for f in field.fields]
    unknown = [n for n in field.exactly_one_of if n not in names]
    conflicts = (
        [f"exactly_one_of names unknown keys {', '.join(unknown)}; expected keys of fields"]
        if unknown
        else []
    )
    if field.pattern is not None:
        try:
            re.compile(field.pattern)
        except re.error as exc:
            conflicts.append(
                f"pattern {field.pattern!r} is not a valid regex ({exc}); expected a Python regex"
            )
    return conflicts


def _default_conflicts(field: Field) -> list[str]:
    if field.default is MISSING or field.default is None:
        return []
    if field.required:
        return ["has both 'required: true' and a default; expected one of them"]
    if field.type == "path":
        return [] if isinstance(field.default, str) else ["default: not a string; expected a path"]
    problems: list[str] = []
    validate(field, copy.deepcopy(field.default), "default", problems, Path.cwd())
    return problems
