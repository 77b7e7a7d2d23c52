"""The optimisation loop. It sees only the Representation / Guidance protocols.

Run directory layout:
  config.yaml       the fully resolved recipe
  metrics.jsonl     one JSON object per logged step
  checkpoints/      step_XXXXXXX.pt, written atomically, newest `keep_checkpoints` kept
  eval.json         PSNR and mask IoU against the exact reference (runs with a reference scene)
  turntable.mp4/.gif
"""

from __future__ import annotations

import json
import os
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
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from distill3d.engine.config import to_dict
from distill3d.engine.errors import NonFiniteLossError, UserError
from distill3d.engine.interfaces import BuildContext, RenderSettings
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


def load_run(run_dir: Path, purpose: str = "--init-from"):
    """(recipe, representation at the latest checkpoint) of a finished run, without building its
    guidance: no diffusion model is loaded just to read a NeRF. `purpose` starts the error messages."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.exists():
        raise UserError(f"{purpose} {run_dir}: not a run directory (no config.yaml)")
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise UserError(f"{purpose} {run_dir}: the run has no checkpoint yet")
    recipe = resolve_recipe(yaml.safe_load(config_path.read_text()))
    ctx = BuildContext(device=pick_device(recipe.trainer.device), total_steps=recipe.trainer.steps)
    representation = build_plugin("representation", recipe.representation, ctx, "representation")
    state = load_checkpoint(ckpt, ctx.device)
    representation.load_state_dict(state["representation"])
    representation.load_extra_state(state.get("representation_extra", {}))
    return recipe, representation.eval()


def load_run_representation(run_dir: Path):
    """The representation of a run at its latest checkpoint (see load_run)."""
    return load_run(run_dir)[1]


@dataclass
class RunResult:
    run_dir: Path
    completed_steps: int
    finished: bool
    interrupted: bool
    eval: dict | None
    seconds: float


class Trainer:
    def __init__(self, recipe: RecipeConfig, run_dir: Path, quiet: bool = False):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        tc = recipe.trainer
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.device = pick_device(tc.device)
        seed_everything(recipe.seed)
        reference = Path(recipe.reference) if recipe.reference else None
        if reference is not None and not reference.exists():
            raise UserError(f"reference file {reference} does not exist")
        self.ctx = BuildContext(
            device=self.device,
            seed=recipe.seed,
            total_steps=tc.steps,
            prompt=recipe.prompt,
            negative_prompt=recipe.negative_prompt,
            run_dir=self.run_dir,
            cache_dir=Path(os.environ.get("DISTILL3D_CACHE", Path.home() / ".cache" / "distill3d")),
            reference=reference,
            half_precision=self.device.type == "cuda" and tc.mixed_precision,
        )
        self.representation = build_plugin("representation", recipe.representation, self.ctx, "representation")
        self.guidance = torch.nn.ModuleList(
            [build_plugin("guidance", g, self.ctx, f"guidance.{i}") for i, g in enumerate(recipe.guidance)]
        ).to(self.device)
        self.sampler = CameraSampler(recipe.cameras)
        self.resolution = Schedule.parse(tc.resolution, "trainer.resolution").resolve(tc.steps)
        groups = self.representation.param_groups()
        trainable_guidance = [p for p in self.guidance.parameters() if p.requires_grad]
        if trainable_guidance:
            groups.append({"name": "guidance", "params": trainable_guidance, "lr": 1e-3})
        for g in groups:
            g["lr"] = g.get("lr", 1e-3) * tc.lr_scale
        self.optimizer = torch.optim.Adam(groups, betas=tc.betas)
        self.use_amp = self.device.type == "cuda" and tc.mixed_precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_step = 0
        self._stop_requested = False

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
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            raise UserError(f"{run_dir} already holds a run; continue it with `distill3d resume {run_dir}` or pick another --out")
        source = load_run_representation(Path(recipe.init_from)) if recipe.init_from else None
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = cls(recipe, run_dir, quiet)
        if source is not None:
            done = trainer.representation.initialize_from(source)
            if not quiet:
                print(f"initialised from {recipe.init_from}: {done}", file=sys.stderr)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
        trainer.metrics_path.unlink(missing_ok=True)
        return trainer

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, quiet: bool = False) -> "Trainer":
        from distill3d.engine.config import apply_overrides

        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
        recipe = resolve_recipe(apply_overrides(yaml.safe_load(config_path.read_text()), overrides))
        trainer = cls(recipe, run_dir, quiet)
        if overrides:
            atomic_write_text(config_path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
        ckpt = latest_checkpoint(trainer.checkpoint_dir)
        if ckpt is not None:
            trainer.load(ckpt)
        trainer._truncate_metrics(trainer.start_step)
        return trainer

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past the checkpoint so a resumed run logs each step once."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    # ----- checkpoints --------------------------------------------------------------------
    def save(self, step: int) -> Path:
        payload = {
            "representation": self.representation.state_dict(),
            "representation_extra": self.representation.extra_state(),
            "guidance": self.guidance.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        return save_checkpoint(self.checkpoint_dir, step, payload, keep=self.recipe.trainer.keep_checkpoints)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.device)
        self.representation.load_state_dict(state["representation"])
        self.representation.load_extra_state(state.get("representation_extra", {}))
        self.guidance.load_state_dict(state["guidance"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_step = int(state["step"])

    # ----- the loop -----------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def train_step(self, step: int) -> dict[str, float]:
        tc = self.recipe.trainer
        self.representation.train()
        self.representation.update(step)
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
        self.scaler.scale(total).backward()
        self.representation.after_backward(step, out, self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logged = {"loss": float(total.detach())}
        logged.update({k: float(v.detach()) for k, v in losses.items()})
        logged["resolution"] = res
        if "occupied_fraction" in out.extras:
            logged["occupied_fraction"] = float(out.extras["occupied_fraction"])
        return logged

    def fit(self) -> RunResult:
        tc = self.recipe.trainer
        started = time.perf_counter()
        interrupted = False
        previous = signal.signal(signal.SIGINT, self._request_stop)
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
                        metrics.write(json.dumps({"step": step, "steps_per_s": round(rate, 3), **logged}) + "\n")
                        metrics.flush()
                    if self._stop_requested:
                        interrupted = True
                        break
                    if step % tc.checkpoint_every == 0 and step < tc.steps:
                        self.save(step)
        finally:
            signal.signal(signal.SIGINT, previous)
            progress.close()
        self.save(step)
        finished = step >= tc.steps
        result_eval = self.finish() if finished else None
        return RunResult(self.run_dir, step, finished, interrupted, result_eval, time.perf_counter() - started)

    # ----- outputs ------------------------------------------------------------------------
    def finish(self) -> dict | None:
        """Evaluation against the reference (if any) and the turntable video."""
        from distill3d.engine.evaluation import evaluate_against_reference
        from distill3d.engine.video import write_turntable

        tc = self.recipe.trainer
        self.representation.eval()
        result = None
        if self.ctx.reference is not None:
            result = evaluate_against_reference(self.representation, self.ctx.reference, self.sampler, tc.eval_views, tc.eval_resolution)
            atomic_write_text(self.run_dir / "eval.json", json.dumps(result, indent=2))
        write_turntable(self.representation, self.sampler, self.run_dir, tc.video_frames, tc.video_resolution, tc.video_fps, ("mp4", "gif"))
        if tc.export:
            from distill3d.representations.mesh.marching_cubes import EmptySurfaceError
            from distill3d.representations.mesh.mesh_io import save_mesh

            try:
                mesh, _ = self.representation.export_mesh(tc.export_resolution, None, tc.export_texture_size)
            except EmptySurfaceError as exc:  # the run itself is fine: say so, write nothing
                print(f"no mesh exported: {exc}", file=sys.stderr)
                return result
            for fmt in tc.export:
                save_mesh(mesh, self.run_dir / f"mesh.{fmt}")
            if self.ctx.reference is not None:  # the exported surface scored too: eval.json "mesh"
                from distill3d.engine.evaluation import add_mesh_evaluation

                result = add_mesh_evaluation(self.run_dir, mesh, self.ctx.reference, self.sampler, tc.eval_views, tc.eval_resolution)
        return result


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
