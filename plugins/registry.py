"""Plugin discovery through Python entry points (the nerfstudio model, not import side effects).

Groups:
  distill3d.representations  -> Representation subclasses (nerf, dmtet, gaussians, ...)
  distill3d.guidance         -> Guidance subclasses (sds, reference, ...)
  distill3d.priors           -> Prior subclasses (oracle, stable-diffusion, ...)

The built-ins register through this project's own pyproject, exactly as a third party does.
Discovery reads entry-point metadata only; a plugin's module is imported when it is asked for.
Names are unique across distributions (a clash names both); an unknown name lists the available
ones; a plugin that fails to import (even by calling sys.exit) is reported by name without
breaking the others.

A loaded plugin is checked before it is used: it subclasses its kind's base class, its `Config`
is a dataclass, and it overrides the methods the engine calls (REQUIRED_METHODS). Every failure
names the plugin, its distribution and, when a recipe asked for it, the recipe key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from distill3d.engine.errors import UserError

GROUPS = {
    "representation": "distill3d.representations",
    "guidance": "distill3d.guidance",
    "prior": "distill3d.priors",
}

# Methods a plugin must override; a tuple inside means "at least one of these".
REQUIRED_METHODS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "representation": ("render",),
    "guidance": ("forward",),
    # encode_render's default calls encode_images, so overriding either one is enough.
    "prior": ("predict_noise", ("encode_images", "encode_render"), "conditions"),
}


class PluginError(UserError):
    """A plugin that cannot be found, is ambiguous, fails to load or does not fit its protocol."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str  # "module:attr"
    distribution: str


def base_class(kind: str) -> type:
    from distill3d.engine import interfaces

    return {"representation": interfaces.Representation, "guidance": interfaces.Guidance, "prior": interfaces.Prior}[kind]


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "unknown distribution"


def _at(path: str | None) -> str:
    """Messages start with the recipe key that asked for the plugin, like every config error."""
    return f"{path}: " if path else ""


def protocol_problems(kind: str, cls: Any) -> list[str]:
    """What keeps `cls` from being a usable plugin of this kind (empty when it fits)."""
    base = base_class(kind)
    if not isinstance(cls, type):
        return [f"the entry point is a {type(cls).__name__}, not a class"]
    if not issubclass(cls, base):
        return [f"{cls.__name__} does not subclass {base.__module__}.{base.__name__}"]
    problems = []
    config = getattr(cls, "Config", None)
    if config is None:
        problems.append(f"{cls.__name__} has no Config (a dataclass of its settings)")
    elif not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        problems.append(f"{cls.__name__}.Config is not a dataclass (decorate it with @dataclass)")
    for required in REQUIRED_METHODS[kind]:
        options = required if isinstance(required, tuple) else (required,)
        if not any(getattr(cls, m, None) is not getattr(base, m) for m in options):
            problems.append(f"{cls.__name__} does not implement {' or '.join(o + '()' for o in options)}")
    return problems


class Registry:
    """Plugins of one kind, discovered from the entry-point group."""

    def __init__(self, kind: str):
        if kind not in GROUPS:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(GROUPS)}")
        self.kind = kind
        self.group = GROUPS[kind]
        self._loaded: dict[str, Any] = {}

    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        found: dict[str, list[EntryPoint]] = {}
        seen: set[tuple[str, str]] = set()
        for ep in entry_points(group=self.group):
            key = (ep.name, ep.value)
            # The same distribution visible twice on sys.path (editable + build dir) is not a clash.
            if key in seen:
                continue
            seen.add(key)
            found.setdefault(ep.name, []).append(ep)
        return found

    def infos(self) -> list[PluginInfo]:
        return [
            PluginInfo(self.kind, name, eps[0].value, ", ".join(_distribution_name(e) for e in eps))
            for name, eps in sorted(self._entry_points().items())
        ]

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos() if i.name == name), None)

    def names(self) -> list[str]:
        return sorted(self._entry_points())

    def describe(self, name: str) -> str:
        """"kind plugin 'name' from DIST (module:attr)": how every message names a plugin."""
        info = self.info(name)
        if info is None:
            return f"{self.kind} plugin {name!r}"
        return f"{self.kind} plugin {name!r} from {info.distribution} ({info.value})"

    def get(self, name: str, path: str | None = None) -> Any:
        """The plugin class registered under name, imported and checked on first use.
        `path` is the recipe key that asked for it (named in errors)."""
        if name in self._loaded:
            return self._loaded[name]
        found = self._entry_points()
        if name not in found:
            available = ", ".join(sorted(found)) or "none"
            raise PluginError(f"{_at(path)}unknown {self.kind} {name!r}; available: {available}")
        eps = found[name]
        if len(eps) > 1:
            who = " and ".join(f"{_distribution_name(e)} ({e.value})" for e in eps)
            raise PluginError(f"{_at(path)}{self.kind} name {name!r} is registered twice: by {who}; uninstall one of them")
        ep = eps[0]
        label = f"{_at(path)}{self.kind} plugin {name!r} from {_distribution_name(ep)} ({ep.value})"
        try:
            cls = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - an import failure (even sys.exit) is reported, not raised raw
            raise PluginError(f"{label} failed to load: {type(exc).__name__}: {exc}") from None
        problems = protocol_problems(self.kind, cls)
        if problems:
            raise PluginError(f"{label} is not a usable {self.kind}: {'; '.join(problems)}")
        self._loaded[name] = cls
        return cls

    def check(self, name: str) -> str | None:
        """None if the plugin loads and fits its protocol, else why not (for `distill3d plugins`)."""
        try:
            self.get(name)
        except PluginError as exc:
            return str(exc)
        return None


def parse_plugin_spec(kind: str, spec: Any, path: str) -> tuple[str, Any, Any]:
    """A recipe mapping {"name": ..., **config} -> (name, plugin class, typed config)."""
    from distill3d.engine.config import ConfigError, from_dict

    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{path}: expected a mapping with a 'name' key naming the {kind}")
    fields = dict(spec)
    name = fields.pop("name")
    cls = Registry(kind).get(name, path)
    return name, cls, from_dict(cls.Config, fields, path)


def build_plugin(kind: str, spec: Any, ctx: Any, path: str) -> Any:
    """Instantiate a plugin from a recipe mapping {"name": ..., **config}.

    A ValueError or TypeError from the plugin's constructor is how plugins reject their settings:
    it becomes a user error naming the plugin and the recipe key. Errors of plugins it builds
    itself (a guidance's prior) are already user errors and pass through unchanged."""
    name, cls, config = parse_plugin_spec(kind, spec, path)
    try:
        return cls(config, ctx)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise PluginError(f"{path}: {Registry(kind).describe(name)} rejected its settings: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# `distill3d plugins --show NAME`


def _type_text(tp: Any) -> str:
    """A type as a user reads it: 'float | dict | None', "one of 'a', 'b'"."""
    import types

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not args:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def describe_settings(config_cls: type, indent: str = "  ") -> list[str]:
    """Lines 'key: type = default' for a Config dataclass, nested dataclasses expanded."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        limits = ", ".join(f"{k} {f.metadata[k]}" for k in ("min", "max", "gt") if k in f.metadata)
        suffix = f"  ({limits})" if limits else ""
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{f.name}: {tp.__name__}{suffix}")
            lines.extend(describe_settings(tp, indent + "  "))
            continue
        shown = "(required)" if default is dataclasses.MISSING else f"= {_plain(default)!r}"
        lines.append(f"{indent}{f.name}: {_type_text(tp)} {shown}{suffix}")
    return lines


def _plain(value: Any) -> Any:
    from distill3d.engine.config import to_dict

    return to_dict(value)


def show_plugin(name: str) -> list[str]:
    """The description `distill3d plugins --show NAME` prints (every kind registering NAME)."""
    blocks = []
    for kind in GROUPS:
        registry = Registry(kind)
        if name not in registry.names():
            continue
        cls = registry.get(name)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
        block = [registry.describe(name)]
        if summary:
            block.append(f"  {summary}")
        block.append(f"settings ({cls.Config.__name__}; recipe: {{name: {name}, key: value, ...}}):")
        block.extend(describe_settings(cls.Config))
        blocks.append(block)
    if not blocks:
        available = ", ".join(sorted({n for kind in GROUPS for n in Registry(kind).names()}))
        raise PluginError(f"no plugin named {name!r}; registered: {available}")
    return [line for block in blocks for line in block + [""]][:-1]
