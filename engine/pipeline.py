"""Pipelines: a recipe's `stages:` run one after another, each seeded from an earlier one.

The one staging mechanism of the engine: `demo --stages`, `generate --recipe magic3d`, `resume`
and `export` all go through here. A plain recipe is a pipeline of one stage that runs directly in
OUT; a staged recipe runs stage NAME in OUT/NAME and records the resolved stages in
OUT/pipeline.yaml, so `distill3d resume OUT` continues the first unfinished stage and the rest.

Overrides: a plain `key=value` applies to every stage, `STAGE:key=value` to one. Top-level keys
of a staged recipe (prompt, seed, scene, reference_view, priors, ...) are shared by its stages.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from distill3d.engine.checkpoint import atomic_write_text
from distill3d.engine.config import ConfigError, apply_override, apply_overrides, from_dict, load_yaml, to_dict
from distill3d.engine.recipe import RecipeConfig, StageConfig, check_capabilities, recipe_path, resolve_recipe

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PIPELINE_FILE = "pipeline.yaml"
MAIN = "main"
_PIPELINE_ONLY_KEYS = ("name", "description", "stages")

Transform = Callable[[str, dict], None]


@dataclass
class Stage:
    name: str
    recipe: RecipeConfig
    init_from: str | None  # an earlier stage's name, or None

    def run_dir(self, out: Path, single: bool) -> Path:
        return Path(out) if single else Path(out) / self.name


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]

    @property
    def single(self) -> bool:
        return len(self.stages) == 1 and self.stages[0].name == MAIN

    def stage_dirs(self, out: Path) -> list[Path]:
        return [s.run_dir(out, self.single) for s in self.stages]

    def seed_from_source(self, stage: Stage, out: Path) -> None:
        """Point a stage's init_from at the run directory of the stage it is seeded from."""
        if stage.init_from is not None:
            source = next(s for s in self.stages if s.name == stage.init_from)
            stage.recipe.init_from = str(source.run_dir(out, self.single))


def stage_overrides(name: str, overrides: list[str] | None) -> list[str]:
    """'STAGE:key=v' addresses one stage; plain overrides apply to every stage."""
    picked = []
    for text in overrides or []:
        key = text.split("=", 1)[0]
        if ":" not in key:
            picked.append(text)
        elif key.split(":", 1)[0] == name:
            picked.append(text.split(":", 1)[1])
    return picked


def _check_stage_targets(overrides: list[str] | None, names: list[str]) -> None:
    for text in overrides or []:
        key = text.split("=", 1)[0]
        if ":" in key and key.split(":", 1)[0] not in names:
            raise ConfigError(f"override {text!r} names stage {key.split(':', 1)[0]!r}; this recipe's stages: {', '.join(names)}")


def _set_values(data: dict, values: dict[str, Any] | None) -> None:
    for key, value in (values or {}).items():
        apply_override(data, key.split("."), copy.deepcopy(value))


def load_pipeline(
    name_or_path: str,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    transform: Transform | None = None,
) -> Pipeline:
    """Resolve every stage of a recipe before any work: typos, bad stage names, stages that cannot
    seed each other and unsupported exports all fail here. `values` ({dotted key: value}) are set
    on every stage (the CLI's --prompt, --seed, ...); `transform(stage, data)` edits a stage's data
    last (the CLI's --model, --perp-neg)."""
    path = recipe_path(name_or_path)
    data = load_yaml(path)
    if not data.get("stages"):
        stage_data = apply_overrides(copy.deepcopy(data), stage_overrides(MAIN, overrides))
        _set_values(stage_data, values)
        if transform is not None:
            transform(MAIN, stage_data)
        _check_stage_targets(overrides, [MAIN])
        return Pipeline(str(data.get("name", path.stem)), [Stage(MAIN, resolve_recipe(stage_data), None)])

    shared = {k: v for k, v in data.items() if k not in _PIPELINE_ONLY_KEYS}
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list):
        raise ConfigError(f"{path}: stages must be a list of {{name, recipe, set, init_from}}")
    specs = [from_dict(StageConfig, s, f"stages.{i}") for i, s in enumerate(raw_stages)]
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):
        if not STAGE_NAME.match(spec.name):
            raise ConfigError(f"stages.{i}.name {spec.name!r}: use letters, digits, '-' and '_' (it names the stage's folder)")
        if spec.name in names[:i]:
            raise ConfigError(f"stages.{i}.name {spec.name!r} is used twice")
        if spec.init_from not in (None, "previous") and spec.init_from not in names[:i]:
            raise ConfigError(f"stages.{i}.init_from {spec.init_from!r}: name an earlier stage, 'previous' or null")
    _check_stage_targets(overrides, names)
    stages: list[Stage] = []
    for i, spec in enumerate(specs):
        base = spec.recipe
        if not Path(base).is_absolute() and (path.parent / base).suffix in (".yaml", ".yml") and (path.parent / base).exists():
            base = str(path.parent / base)
        stage_data = load_yaml(recipe_path(base))
        for key, value in shared.items():
            stage_data[key] = copy.deepcopy(value)
        stage_data.pop("stages", None)
        apply_overrides(stage_data, list(spec.set) + stage_overrides(spec.name, overrides))
        _set_values(stage_data, values)
        if transform is not None:
            transform(spec.name, stage_data)
        source = spec.init_from if spec.init_from != "previous" else (names[i - 1] if i > 0 else None)
        try:
            recipe = resolve_recipe(stage_data)
        except ConfigError as exc:
            raise ConfigError(f"stage {spec.name!r}: {exc}") from exc
        if source is not None:
            source_rep = next(s for s in stages if s.name == source).recipe.representation["name"]
            try:
                check_capabilities(recipe, source_rep)
            except ConfigError as exc:
                raise ConfigError(f"stage {spec.name!r}: {exc}") from exc
        stages.append(Stage(spec.name, recipe, source))
    return Pipeline(str(data.get("name", path.stem)), stages)


def save_pipeline(pipeline: Pipeline, out: Path) -> None:
    """OUT/pipeline.yaml: every stage's fully resolved recipe, for resume."""
    doc = {
        "name": pipeline.name,
        "stages": [{"name": s.name, "init_from": s.init_from, "recipe": to_dict(s.recipe)} for s in pipeline.stages],
    }
    atomic_write_text(Path(out) / PIPELINE_FILE, yaml.safe_dump(doc, sort_keys=False))


def read_pipeline(out: Path, overrides: list[str] | None = None) -> Pipeline:
    """The pipeline recorded in OUT/pipeline.yaml, with resume overrides applied per stage."""
    doc = yaml.safe_load((Path(out) / PIPELINE_FILE).read_text())
    names = [s["name"] for s in doc["stages"]]
    _check_stage_targets(overrides, names)
    stages = []
    for entry in doc["stages"]:
        data = apply_overrides(entry["recipe"], stage_overrides(entry["name"], overrides))
        stages.append(Stage(entry["name"], resolve_recipe(data), entry.get("init_from")))
    return Pipeline(doc.get("name", "pipeline"), stages)


def is_pipeline_dir(path: Path) -> bool:
    return (Path(path) / PIPELINE_FILE).exists()


def final_run_dir(path: Path) -> Path:
    """The run directory holding a pipeline's result (its last stage), or path itself."""
    path = Path(path)
    if not is_pipeline_dir(path):
        return path
    doc = yaml.safe_load((path / PIPELINE_FILE).read_text())
    return path / doc["stages"][-1]["name"]


def run_pipeline(pipeline: Pipeline, out: Path, report: Callable, quiet: bool = False, init_from: Path | None = None) -> None:
    """A fresh run of every stage in order. `report(trainer)` trains one stage and returns its
    RunResult (the CLI prints progress and figures); a stage that did not finish stops here."""
    from distill3d.engine.trainer import Trainer, check_fresh_run_dir

    out = Path(out)
    check_fresh_run_dir(out)
    if not pipeline.single:
        out.mkdir(parents=True, exist_ok=True)
        save_pipeline(pipeline, out)
    for i, (stage, stage_dir) in enumerate(zip(pipeline.stages, pipeline.stage_dirs(out))):
        pipeline.seed_from_source(stage, out)
        if stage.init_from is None and init_from is not None and i == 0:
            stage.recipe.init_from = str(init_from)
        _announce(pipeline, stage, stage_dir, quiet)
        result = report(Trainer.create(stage.recipe, stage_dir, quiet))
        if not result.finished:
            return


def resume_pipeline(out: Path, overrides: list[str] | None, report: Callable, quiet: bool = False) -> None:
    """Continue a run or a pipeline: finished stages are kept, the first unfinished one resumes
    from its checkpoint, stages not started yet start (seeded as recorded)."""
    from distill3d.engine.trainer import Trainer, run_finished

    out = Path(out)
    if not is_pipeline_dir(out):
        trainer = Trainer.resume(out, overrides, quiet)
        report(trainer)
        return
    pipeline = read_pipeline(out, overrides)
    for stage, stage_dir in zip(pipeline.stages, pipeline.stage_dirs(out)):
        if (stage_dir / "config.yaml").exists():
            if run_finished(stage_dir):
                if not quiet:
                    print(f"stage {stage.name}: finished", file=sys.stderr, flush=True)
                continue
            trainer = Trainer.resume(stage_dir, stage_overrides(stage.name, overrides), quiet)
        else:
            pipeline.seed_from_source(stage, out)
            trainer = Trainer.create(stage.recipe, stage_dir, quiet)
        _announce(pipeline, stage, stage_dir, quiet)
        result = report(trainer)
        if not result.finished:
            return


def _announce(pipeline: Pipeline, stage: Stage, stage_dir: Path, quiet: bool) -> None:
    if not quiet and not pipeline.single:
        print(f"stage {stage.name} ({stage.recipe.name}) -> {stage_dir}", file=sys.stderr, flush=True)
