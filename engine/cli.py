"""The `distill3d` command line: demo, generate, resume, export, recipes, plugins, doctor.

Every error a user can cause ends in one clear line on stderr and a non-zero exit code;
set DISTILL3D_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

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


def _run_and_report(trainer) -> None:
    typer.echo(f"run directory: {trainer.run_dir}", err=True)
    result = trainer.fit()
    if result.interrupted:
        typer.echo(f"stopped at step {result.completed_steps}; checkpoint written. Continue with: distill3d resume {result.run_dir}", err=True)
        raise typer.Exit(130)
    typer.echo(f"finished {result.completed_steps} steps in {result.seconds:.1f} s -> {result.run_dir}", err=True)
    if result.eval is not None:
        typer.echo(f"eval: psnr {result.eval['psnr']:.2f} dB, mask_iou {result.eval['mask_iou']:.4f}", err=True)


@app.command()
@friendly_errors
def demo(
    scene: Optional[Path] = typer.Option(
        None, "--scene", "--reference",
        help="The reference to distil: a scene file (JSON/YAML primitives), a mesh file (OBJ/GLB/PLY, textured or vertex-coloured) or a shipped scene name (default, two_cylinders).",
    ),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the recipe's)."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/demo-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Recipe override key.path=value (repeatable); with stages, STAGE:key.path=value for one stage."),
    stages: str = typer.Option("nerf", help="nerf, or nerf,dmtet: NeRF coarse stage, then DMTet fine stage seeded from it, then a GLB."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Offline demo: oracle score distillation of a reference (analytic scene or mesh file) into a NeRF
    (and with --stages nerf,dmtet a refined DMTet mesh exported as GLB), on CPU, no weights."""
    from distill3d.engine.reference_scene import DEFAULT_SCENE, builtin_scenes, resolve_scene_path

    reference = resolve_scene_path(scene) if scene is not None else DEFAULT_SCENE
    if not reference.exists():
        raise UserError(f"scene {scene} does not exist (give a file, or a shipped scene: {', '.join(builtin_scenes())})")
    names = [s.strip() for s in stages.split(",") if s.strip()]
    if names not in (["nerf"], ["nerf", "dmtet"]):
        raise UserError(f"--stages {stages!r}: use 'nerf' or 'nerf,dmtet'")
    def prepare(name: str, data: dict) -> None:
        data["reference"] = str(reference.resolve())
        data["seed"] = seed
        if steps is not None and name == "nerf":
            data.setdefault("trainer", {})["steps"] = steps

    _run_stages([(name, f"oracle-{name}") for name in names], out or _default_out("demo"), set_, prepare, quiet)


def _stage_overrides(name: str, overrides: list[str]) -> list[str]:
    """'--set STAGE:key=v' addresses one stage; plain overrides apply to every stage."""
    picked = []
    for text in overrides:
        key = text.split("=", 1)[0]
        if ":" not in key:
            picked.append(text)
        elif key.split(":", 1)[0] == name:
            picked.append(text.split(":", 1)[1])
    return picked


def _run_stages(stages: list[tuple[str, str]], out: Path, overrides: list[str], prepare: Callable[[str, dict], None], quiet: bool) -> None:
    """Run recipes one after another, each seeded from the previous run (--init-from); with more
    than one stage each gets its own run directory OUT/<stage>."""
    from distill3d.engine.recipe import load_recipe_data, resolve_recipe
    from distill3d.engine.trainer import Trainer

    previous = None
    for name, recipe_name in stages:
        data = load_recipe_data(recipe_name, _stage_overrides(name, overrides))
        prepare(name, data)
        if previous is not None:
            data["init_from"] = str(previous)
        stage_out = out if len(stages) == 1 else out / name
        _run_and_report(Trainer.create(resolve_recipe(data), stage_out, quiet))
        previous = stage_out
    if len(stages) > 1 and (previous / "mesh.glb").exists():
        typer.echo(f"mesh: {previous / 'mesh.glb'}", err=True)


def _apply_generate_options(data: dict, model: Optional[str], perp_neg: bool) -> None:
    """--model and --perp-neg act on every guidance entry whose prior takes them."""
    for entry in data.get("guidance", []):
        if model is not None and isinstance(entry.get("prior"), dict):
            entry["prior"]["model"] = model
        if perp_neg:
            if entry.get("name") != "sds":
                raise UserError("--perp-neg needs an 'sds' guidance in the recipe")
            entry["name"] = "sds-perp-neg"


@app.command()
@friendly_errors
def generate(
    prompt: str = typer.Argument(..., help="What to make, e.g. 'a DSLR photo of a corgi'."),
    recipe: str = typer.Option("dreamfusion-sd", help="Recipe name (see `distill3d recipes`) or a .yaml path."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<recipe>-<time>)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the recipe's)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: the recipe's)."),
    model: Optional[str] = typer.Option(None, help="Diffusion model: hub id or local diffusers folder."),
    negative: Optional[str] = typer.Option(None, help="Negative prompt."),
    perp_neg: bool = typer.Option(False, "--perp-neg", help="Use Perp-Neg against multi-face (Janus) results."),
    reference: Optional[Path] = typer.Option(None, help="Reference file (scene for oracle recipes)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Seed the representation from a finished run (e.g. DMTet from a NeRF run)."),
    set_: List[str] = typer.Option([], "--set", help="Recipe override key.path=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Text-to-3D (or any recipe): optimise a 3D representation for PROMPT."""
    from distill3d.engine.config import load_yaml
    from distill3d.engine.recipe import recipe_path

    if not prompt.strip():
        raise UserError("the prompt is empty; say what to make, e.g. distill3d generate \"a DSLR photo of a corgi\"")
    path = recipe_path(recipe)
    staged = load_yaml(path).get("stages")

    def prepare(name: str, data: dict) -> None:
        data["prompt"] = prompt
        if negative is not None:
            data["negative_prompt"] = negative
        if seed is not None:
            data["seed"] = seed
        if steps is not None:
            data.setdefault("trainer", {})["steps"] = steps
        if reference is not None:
            from distill3d.engine.reference_scene import resolve_scene_path

            data["reference"] = str(resolve_scene_path(reference))  # a file, or a shipped scene's name
        if init_from is not None and name == first:
            data["init_from"] = str(init_from)
        _apply_generate_options(data, model, perp_neg)

    overrides = list(set_)
    if staged:
        # A staged recipe lists {name, recipe, set} stages run in order, each seeded from the last;
        # a stage's own `set` overrides come first, so the user's --set still wins.
        stages = [(str(st["name"]), str(st["recipe"])) for st in staged]
        overrides = [f"{st['name']}:{text}" for st in staged for text in st.get("set", [])] + overrides
    else:
        stages = [("main", str(path))]
    first = stages[0][0]
    _run_stages(stages, out or _default_out(path.stem), overrides, prepare, quiet)


@app.command()
@friendly_errors
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory to continue."),
    set_: List[str] = typer.Option([], "--set", help="Override key.path=value for the rest of the run."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Continue an interrupted run from its last checkpoint (or redo missing outputs of a finished one)."""
    from distill3d.engine.trainer import Trainer

    trainer = Trainer.resume(run_dir, set_, quiet)
    if trainer.start_step >= trainer.recipe.trainer.steps:
        typer.echo(f"{run_dir} already finished ({trainer.start_step} steps); rewriting its outputs", err=True)
        trainer.finish()
        return
    typer.echo(f"resuming at step {trainer.start_step}", err=True)
    _run_and_report(trainer)


VIDEO_FORMATS = ("mp4", "gif")
MESH_FORMATS = ("obj", "glb", "ply")


@app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    format: str = typer.Option("glb", "--format", help="glb | obj | ply (textured mesh) or mp4 | gif (turntable)."),
    resolution: Optional[int] = typer.Option(None, help="Mesh: marching-cubes grid. Video: frame size. Default: the recipe's (trainer.export_resolution / video_resolution)."),
    decimate: Optional[int] = typer.Option(None, help="Mesh: reduce to about this many faces."),
    texture_size: Optional[int] = typer.Option(None, help="Mesh: baked albedo texture size (default: the recipe's trainer.export_texture_size)."),
    frames: Optional[int] = typer.Option(None, help="Video: turntable frames (default: the recipe's)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: RUN_DIR/mesh.<format> or RUN_DIR/turntable.<format>)."),
):
    """Export a run: a textured mesh (GLB, OBJ+MTL+PNG, PLY with vertex colours) or a turntable video."""
    from distill3d.engine.trainer import load_run

    fmt = format.lower()
    if fmt not in VIDEO_FORMATS + MESH_FORMATS:
        raise UserError(f"unknown export format {format!r}; available: {', '.join(MESH_FORMATS + VIDEO_FORMATS)}")
    # Only the representation: exporting never needs the run's diffusion model.
    recipe, representation = load_run(run_dir, purpose="export")
    tc = recipe.trainer
    if fmt in VIDEO_FORMATS:
        from distill3d.engine.cameras import CameraSampler
        from distill3d.engine.video import render_turntable, write_video

        images = render_turntable(representation, CameraSampler(recipe.cameras), frames or tc.video_frames, resolution or tc.video_resolution)
        path = out or Path(run_dir) / f"turntable.{fmt}"
        write_video(images, path, tc.video_fps)
        typer.echo(str(path))
        return
    from distill3d.representations.mesh.mesh_io import save_mesh

    mesh, info = representation.export_mesh(resolution or tc.export_resolution, decimate, texture_size or tc.export_texture_size)
    written = save_mesh(mesh, out or Path(run_dir) / f"mesh.{fmt}")
    typer.echo(
        f"{info.faces_final} faces (marching cubes {info.faces_marching_cubes}, threshold {info.threshold:.3g}), "
        f"texture {info.texture_size}^2",
        err=True,
    )
    for path in written:
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
def plugins():
    """List registered plugins, the distribution providing each, and whether it loads."""
    from distill3d.plugins.registry import GROUPS, Registry

    for kind, group in GROUPS.items():
        typer.echo(f"{kind} ({group}):")
        registry = Registry(kind)
        for info in registry.infos():
            problem = registry.check(info.name)
            status = "ok" if problem is None else f"FAILED: {problem}"
            typer.echo(f"  {info.name:20s} {info.distribution:20s} {info.value}  [{status}]")


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
        typer.echo(f"  {op:14s} -> {chosen:8s} ({others})")


from distill3d.engine.cli_batch import register as register_batch_commands  # noqa: E402 - batch, report
register_batch_commands(app, friendly_errors)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
