"""The optimisation loop. It sees only the Representation / Guidance / Prior protocols.

Run directory layout:
  config.yaml       the fully resolved recipe
  metrics.jsonl     one JSON object per logged step
  checkpoints/      step_XXXXXXX.pt, written atomically, newest `keep_checkpoints` kept
  reference.png     the preprocessed input image (image-to-3D runs)
  eval.json         PSNR and mask IoU against the exact scene (runs with a scene)
  turntable.mp4/.gif, mesh.<fmt>
  status.json       written last: the run finished and its outputs are complete
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from distill3d.engine.cameras import CameraSampler
from distill3d.engine.checkpoint import (
    atomic_write_text,
    clear_os_errors,
    latest_checkpoint,
    load_latest_checkpoint,
    lock_run_dir,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    truncate_metrics,
)
from distill3d.engine.config import to_dict
from distill3d.engine.errors import NonFiniteLossError, UserError
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.engine.optim import OptimizerHooks, apply_learning_rates, build_optimizer
from distill3d.engine.recipe import RecipeConfig, resolve_recipe
from distill3d.engine.schedules import Schedule
from distill3d.plugins.registry import build_plugin


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device is {name!r} but no CUDA GPU is available; use --set trainer.device=cpu or auto")
    return device


STATUS_FILE = "status.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "pipeline.yaml")


def run_finished(run_dir: Path) -> bool:
    """Whether a run trained all its steps and wrote its outputs (status.json says so)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text()).get("state") == "finished"
    except (OSError, ValueError):
        return False


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run never writes over another run's files."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(found)}); continue it with `distill3d resume {run_dir}` or pick another --out"
        )


def load_run(run_dir: Path, purpose: str = "--init-from"):
    """(recipe, representation at the latest checkpoint) of a run, without building its guidance:
    no diffusion model is loaded just to read a NeRF. A pipeline directory means its last stage.
    `purpose` starts the error messages."""
    from distill3d.engine.pipeline import final_run_dir

    run_dir = final_run_dir(Path(run_dir))
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise UserError(f"{purpose} {run_dir}: not a run directory (no config.yaml)")
    recipe = resolve_recipe(yaml.safe_load(config_path.read_text()))
    ctx = BuildContext(device=pick_device(recipe.trainer.device), total_steps=recipe.trainer.steps, cache_dir=_cache_dir())
    found = load_latest_checkpoint(run_dir / "checkpoints", ctx.device)
    if found is None:
        raise UserError(f"{purpose} {run_dir}: the run has no checkpoint yet")
    representation = build_plugin("representation", recipe.representation, ctx, "representation")
    state = found[1]
    representation.load_state_dict(state["representation"])
    representation.load_extra_state(state.get("representation_extra", {}))
    return recipe, representation.eval()


def _cache_dir() -> Path:
    return Path(os.environ.get("DISTILL3D_CACHE", Path.home() / ".cache" / "distill3d"))


@dataclass
class RunResult:
    run_dir: Path
    completed_steps: int
    finished: bool
    interrupted: bool
    eval: dict | None
    seconds: float


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Trainer:
    """One run: builds the plugins from a resolved recipe, restores state, trains, writes outputs.

    Order matters for plugins whose parameter shapes change: the representation's state is
    restored (shapes included) before the optimizer is built from its declared groups."""

    def __init__(self, recipe: RecipeConfig, run_dir: Path, quiet: bool = False):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        tc = recipe.trainer
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.device = pick_device(tc.device)
        seed_everything(recipe.seed)
        scene = None
        if recipe.scene:
            from distill3d.engine.reference_scene import resolve_scene_path

            scene = resolve_scene_path(recipe.scene)
            if not scene.exists():
                raise UserError(f"scene {recipe.scene} does not exist (give a scene or mesh file, or a shipped scene name)")
        reference_view = None
        if recipe.reference_view is not None and recipe.reference_view.image is not None:
            from distill3d.engine.reference_view import load_reference_view

            reference_view = load_reference_view(recipe.reference_view, self.run_dir)
        self.ctx = BuildContext(
            device=self.device,
            seed=recipe.seed,
            total_steps=tc.steps,
            prompt=recipe.prompt,
            negative_prompt=recipe.negative_prompt,
            run_dir=self.run_dir,
            cache_dir=_cache_dir(),
            scene=scene,
            reference_view=reference_view,
            half_precision=self.device.type == "cuda" and tc.mixed_precision,
            prior_specs=dict(recipe.priors),
        )
        self.representation = build_plugin("representation", recipe.representation, self.ctx, "representation")
        self.guidance = torch.nn.ModuleList(
            [build_plugin("guidance", g, self.ctx, f"guidance.{i}") for i, g in enumerate(recipe.guidance)]
        ).to(self.device)
        self.sampler = CameraSampler(recipe.cameras)
        self.resolution = Schedule.parse(tc.resolution, "trainer.resolution").resolve(tc.steps)
        self.use_amp = self.device.type == "cuda" and tc.mixed_precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedules = []
        self.start_step = 0
        self._stop_requested = False

    # ----- optimisation set-up --------------------------------------------------------------
    def declared_groups(self) -> list[dict]:
        """Every trainable group: the representation's, each guidance's and each shared prior's."""
        groups = list(self.representation.param_groups())
        for i, guidance in enumerate(self.guidance):
            groups += [{**g, "name": f"guidance.{i}.{g.get('name', 'params')}"} for g in guidance.param_groups()]
        for key, prior in self.ctx.priors.items():
            groups += [{**g, "name": f"prior.{key}.{g.get('name', 'params')}"} for g in prior.param_groups()]
        return groups

    def build_optimizer(self) -> None:
        tc = self.recipe.trainer
        self.optimizer, self.lr_schedules = build_optimizer(self.declared_groups(), tc.steps, tc.betas, tc.lr_scale)

    # ----- run directory ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @classmethod
    def create(cls, recipe: RecipeConfig, run_dir: Path, quiet: bool = False) -> "Trainer":
        run_dir = Path(run_dir)
        check_fresh_run_dir(run_dir)
        source = None
        if recipe.init_from:
            from distill3d.engine.recipe import check_capabilities

            source_recipe, source = load_run(Path(recipe.init_from))
            check_capabilities(recipe, source_recipe.representation["name"])
        created = not run_dir.exists()
        lock = lock_run_dir(run_dir)
        try:
            check_fresh_run_dir(run_dir)  # again, now that no other process can write here
            trainer = cls(recipe, run_dir, quiet)
            if source is not None:
                done = trainer.representation.initialize_from(source)
                if not quiet:
                    print(f"initialised from {recipe.init_from}: {done}", file=sys.stderr)
            trainer.build_optimizer()
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
        except BaseException:
            lock.release()
            if created:  # bad input leaves nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        trainer._lock = lock
        trainer.metrics_path.unlink(missing_ok=True)
        return trainer

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, quiet: bool = False) -> "Trainer":
        """Continue from the newest checkpoint. Overrides (`resume --set`) are checked against the
        checkpoint before config.yaml is rewritten: a change the checkpoint cannot take (another
        NeRF size) is refused and the run stays as it was."""
        from distill3d.engine.config import apply_overrides

        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
        recipe = resolve_recipe(apply_overrides(yaml.safe_load(config_path.read_text()), overrides))
        lock = lock_run_dir(run_dir)
        try:
            trainer = cls(recipe, run_dir, quiet)
            found = load_latest_checkpoint(trainer.checkpoint_dir, trainer.device)
            try:
                if found is not None:
                    trainer.load_state(found[1])
                else:  # stopped before its first checkpoint: start again, seeded as when created
                    if recipe.init_from:
                        trainer.representation.initialize_from(load_run(Path(recipe.init_from))[1])
                    trainer.build_optimizer()
            except (RuntimeError, ValueError, KeyError) as exc:
                if not overrides:
                    raise
                raise UserError(
                    f"the changed settings ({', '.join(overrides)}) do not fit the run's checkpoint {found[0]}: "
                    f"{str(exc).splitlines()[0]}; nothing was changed, the run resumes as it was without them"
                ) from exc
            if overrides:
                atomic_write_text(config_path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
            truncate_metrics(trainer.metrics_path, trainer.start_step)
        except BaseException:
            lock.release()
            raise
        trainer._lock = lock
        return trainer

    def close(self) -> None:
        """Release the run directory (fit() does this when it returns)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    # ----- checkpoints --------------------------------------------------------------------
    def save(self, step: int) -> Path:
        payload = {
            "representation": self.representation.state_dict(),
            "representation_extra": self.representation.extra_state(),
            "guidance": self.guidance.state_dict(),
            "priors": {key: prior.state_dict() for key, prior in self.ctx.priors.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        return save_checkpoint(self.checkpoint_dir, step, payload, keep=self.recipe.trainer.keep_checkpoints)

    def load_state(self, state: dict) -> None:
        self.representation.load_state_dict(state["representation"])
        self.representation.load_extra_state(state.get("representation_extra", {}))
        self.guidance.load_state_dict(state["guidance"])
        for key, prior_state in state.get("priors", {}).items():
            if key in self.ctx.priors:
                self.ctx.priors[key].load_state_dict(prior_state)
        self.build_optimizer()  # after the representation has its stored parameter shapes
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_step = int(state["step"])

    # ----- the loop -----------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def train_step(self, step: int) -> dict[str, float]:
        tc = self.recipe.trainer
        self.representation.train()
        self.representation.update(step)
        apply_learning_rates(self.optimizer, self.lr_schedules, step, tc.lr_scale, tc.betas)
        cameras = self.sampler.sample(tc.batch_size, step).to(self.device)
        res = int(round(self.resolution(step)))
        amp = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        with amp:
            out = self.representation.render(cameras, RenderSettings(res, res, shading="train", training=True))
            losses: dict[str, torch.Tensor] = {}
            for i, guidance in enumerate(self.guidance):
                if not guidance.active(step):
                    continue
                request = guidance.views(step)
                if request is not None:
                    own_cameras, settings = request
                    own_cameras = own_cameras.to(self.device)
                    terms = guidance(self.representation.render(own_cameras, settings), own_cameras, step)
                else:
                    terms = guidance(out, cameras, step)
                for name, value in terms.items():
                    losses[name if name not in losses else f"{name}_{i}"] = value
            losses.update(self.representation.regularizers(out, step))
            total = sum(losses.values())
        if not torch.isfinite(total):
            bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            last = latest_checkpoint(self.checkpoint_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss became non-finite at step {step} ({bad}); the run stopped and {where}. "
                f"Lower the learning rate (`distill3d resume {self.run_dir} --set trainer.lr_scale=0.5`) or the guidance scale and resume."
            )
        self.optimizer.zero_grad(set_to_none=True)
        if not total.requires_grad:  # e.g. every ray missed the object: nothing to learn this step
            return {"loss": float(total.detach()), "resolution": res, "skipped": 1.0, **self.representation.stats()}
        self.scaler.scale(total).backward()
        if self.use_amp:
            self.scaler.unscale_(self.optimizer)
        hooks = OptimizerHooks(self.optimizer, float(self.scaler.get_scale()) if self.use_amp else 1.0)
        self.representation.after_backward(step, out, hooks)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.representation.after_step(step, hooks)
        logged = {"loss": float(total.detach())}
        logged.update({k: float(v.detach()) for k, v in losses.items()})
        logged["resolution"] = res
        logged.update(self.representation.stats())
        return logged

    def fit(self) -> RunResult:
        tc = self.recipe.trainer
        started = time.perf_counter()
        interrupted = False
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        progress = _Progress(tc.steps, self.start_step, self.quiet)
        step = self.start_step
        try:
            with open(self.metrics_path, "a") as metrics:
                last_time, last_step = time.perf_counter(), step
                while step < tc.steps:
                    logged = self.train_step(step)
                    step += 1
                    progress.advance(step, logged)
                    if step % tc.log_every == 0 or step == tc.steps:
                        now = time.perf_counter()
                        rate = (step - last_step) / max(now - last_time, 1e-9)
                        last_time, last_step = now, step
                        with clear_os_errors(str(self.metrics_path)):
                            metrics.write(json.dumps({"step": step, "steps_per_s": round(rate, 3), **logged}) + "\n")
                            metrics.flush()
                    if self._stop_requested:
                        interrupted = True
                        break
                    if step % tc.checkpoint_every == 0 and step < tc.steps:
                        self.save(step)
            self.save(step)
        except BaseException:
            self.close()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
        finished = step >= tc.steps
        try:
            result_eval = self.finish() if finished else None
        finally:
            self.close()
        return RunResult(self.run_dir, step, finished, interrupted, result_eval, time.perf_counter() - started)

    # ----- outputs ------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def finish(self) -> dict | None:
        """After the last step: evaluation against the scene (if any), the turntable video and the
        exports, each phase announced with its cost; then status.json marks the run finished."""
        from distill3d.engine.evaluation import evaluate_against_reference
        from distill3d.engine.video import write_turntable

        tc = self.recipe.trainer
        self.representation.eval()
        result = None
        if self.ctx.scene is not None:
            t0 = time.perf_counter()
            self._say(f"evaluating {tc.eval_views} views at {tc.eval_resolution}x{tc.eval_resolution} ...")
            result = evaluate_against_reference(self.representation, self.ctx.scene, self.sampler, tc.eval_views, tc.eval_resolution)
            atomic_write_text(self.run_dir / "eval.json", json.dumps(result, indent=2))
            self._say(f"evaluation: psnr {result['psnr']:.2f} dB, mask_iou {result['mask_iou']:.4f} ({time.perf_counter() - t0:.1f} s)")
        frames, resolution = video_budget(self, tc.video_frames, tc.video_resolution)
        t0 = time.perf_counter()
        self._say(f"turntable: {frames} frames at {resolution}x{resolution} ...")
        write_turntable(self.representation, self.sampler, self.run_dir, frames, resolution, tc.video_fps, ("mp4", "gif"))
        self._say(f"turntable written ({time.perf_counter() - t0:.1f} s)")
        exported = []
        if tc.export:
            from distill3d.engine.interfaces import ExportOptions
            from distill3d.representations.mesh.marching_cubes import EmptySurfaceError

            options = ExportOptions(tc.export_resolution, None, tc.export_texture_size, quiet=self.quiet)
            for fmt in tc.export:
                t0 = time.perf_counter()
                self._say(f"exporting {fmt} (surface grid {tc.export_resolution}, texture {tc.export_texture_size}) ...")
                try:
                    exported += [str(p) for p in self.representation.export(fmt, self.run_dir / f"mesh.{fmt}", options)]
                except EmptySurfaceError as exc:  # the run itself is fine: say so (even with --quiet), write nothing
                    print(f"no mesh exported: {exc}", file=sys.stderr, flush=True)
                    break
                self._say(f"exported {fmt} ({time.perf_counter() - t0:.1f} s)")
        glb = self.run_dir / "mesh.glb"
        if self.ctx.scene is not None and str(glb) in exported:  # the exported surface scored too: eval.json "mesh"
            from distill3d.engine.evaluation import add_mesh_evaluation
            from distill3d.representations.mesh.mesh_io import load_mesh

            result = add_mesh_evaluation(self.run_dir, load_mesh(glb), self.ctx.scene, self.sampler, tc.eval_views, tc.eval_resolution)
        status = {"state": "finished", "steps": tc.steps, "eval": None if result is None else {k: result[k] for k in ("psnr", "mask_iou")}, "exported": exported}
        atomic_write_text(self.run_dir / STATUS_FILE, json.dumps(status, indent=2))
        return result


def video_budget(trainer: Trainer, frames: int, resolution: int) -> tuple[int, int]:
    """On CPU a recipe's GPU-sized turntable (120 frames at 512) takes far too long: time one
    frame, and if the whole video would exceed trainer.cpu_video_budget_s, render fewer, smaller
    frames and say so (with the settings that keep the recipe's size)."""
    budget = trainer.recipe.trainer.cpu_video_budget_s
    if trainer.device.type != "cpu" or budget <= 0:
        return frames, resolution
    from distill3d.engine.video import render_turntable

    probe = min(resolution, 64)
    t0 = time.perf_counter()
    render_turntable(trainer.representation, trainer.sampler, 1, probe)
    per_pixel = (time.perf_counter() - t0) / probe**2
    estimate = per_pixel * resolution**2 * frames
    if estimate <= budget:
        return frames, resolution
    new_frames, new_res = frames, resolution
    while per_pixel * new_res**2 * new_frames > budget and (new_res > 128 or new_frames > 40):
        if new_res > 128:
            new_res = max(128, new_res // 2)
        else:
            new_frames = max(40, new_frames // 2)
    trainer._say(
        f"warning: a {frames}-frame turntable at {resolution}x{resolution} would take about {estimate / 60:.0f} min on this CPU; "
        f"rendering {new_frames} frames at {new_res}x{new_res} instead. Keep the recipe's size with "
        f"--set trainer.cpu_video_budget_s=0, or render it later with `distill3d export {trainer.run_dir} --format mp4`."
    )
    return new_frames, new_res


class _Progress:
    """A rich progress bar on a terminal; a line every ~5% otherwise (CI logs)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total = total
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.start = start
        self.bar = None
        if not quiet and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, rate="", losses="")
            self.bar.start()

    def advance(self, step: int, logged: dict[str, float]) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / max(elapsed, 1e-9)
        main = " ".join(f"{k}={v:.4g}" for k, v in logged.items() if k not in ("resolution", "occupied_fraction"))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=f"{rate:.2f} it/s", losses=main)
        elif step == self.total or step % max(self.total // 20, 1) == 0:
            eta = (self.total - step) / max(rate, 1e-9)
            print(f"step {step}/{self.total}  {rate:.2f} it/s  ETA {eta:.0f}s  {main}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

