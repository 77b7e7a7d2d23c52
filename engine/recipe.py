"""Recipes: the typed top-level config of a run, loaded from YAML with `--set` overrides.

A recipe names its representation and guidance plugins by registry name; `resolve_recipe` fills
every plugin's config with its defaults and checks every key, so config.yaml in a run directory
is complete and a typo fails before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill3d.engine.cameras import CameraSamplerConfig
from distill3d.engine.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from distill3d.engine.schedules import Schedule, ScheduleSpec

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainerConfig:
    steps: int = 10000
    batch_size: int = 1
    resolution: ScheduleSpec = 64  # render size; may be scheduled (e.g. 128 -> 256 -> 512)
    lr_scale: float = 1.0  # multiplies every parameter group's learning rate
    betas: tuple[float, float] = (0.9, 0.99)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_views: int = 8
    eval_resolution: int = 64
    video_frames: int = 60
    video_resolution: int = 128
    video_fps: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: bool = True  # fp16 autocast on CUDA; ignored on CPU
    threads: int = 0  # CPU threads for torch (0: leave torch's default)
    export: list[str] = field(default_factory=list)  # mesh formats written at the end: glb, obj, ply
    export_resolution: int = 128  # marching-cubes grid for NeRF exports
    export_texture_size: int = 1024


@dataclass
class RecipeConfig:
    name: str = "custom"
    description: str = ""
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    reference: str | None = None  # scene/mesh/image file for the oracle, eval or image-to-3D
    init_from: str | None = None  # a finished run directory to seed the representation from (coarse-to-fine)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cameras: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    representation: dict[str, Any] = field(default_factory=lambda: {"name": "nerf"})
    guidance: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "sds"}])


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(available_recipes())} (or pass a .yaml path)")


def load_recipe_data(name_or_path: str, overrides: list[str] | None = None) -> dict:
    return apply_overrides(load_yaml(recipe_path(name_or_path)), overrides)


def _resolve_plugin(kind: str, spec: Any, path: str) -> dict:
    """{'name': ..., **all config fields with defaults}, nested plugin specs resolved too."""
    from distill3d.plugins.registry import parse_plugin_spec

    name, _, config = parse_plugin_spec(kind, spec, path)
    resolved = {"name": name, **to_dict(config)}
    for f in dataclasses.fields(config):
        nested_kind = f.metadata.get("plugin") if f.metadata else None
        if nested_kind is None and f.name == "prior":
            nested_kind = "prior"
        if nested_kind and isinstance(resolved.get(f.name), dict):
            resolved[f.name] = _resolve_plugin(nested_kind, resolved[f.name], f"{path}.{f.name}")
    return resolved


def resolve_recipe(data: dict) -> RecipeConfig:
    """Typed recipe with every plugin config checked and filled with defaults."""
    recipe = from_dict(RecipeConfig, copy.deepcopy(data), "")
    recipe.representation = _resolve_plugin("representation", recipe.representation, "representation")
    if not isinstance(recipe.guidance, list) or not recipe.guidance:
        raise ConfigError("guidance: expected a non-empty list of guidance entries")
    recipe.guidance = [_resolve_plugin("guidance", g, f"guidance.{i}") for i, g in enumerate(recipe.guidance)]
    Schedule.parse(recipe.trainer.resolution, "trainer.resolution").resolve(recipe.trainer.steps)
    if recipe.trainer.steps <= 0:
        raise ConfigError(f"trainer.steps must be positive, got {recipe.trainer.steps}")
    bad = [f for f in recipe.trainer.export if f not in ("glb", "obj", "ply")]
    if bad:
        raise ConfigError(f"trainer.export: unknown mesh format {bad[0]!r}; use glb, obj or ply")
    if recipe.trainer.batch_size <= 0:
        raise ConfigError(f"trainer.batch_size must be positive, got {recipe.trainer.batch_size}")
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    return resolve_recipe(load_recipe_data(name_or_path, overrides))
