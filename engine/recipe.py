"""Recipes: the typed top-level config of a run, loaded from YAML with `--set` overrides.

A recipe names its representation, guidance and prior plugins by registry name; `resolve_recipe`
fills every plugin's config with its defaults and checks every key and every capability the
recipe relies on (export formats, what a stage is seeded from), so config.yaml in a run
directory is complete and a mistake fails before any work starts.

A recipe with `stages:` is a pipeline (engine/pipeline.py): each stage is a recipe of its own.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill3d.engine.cameras import CameraSamplerConfig
from distill3d.engine.config import ConfigError, apply_overrides, bounded, from_dict, load_yaml, to_dict
from distill3d.engine.reference_view import ReferenceViewConfig
from distill3d.engine.schedules import Schedule, ScheduleSpec

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainerConfig:
    steps: int = bounded(10000, min=1)
    batch_size: int = bounded(1, min=1)
    resolution: ScheduleSpec = bounded(64, min=8, max=4096)  # render size; may be scheduled (e.g. 128 -> 256 -> 512)
    lr_scale: float = bounded(1.0, gt=0)  # multiplies every parameter group's learning rate
    betas: tuple[float, float] = bounded((0.9, 0.99), min=0.0, max=0.9999)
    checkpoint_every: int = bounded(500, min=1)
    keep_checkpoints: int = bounded(2, min=1)
    log_every: int = bounded(10, min=1)
    eval_views: int = bounded(8, min=1)
    eval_resolution: int = bounded(64, min=8, max=4096)
    video_frames: int = bounded(60, min=1)
    video_resolution: int = bounded(128, min=8, max=4096)
    video_fps: int = bounded(20, min=1, max=120)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: bool = True  # fp16 autocast on CUDA; ignored on CPU
    threads: int = bounded(0, min=0)  # CPU threads for torch (0: leave torch's default)
    export: list[str] = field(default_factory=list)  # formats written at the end (what the representation exports)
    export_resolution: int = bounded(128, min=16, max=1024)  # surface extraction grid for exports
    export_texture_size: int = bounded(1024, min=16, max=8192)
    # On CPU, a turntable that would take longer than this is rendered smaller (0: never).
    cpu_video_budget_s: float = bounded(120.0, min=0.0)


@dataclass
class StageConfig:
    """One stage of a pipeline: a recipe run in OUT/<name>, seeded from an earlier stage."""

    name: str
    recipe: str  # shipped recipe name or a .yaml path (relative paths: next to the pipeline file)
    set: list[str] = field(default_factory=list)  # the stage's own overrides (the user's --set wins)
    init_from: str | None = "previous"  # "previous", another stage's name, or null


@dataclass
class RecipeConfig:
    name: str = "custom"
    description: str = ""
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    scene: str | None = None  # ground truth for oracle priors and evaluation: scene file, mesh file or shipped scene name
    reference_view: ReferenceViewConfig | None = None  # image-to-3D input image and its camera
    init_from: str | None = None  # a finished run directory to seed the representation from (coarse-to-fine)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cameras: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    representation: dict[str, Any] = field(default_factory=lambda: {"name": "nerf"})
    priors: dict[str, Any] = field(default_factory=dict)  # built once, shared by name (guidance `prior: NAME`)
    guidance: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "sds"}])
    stages: list[StageConfig] = field(default_factory=list)  # a pipeline (engine/pipeline.py)


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


def _nested_plugin_kind(f: dataclasses.Field) -> str | None:
    """Config fields holding another plugin: metadata {"plugin": kind}, or a field named `prior`."""
    kind = f.metadata.get("plugin") if f.metadata else None
    return kind or ("prior" if f.name == "prior" else None)


def _resolve_plugin(kind: str, spec: Any, path: str, prior_names: tuple[str, ...] = ()) -> dict:
    """{'name': ..., **all config fields with defaults}, nested plugin specs resolved too; a
    nested prior given by name must be declared under the recipe's `priors:`."""
    from distill3d.plugins.registry import parse_plugin_spec

    name, _, config = parse_plugin_spec(kind, spec, path)
    resolved = {"name": name, **to_dict(config)}
    for f in dataclasses.fields(config):
        nested_kind = _nested_plugin_kind(f)
        value = resolved.get(f.name)
        if nested_kind and isinstance(value, dict):
            resolved[f.name] = _resolve_plugin(nested_kind, value, f"{path}.{f.name}", prior_names)
        elif nested_kind == "prior" and isinstance(value, str) and value not in prior_names:
            known = ", ".join(prior_names) or "none declared"
            raise ConfigError(f"{path}.{f.name}: no prior named {value!r} under the recipe's priors: ({known})")
    return resolved


def _check_trainer(tc: TrainerConfig) -> None:
    """What the field ranges cannot say, checked before any work starts."""
    resolution = Schedule.parse(tc.resolution, "trainer.resolution").resolve(tc.steps)
    if any(v != int(v) for _, v in resolution.points):
        raise ConfigError(f"trainer.resolution must be whole numbers of pixels, got {tc.resolution!r}")


def check_capabilities(recipe: RecipeConfig, source_representation: str | None = None) -> None:
    """What the recipe relies on must be something its representation can do: the export formats,
    and being seeded from `source_representation` (a registry name) when it has one."""
    from distill3d.plugins.registry import Registry

    registry = Registry("representation")
    name = recipe.representation["name"]
    cls = registry.get(name)
    missing = [f for f in recipe.trainer.export if f not in cls.exports]
    if missing:
        can = ", ".join(cls.exports) or "nothing"
        raise ConfigError(f"trainer.export: representation {name!r} cannot export {missing[0]!r} (it exports: {can})")
    if source_representation is not None:
        source = registry.get(source_representation)
        if not set(cls.accepts_init) & set(source.provides):
            raise ConfigError(
                f"init_from: representation {name!r} cannot be seeded from a {source_representation!r} run "
                f"({name} accepts {', '.join(cls.accepts_init) or 'nothing'}; {source_representation} provides "
                f"{', '.join(source.provides) or 'nothing'})"
            )


def resolve_recipe(data: dict) -> RecipeConfig:
    """Typed recipe with every plugin config checked and filled with defaults (not a pipeline:
    see engine/pipeline.py for recipes with stages)."""
    recipe = from_dict(RecipeConfig, copy.deepcopy(data), "")
    if recipe.stages:
        raise ConfigError(f"{recipe.name}: a recipe with stages is a pipeline; load it with engine.pipeline.load_pipeline")
    recipe.representation = _resolve_plugin("representation", recipe.representation, "representation")
    recipe.priors = {str(k): _resolve_plugin("prior", v, f"priors.{k}") for k, v in recipe.priors.items()}
    names = tuple(recipe.priors)
    if not isinstance(recipe.guidance, list) or not recipe.guidance:
        raise ConfigError("guidance: expected a non-empty list of guidance entries")
    recipe.guidance = [_resolve_plugin("guidance", g, f"guidance.{i}", names) for i, g in enumerate(recipe.guidance)]
    _check_trainer(recipe.trainer)
    check_capabilities(recipe)
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    return resolve_recipe(load_recipe_data(name_or_path, overrides))
