"""Typed configs: dataclasses filled from recipe YAML and `--set key=value` overrides.

`from_dict(Cls, data, path)` builds a dataclass and checks every key and type; errors name the
full dotted key (e.g. `guidance.0.prior.noise_std`) and say what was expected. Plugin configs
sit inside the recipe as plain mappings with a `name` and are checked when the plugin is built.

Also checked for every config: numbers are finite (NaN/inf are rejected), strings are valid
UTF-8 text, and fields declared with `bounded(...)` (field metadata "min", "max", "gt") are in
range, numbers inside lists and schedules included. YAML is read with `1e-3` as a number (plain
YAML 1.1 reads exponents without a dot as strings).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

from distill3d.engine.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the config: the message names the key."""


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 exponent floats: `1e-3` and `5E4` are numbers, not strings."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """YAML text -> data (safe: plain types only), with `1e-3` read as a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def bounded(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
            gt: float | None = None, default_factory: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field whose numbers from_dict checks: min <= x <= max, x > gt (each optional).
    Lists, tuples and schedules are checked number by number (a schedule's values, not its steps)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata.update({k: v for k, v in (("min", min), ("max", max), ("gt", gt)) if v is not None})
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _numbers(value: Any, path: str) -> list[tuple[str, float]]:
    """(key, number) pairs to range-check: a number, the items of a list, a schedule's values."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, (list, tuple)):
        return [pair for i, v in enumerate(value) for pair in _numbers(v, f"{path}.{i}")]
    if isinstance(value, dict) and len(value) == 1:  # {linear|piecewise|...: [[step, value], ...]}
        (kind, points), = value.items()
        if isinstance(points, (list, tuple)):
            return [pair for i, p in enumerate(points) if isinstance(p, (list, tuple)) and len(p) == 2
                    for pair in _numbers(p[1], f"{path}.{kind}.{i}")]
    return []


def check_range(value: Any, metadata: Any, path: str) -> None:
    """Raise ConfigError naming the key when a number breaks the field's min / max / gt."""
    if not metadata or not any(k in metadata for k in ("min", "max", "gt")):
        return
    for key, x in _numbers(value, path):
        if "min" in metadata and x < metadata["min"]:
            raise ConfigError(f"{key}: must be at least {metadata['min']}, got {x!r}")
        if "max" in metadata and x > metadata["max"]:
            raise ConfigError(f"{key}: must be at most {metadata['max']}, got {x!r}")
        if "gt" in metadata and not x > metadata["gt"]:
            raise ConfigError(f"{key}: must be greater than {metadata['gt']}, got {x!r}")


def validate_text(text: str, what: str = "prompt") -> str:
    """Text that can be written as UTF-8. A command-line argument with bytes that are not UTF-8
    arrives as lone surrogates (Python's surrogateescape): say which byte, where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {bad!r}"
        raise ConfigError(
            f"{what}: not valid UTF-8 text ({byte} at position {exc.start}); "
            "write it in UTF-8 (check the terminal's or the file's encoding)"
        ) from None
    return text


def validate_prompt(text: str, what: str = "prompt") -> str:
    """A prompt the priors can encode: valid UTF-8 (see validate_text)."""
    return validate_text(text, what)


def _check_finite(value: Any, path: str) -> None:
    """NaN and inf anywhere in a config value (lists and mappings included) are errors."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}.{i}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{path}.{k}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check value against annotation tp, converting the harmless cases (int -> float, list -> tuple)."""
    _check_finite(value, path)
    if isinstance(value, str):
        validate_text(value, path)
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Annotated:
        # Annotated[T, check, ...]: coerce to T, then each callable check(value, path) may raise ConfigError.
        base, *checks = get_args(tp)
        value = _coerce(value, base, path)
        for check in checks:
            if callable(check):
                check(value, path)
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
            value = float(value)  # "1e-3" quoted, or read by a plain YAML 1.1 loader
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{path}: expected a path, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, naming any unknown key or wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], key_path)
        check_range(kwargs[key], fields[key].metadata, key_path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain YAML-friendly data from dataclasses (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.0.c=value' -> (['a','b','0','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    validate_text(raw, key)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    """Set a nested key in recipe data; list items are addressed by index."""
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        here = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {'.'.join(keys)}: {here} is not an index of a list of {len(node)}")
            node = node[int(key)]
        elif isinstance(node, dict):
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {'.'.join(keys)}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {'.'.join(keys)}: parent is not a mapping")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `--set key.path=value` texts in order; returns data."""
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    return data


def load_yaml(path: Path) -> dict:
    try:
        data = yaml_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data
