"""`distill3d batch` and `distill3d report`: many runs at once, and the gallery page of their results.

engine/cli.py adds them to its app with `register(app, friendly_errors)`; taking both as arguments
keeps this module from importing cli (which `python -m distill3d.engine.cli` would load twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from distill3d.engine.errors import UserError


def _format_eval(figures: dict | None) -> str:
    if not figures:
        return ""
    parts = []
    if "psnr" in figures:
        parts.append(f"psnr {figures['psnr']:.2f} dB")
    if "mask_iou" in figures:
        parts.append(f"iou {figures['mask_iou']:.3f}")
    return ", ".join(parts)


def _progress(event: str, record: dict, counts: dict) -> None:
    line = f"[batch] {counts['done']}/{counts['total']} done, {counts['running']} running, {counts['failed']} failed | {record['name']}: "
    if event == "running":
        line += "started" + (f" (attempt {record['attempts'] + 1})" if record.get("attempts") else "")
    elif event == "submitted":
        line += "submitted to Ray"
    elif record.get("skipped"):
        line += "already done, skipped"
    elif record["status"] == "done":
        figures = _format_eval(record.get("eval"))
        resumed = f", resumed from step {record['resumed_from']}" if record.get("resumed_from") else ""
        line += f"done in {record['seconds']:.1f} s{resumed}" + (f" ({figures})" if figures else "")
    else:
        first = (record.get("error") or "").splitlines()[0] if record.get("error") else ""
        line += f"{record['status'].upper()}: {first}"
    typer.echo(line, err=True)


def summary_table(jobs: list[dict]) -> str:
    """The terminal table: one row per job with status, time and eval figures."""
    rows = [("job", "status", "time", "psnr", "iou", "note")]
    for r in jobs:
        figures = r.get("eval") or {}
        note = ""
        if r["status"] in ("failed", "interrupted") and r.get("error"):
            note = r["error"].splitlines()[0][:70]
        elif r.get("skipped"):
            note = "already done"
        elif r.get("resumed_from"):
            note = f"resumed from step {r['resumed_from']}"
        rows.append((
            r["name"],
            r["status"],
            f"{r['seconds']:.1f}s" if r.get("seconds") is not None else "",
            f"{figures['psnr']:.2f}" if "psnr" in figures else "",
            f"{figures['mask_iou']:.3f}" if "mask_iou" in figures else "",
            note,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


class _RayAddressOptional(TyperCommand):
    """`--ray` may come without an address (then a local Ray): click options cannot have an
    optional value, so a bare `--ray` gets the address "local" before parsing."""

    def parse_args(self, ctx, args):
        from distill3d.engine.batch_ray import LOCAL

        fixed = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append(LOCAL)
        return super().parse_args(ctx, fixed)


def batch(
    jobs: Path = typer.Argument(..., help="A text file (a prompt a line), a folder of images, or a YAML/JSONL list of jobs."),
    recipe: str = typer.Option(..., help="Recipe name (see `distill3d recipes`) or a .yaml path, for every job."),
    out: Path = typer.Option(..., help="Batch directory: one run directory per job, summary.json and index.html."),
    workers: int = typer.Option(1, help="Jobs at a time (locally one per GPU where there are GPUs; with a local Ray, its CPU slots)."),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Run jobs as Ray tasks: --ray alone starts a local Ray, --ray HOST:PORT joins a cluster (OUT must be shared).",
    ),
    scene: Optional[str] = typer.Option(None, "--scene", "--reference", help="Scene for every job without its own (oracle recipes and evaluation; a file or a shipped scene name)."),
    set_: List[str] = typer.Option([], "--set", help="Recipe override key.path=value for every job (repeatable); jobs add their own."),
    gallery: bool = typer.Option(True, "--report/--no-report", help="Write OUT/index.html (the gallery) as jobs finish."),
):
    """Run many jobs (prompts, images, a job list); rerun to skip finished jobs and resume interrupted ones."""
    from distill3d.engine.batch import BatchOptions, BatchState, load_jobs, run_local
    from distill3d.engine.recipe import recipe_path

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    job_list = load_jobs(jobs)
    for job in job_list:
        job.scene = job.scene or scene
    recipe_path(recipe)  # an unknown recipe fails here, not once per job
    if ray is not None:
        from distill3d.engine.batch_ray import import_ray

        import_ray()
    out.mkdir(parents=True, exist_ok=True)
    options = BatchOptions(recipe=recipe, out=out, overrides=list(set_), workers=workers, report=gallery)

    def on_event(event: str, record: dict) -> None:
        counts = state.counts()
        counts["total"] = len(job_list)
        _progress(event, record, counts)

    state = BatchState(job_list, options, on_event)
    where = f"Ray ({ray})" if ray is not None else f"{min(workers, len(job_list))} local worker(s)"
    typer.echo(f"[batch] {len(job_list)} jobs, recipe {recipe}, on {where} -> {state.out}", err=True)
    if ray is not None:
        from distill3d.engine.batch_ray import run_ray

        run_ray(job_list, state, ray)
    else:
        run_local(job_list, state)
    summary = state.summary()
    typer.echo(summary_table(summary["jobs"]))
    counts = summary["counts"]
    typer.echo(f"[batch] {counts['done']} done, {counts['failed']} failed, {counts.get('interrupted', 0)} interrupted; "
               f"summary {state.out / 'summary.json'}" + (f", gallery {state.out / 'index.html'}" if gallery else ""), err=True)
    if counts["done"] != len(job_list):
        raise typer.Exit(1)


def report(
    directory: Path = typer.Argument(..., help="A run directory or a batch directory."),
):
    """Write DIR/index.html: turntables, 3D viewers, loss curves, eval figures, configs; works offline."""
    from distill3d.engine.report import write_report

    path = write_report(directory)
    typer.echo(str(path))



def register(app: typer.Typer, friendly_errors) -> None:
    app.command(cls=_RayAddressOptional)(friendly_errors(batch))
    app.command()(friendly_errors(report))
