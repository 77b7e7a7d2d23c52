"""The `distill3d` command line: demo, generate, resume, export, recipes, plugins, doctor.

Every error a user can cause ends in one clear line on stderr and a non-zero exit code;
set DISTILL3D_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer

from distill3d.engine.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="distill3d: turn 2D diffusion priors into 3D assets by score distillation.",
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """Turn user errors into one line; keep tracebacks for DISTILL3D_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("DISTILL3D_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as exc:
            if debug:
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
            sys.stderr.close()
            raise typer.Exit(0)
        except OSError as exc:  # disk full, read-only, permission, name too long: one clear line
            if debug:
                raise
            from distill3d.engine.checkpoint import describe_os_error

            message = describe_os_error(exc)
            _fail(message or _describe_unexpected(exc), 2 if message else 1)
        except Exception as exc:  # noqa: BLE001
            if debug:
                raise
            _fail(_describe_unexpected(exc), 1)

    return wrapper


def _describe_unexpected(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in str(exc).lower():
        return (
            f"{text}\nThe GPU ran out of memory. Lower trainer.resolution or trainer.batch_size "
            "(--set trainer.resolution=64 --set trainer.batch_size=1), keep mixed precision on, or use the "
            "prior's memory options (e.g. --set guidance.0.prior.attention_slicing=true)."
        )
    return f"{text}\n(unexpected; run again with DISTILL3D_DEBUG=1 for the traceback and report it)"


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _reporter(resume_target: Path):
    """Runs one trainer and prints what a user needs: where, how far, the figures."""

    def report(trainer):
        typer.echo(f"run directory: {trainer.run_dir}", err=True)
        if trainer.start_step > 0:
            if trainer.start_step >= trainer.recipe.trainer.steps:
                typer.echo(f"{trainer.run_dir} already finished ({trainer.start_step} steps); rewriting its outputs", err=True)
            else:
                typer.echo(f"resuming at step {trainer.start_step}", err=True)
        result = trainer.fit()
        if result.interrupted:
            typer.echo(f"stopped at step {result.completed_steps}; checkpoint written. Continue with: distill3d resume {resume_target}", err=True)
            raise typer.Exit(130)
        typer.echo(f"finished {result.completed_steps} steps in {result.seconds:.1f} s -> {result.run_dir}", err=True)
        if result.eval is not None:
            typer.echo(f"eval: psnr {result.eval['psnr']:.2f} dB, mask_iou {result.eval['mask_iou']:.4f}", err=True)
        return result

    return report


def _run_pipeline(pipeline, out: Path, quiet: bool, init_from: Optional[Path] = None) -> None:
    from distill3d.engine.pipeline import final_run_dir, run_pipeline

    run_pipeline(pipeline, out, _reporter(out), quiet, init_from)
    final = final_run_dir(out)
    for fmt in ("glb", "obj", "ply"):
        if not pipeline.single and (final / f"mesh.{fmt}").exists():
            typer.echo(f"mesh: {final / f'mesh.{fmt}'}", err=True)


DEMO_STAGES = {
    "nerf": "oracle-nerf", "nerf,dmtet": "oracle-nerf-dmtet",
    "gaussians": "oracle-gaussians", "gaussians,mesh": "oracle-gaussians-mesh",
}
IMAGE_TO_3D_STAGES = {"nerf": "oracle-zero123", "gaussians": "oracle-zero123-gaussians"}


def _demo_recipe(stages: str, image_to_3d: bool) -> str:
    """The shipped oracle recipe (or pipeline) that `demo --stages` names."""
    from distill3d.engine.recipe import available_recipes

    key = ",".join(s.strip() for s in stages.split(",") if s.strip())
    table = {k: v for k, v in (IMAGE_TO_3D_STAGES if image_to_3d else DEMO_STAGES).items() if v in available_recipes()}
    if key not in table:
        raise UserError(f"--stages {stages!r}{' with --image-to-3d' if image_to_3d else ''}: use one of {' | '.join(table)}")
    return table[key]


@app.command()
@friendly_errors
def demo(
    scene: Optional[Path] = typer.Option(
        None, "--scene", "--reference",
        help="The scene to distil: a scene file (JSON/YAML primitives), a mesh file (OBJ/GLB/PLY, textured or vertex-coloured) or a shipped scene name (default, two_cylinders).",
    ),
    stages: str = typer.Option("nerf", help="Representations in order, e.g. nerf | nerf,dmtet | gaussians | gaussians,mesh (a shipped oracle-... recipe)."),
    image_to_3d: bool = typer.Option(False, "--image-to-3d", help="Render the scene once from the front into an input image, then reconstruct from that image alone (reference losses + oracle Zero123)."),
    elevation: float = typer.Option(0.0, help="With --image-to-3d: elevation of the input view (degrees)."),
    steps: Optional[int] = typer.Option(None, help="Training steps of every stage (default: the recipe's)."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/demo-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Recipe override key.path=value (repeatable); with stages, STAGE:key.path=value for one stage."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Offline demo: oracle score distillation of a scene (analytic or mesh) into a 3D
    representation (and with more stages, a refined mesh exported as GLB), on CPU, no weights."""
    from distill3d.engine.pipeline import load_pipeline
    from distill3d.engine.reference_scene import DEFAULT_SCENE, builtin_scenes, resolve_scene_path
    from distill3d.engine.trainer import check_fresh_run_dir

    reference = resolve_scene_path(scene) if scene is not None else DEFAULT_SCENE
    if not reference.exists():
        raise UserError(f"scene {scene} does not exist (give a file, or a shipped scene: {', '.join(builtin_scenes())})")
    recipe = _demo_recipe(stages, image_to_3d)
    out = out or _default_out("demo")
    values = {"scene": str(reference.resolve()), "seed": seed}
    if steps is not None:
        values["trainer.steps"] = steps
    pipeline = load_pipeline(recipe, set_, values)  # every stage checked before any work
    if image_to_3d:
        check_fresh_run_dir(out)
        from distill3d.engine.config import load_yaml
        from distill3d.engine.recipe import recipe_path
        from distill3d.engine.reference_view import render_input_image

        view = load_yaml(recipe_path(recipe)).get("reference_view") or {}
        image = render_input_image(reference, out / "input.png", view, elevation)
        values.update({"reference_view.image": str(image.resolve()), "reference_view.elevation": elevation})
        pipeline = load_pipeline(recipe, set_, values)
    _run_pipeline(pipeline, out, quiet)


class _CliShorthands:
    """--model and --perp-neg as edits of each stage's recipe data (shorthands for overrides)."""

    def __init__(self, models: list[str], perp_neg: bool):
        self.named: dict[str, str] = {}
        self.bare: Optional[str] = None
        for text in models:
            key, sep, value = text.partition("=")
            if sep and key and not Path(text).exists() and "/" not in key:
                self.named[key] = value
            else:
                self.bare = text
        self.perp_neg = perp_neg
        self.used_names: set[str] = set()
        self.bare_targets: set[str] = set()
        self.perp_neg_done = False

    @staticmethod
    def _model_priors(data: dict) -> list[tuple[list[str], dict]]:
        """(names a user may call it by, spec) of every prior in the recipe that loads a model."""
        from distill3d.plugins.registry import Registry

        found = []
        for key, spec in (data.get("priors") or {}).items():
            if isinstance(spec, dict):
                found.append(([str(key), str(spec.get("name"))], spec))
        for entry in data.get("guidance") or []:
            spec = entry.get("prior") if isinstance(entry, dict) else None
            if isinstance(spec, dict):
                found.append(([str(spec.get("name"))], spec))
        registry = Registry("prior")
        return [(names, spec) for names, spec in found if "model" in {f.name for f in dataclasses.fields(registry.get(names[-1]).Config)}]

    def __call__(self, stage: str, data: dict) -> None:
        priors = self._model_priors(data)
        for names, spec in priors:
            for key, value in self.named.items():
                if key in names:
                    spec["model"] = value
                    self.used_names.add(key)
        if self.bare is not None and priors:
            labels = {names[0] for names, _ in priors}
            if len(priors) > 1:
                raise UserError(f"this recipe has {len(priors)} priors that load a model ({', '.join(sorted(labels))}); say which: --model NAME=DIR")
            priors[0][1]["model"] = self.bare
            self.bare_targets |= labels
        if self.perp_neg:
            for entry in data.get("guidance") or []:
                if isinstance(entry, dict) and entry.get("name") == "sds" and self._is_text_prior(entry.get("prior"), data):
                    entry["name"] = "sds-perp-neg"
                    self.perp_neg_done = True

    @staticmethod
    def _is_text_prior(spec, data: dict) -> bool:
        from distill3d.plugins.registry import Registry

        if isinstance(spec, str):
            spec = (data.get("priors") or {}).get(spec)
        if not isinstance(spec, dict):
            return False
        return hasattr(Registry("prior").get(str(spec.get("name"))), "view_conditions")

    def check(self, recipe: str) -> None:
        unused = [k for k in self.named if k not in self.used_names]
        if unused:
            raise UserError(f"--model {unused[0]}=...: recipe {recipe} has no prior called {unused[0]!r} (name a prior under its priors:, or its plugin name)")
        if self.bare is not None and not self.bare_targets:
            raise UserError(f"--model: recipe {recipe} has no prior that loads a model")
        if self.perp_neg and not self.perp_neg_done:
            raise UserError(f"--perp-neg needs an 'sds' guidance with a text prior (stable-diffusion, deepfloyd-if); recipe {recipe} has none")


@app.command()
@friendly_errors
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to make, e.g. 'a DSLR photo of a corgi' (needed by recipes with a text prior)."),
    recipe: str = typer.Option("dreamfusion-sd", help="Recipe name (see `distill3d recipes`) or a .yaml path."),
    image: Optional[Path] = typer.Option(None, help="Image-to-3D input photo (RGBA, or RGB on a plain background)."),
    elevation: Optional[float] = typer.Option(None, help="With --image: elevation of the photo's camera in degrees (default 0)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<recipe>-<time>)."),
    steps: Optional[int] = typer.Option(None, help="Training steps of every stage (default: the recipe's)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: the recipe's)."),
    model: List[str] = typer.Option([], help="Model of the recipe's prior: a hub id or local diffusers folder; NAME=DIR for one prior of several (e.g. sd=DIR, zero123=DIR)."),
    negative: Optional[str] = typer.Option(None, help="Negative prompt."),
    perp_neg: bool = typer.Option(False, "--perp-neg", help="Use Perp-Neg against multi-face (Janus) results."),
    scene: Optional[Path] = typer.Option(None, "--scene", "--reference", help="Scene (file or shipped name) for oracle recipes and evaluation."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Seed the representation from a finished run (e.g. DMTet from a NeRF run)."),
    set_: List[str] = typer.Option([], "--set", help="Recipe override key.path=value (repeatable); STAGE:key=value for one stage."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Text-to-3D or image-to-3D (or any recipe): optimise a 3D representation for PROMPT / --image."""
    from distill3d.engine.config import load_yaml, validate_prompt
    from distill3d.engine.pipeline import load_pipeline
    from distill3d.engine.recipe import recipe_path

    if prompt is not None:
        validate_prompt(prompt, "the prompt")
        if not prompt.strip():
            raise UserError("the prompt is empty; say what to make, e.g. distill3d generate \"a DSLR photo of a corgi\"")
    if negative is not None:
        validate_prompt(negative, "the negative prompt")
    path = recipe_path(recipe)
    values: dict = {}
    if prompt is not None:
        values["prompt"] = prompt
    if negative is not None:
        values["negative_prompt"] = negative
    if seed is not None:
        values["seed"] = seed
    if steps is not None:
        values["trainer.steps"] = steps
    if scene is not None:
        from distill3d.engine.reference_scene import resolve_scene_path

        values["scene"] = str(resolve_scene_path(scene))
    if image is not None or elevation is not None:
        data = load_yaml(path)
        if data.get("reference_view") is None:
            raise UserError(f"recipe {recipe} does not take an input image (it has no reference_view); use an image-to-3D recipe such as zero123, magic123 or dreamgaussian")
        if image is None:
            raise UserError("--elevation goes with --image (the input photo)")
        if not image.exists():
            raise UserError(f"image {image} does not exist")
        values["reference_view.image"] = str(image.resolve())
        if elevation is not None:
            values["reference_view.elevation"] = elevation
    shorthands = _CliShorthands(model, perp_neg)
    pipeline = load_pipeline(str(path), set_, values, shorthands)
    shorthands.check(recipe)
    _run_pipeline(pipeline, out or _default_out(path.stem), quiet, init_from)


@app.command()
@friendly_errors
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory (or a staged run's OUT) to continue."),
    set_: List[str] = typer.Option([], "--set", help="Override key.path=value for the rest of the run (STAGE:key=value for one stage)."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Continue an interrupted run from its last checkpoint (or redo missing outputs of a finished one)."""
    from distill3d.engine.pipeline import resume_pipeline

    resume_pipeline(run_dir, set_, _reporter(run_dir), quiet)


VIDEO_FORMATS = ("mp4", "gif")
KNOWN_FORMATS = ("glb", "obj", "ply", *VIDEO_FORMATS)


@app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="Run directory (a staged run's OUT exports its last stage)."),
    format: str = typer.Option("glb", "--format", help="glb | obj | ply (what the representation exports; a Gaussians run writes splats to ply) or mp4 | gif (turntable)."),
    resolution: Optional[int] = typer.Option(None, help="Mesh: surface extraction grid. Video: frame size. Default: the recipe's (trainer.export_resolution / video_resolution)."),
    decimate: Optional[int] = typer.Option(None, help="Mesh: reduce to about this many faces."),
    texture_size: Optional[int] = typer.Option(None, help="Mesh: baked albedo texture size (default: the recipe's trainer.export_texture_size)."),
    frames: Optional[int] = typer.Option(None, help="Video: turntable frames (default: the recipe's)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: RUN_DIR/mesh.<format> or RUN_DIR/turntable.<format>)."),
):
    """Export a run: its asset (textured mesh, or splats) or a turntable video."""
    from distill3d.engine.interfaces import ExportOptions
    from distill3d.engine.pipeline import final_run_dir
    from distill3d.engine.trainer import load_run

    fmt = format.lower()
    if fmt not in KNOWN_FORMATS:
        raise UserError(f"unknown export format {format!r}; available: {', '.join(KNOWN_FORMATS)} (which ones depends on the representation)")
    for name, value in (("--resolution", resolution), ("--decimate", decimate), ("--frames", frames)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be positive, got {value}")
    if texture_size is not None and texture_size < 64:
        raise UserError(f"--texture-size must be at least 64, got {texture_size}")
    # Only the representation: exporting never needs the run's diffusion model.
    recipe, representation = load_run(run_dir, purpose="export")
    target = final_run_dir(run_dir)
    formats = tuple(type(representation).exports) + VIDEO_FORMATS
    if fmt not in formats:
        raise UserError(f"unknown export format {format!r} for a {recipe.representation['name']} run; available: {', '.join(formats)}")
    tc = recipe.trainer
    if fmt in VIDEO_FORMATS:
        from distill3d.engine.cameras import CameraSampler
        from distill3d.engine.video import render_turntable, write_video

        images = render_turntable(representation, CameraSampler(recipe.cameras), frames or tc.video_frames, resolution or tc.video_resolution)
        path = out or target / f"turntable.{fmt}"
        write_video(images, path, tc.video_fps)
        typer.echo(str(path))
        return
    options = ExportOptions(resolution or tc.export_resolution, decimate, texture_size or tc.export_texture_size)
    for path in representation.export(fmt, out or target / f"mesh.{fmt}", options):
        typer.echo(str(path))


@app.command()
@friendly_errors
def recipes():
    """List the shipped recipes."""
    from distill3d.engine.config import load_yaml
    from distill3d.engine.recipe import RECIPE_DIR, available_recipes

    for name in available_recipes():
        description = load_yaml(RECIPE_DIR / f"{name}.yaml").get("description", "")
        typer.echo(f"{name:24s} {description}")


@app.command()
@friendly_errors
def plugins(
    show: Optional[str] = typer.Option(None, "--show", metavar="NAME", help="Print one plugin's settings: every config key with its type and default."),
):
    """List registered plugins, the distribution providing each, and whether it loads (exit 1 if any fails)."""
    from distill3d.plugins.registry import GROUPS, Registry, show_plugin

    if show is not None:
        for line in show_plugin(show):
            typer.echo(line)
        return
    failed = 0
    for kind, group in GROUPS.items():
        typer.echo(f"{kind} ({group}):")
        registry = Registry(kind)
        for info in registry.infos():
            problem = registry.check(info.name)
            failed += problem is not None
            status = "ok" if problem is None else f"FAILED: {problem}"
            typer.echo(f"  {info.name:20s} {info.distribution:20s} {info.value}  [{status}]")
    from importlib.metadata import entry_points

    from distill3d.engine.config import ConfigError
    from distill3d.guidance.timesteps import WEIGHTING_GROUP, get_weighting

    typer.echo(f"SDS weighting ({WEIGHTING_GROUP}):")
    for ep in sorted({(ep.name, ep.value): ep for ep in entry_points(group=WEIGHTING_GROUP)}.values(), key=lambda e: e.name):
        try:
            get_weighting(ep.name)
            status = "ok"
        except ConfigError as exc:
            failed += 1
            status = f"FAILED: {exc}"
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        typer.echo(f"  {ep.name:20s} {dist:20s} {ep.value}  [{status}]")
    if failed:
        typer.secho(f"error: {failed} plugin(s) FAILED to load (see above)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
@friendly_errors
def doctor():
    """What is installed and which backend each hot op will use."""
    import importlib
    import platform

    import torch

    from distill3d.engine import backends

    typer.echo(f"python     {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs)")
    typer.echo(f"torch      {torch.__version__}, {torch.get_num_threads()} threads")
    cuda = torch.cuda.is_available()
    typer.echo(f"cuda       {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}")
    for module in ("triton", "tinycudann", "nerfacc", "nvdiffrast", "gsplat", "diffusers", "transformers", "xatlas", "trimesh", "imageio_ffmpeg"):
        try:
            mod = importlib.import_module(module)
            version = getattr(mod, "__version__", "installed")
            typer.echo(f"{module:10s} {version}")
        except Exception as exc:  # noqa: BLE001 - tiny-cuda-nn raises EnvironmentError without CUDA
            typer.echo(f"{module:10s} not available ({type(exc).__name__})")
    device = torch.device("cuda" if cuda else "cpu")
    typer.echo(f"\nbackends on {device} (auto choice first):")
    for op, chosen, status in backends.describe(device):
        others = ", ".join(f"{name}: {'ok' if why is None else why}" for name, why in status)
        typer.echo(f"  {op:18s} -> {chosen:8s} ({others})")


from distill3d.engine.cli_batch import register as register_batch_commands  # noqa: E402 - batch, report
register_batch_commands(app, friendly_errors)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
