"""Plugin discovery through Python entry points (the nerfstudio model, not import side effects).

Groups:
  distill3d.representations  -> Representation subclasses (nerf, dmtet, gaussians, ...)
  distill3d.guidance         -> Guidance subclasses (sds, reference, ...)
  distill3d.priors           -> Prior subclasses (oracle, stable-diffusion, ...)

The built-ins register through this project's own pyproject, exactly as a third party does.
Discovery reads entry-point metadata only; a plugin's module is imported when it is asked for.
Names are unique across distributions (a clash names both); an unknown name lists the available
ones; a plugin that fails to import is reported by name without breaking the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from distill3d.engine.errors import UserError

GROUPS = {
    "representation": "distill3d.representations",
    "guidance": "distill3d.guidance",
    "prior": "distill3d.priors",
}


class PluginError(UserError):
    """A plugin that cannot be found, is ambiguous, or fails to load."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str  # "module:attr"
    distribution: str


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "unknown distribution"


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

    def names(self) -> list[str]:
        return sorted(self._entry_points())

    def get(self, name: str) -> Any:
        """The plugin class registered under name, imported on first use."""
        if name in self._loaded:
            return self._loaded[name]
        found = self._entry_points()
        if name not in found:
            available = ", ".join(sorted(found)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; available: {available}")
        eps = found[name]
        if len(eps) > 1:
            who = " and ".join(f"{_distribution_name(e)} ({e.value})" for e in eps)
            raise PluginError(f"{self.kind} name {name!r} is registered twice: by {who}; uninstall one of them")
        ep = eps[0]
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised raw
            raise PluginError(
                f"{self.kind} plugin {name!r} from {_distribution_name(ep)} ({ep.value}) failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not hasattr(cls, "Config"):
            raise PluginError(f"{self.kind} plugin {name!r} ({ep.value}) has no Config dataclass")
        self._loaded[name] = cls
        return cls

    def check(self, name: str) -> str | None:
        """None if the plugin loads, else the reason it does not (for `distill3d plugins`)."""
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
    cls = Registry(kind).get(name)
    return name, cls, from_dict(cls.Config, fields, path)


def build_plugin(kind: str, spec: Any, ctx: Any, path: str) -> Any:
    """Instantiate a plugin from a recipe mapping {"name": ..., **config}."""
    _, cls, config = parse_plugin_spec(kind, spec, path)
    return cls(config, ctx)
