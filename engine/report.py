"""`distill3d report DIR`: static HTML pages that show runs and work from the folder, offline.

A run directory gets RUN/index.html: its turntable, an interactive 3D viewer of mesh.glb (our own
WebGL2 viewer from report_assets/, inlined; the GLB embedded as base64 because browsers do not let
a page opened from disk fetch files beside it), the loss curve (inline SVG from metrics.jsonl),
the eval figures and the resolved config. A directory of runs (a batch, or a staged run's stages)
gets a filterable grid of them, each card linking to the run's own page; with a batch's
summary.json the grid shows every job's status and the error of failed ones.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from urllib.parse import quote

import yaml

from distill3d.engine.checkpoint import atomic_write_text
from distill3d.engine.errors import UserError

ASSETS = Path(__file__).parent / "report_assets"
MAX_EMBEDDED_GLB = 64 * 1024 * 1024  # bigger meshes are linked, not embedded
OUTPUT_FILES = ("metrics.jsonl", "turntable.gif", "turntable.mp4", "mesh.glb", "eval.json")


class ReportError(UserError):
    """Nothing to report in the given directory."""


def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def is_run(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def has_outputs(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in OUTPUT_FILES)


def _children(directory: Path) -> list[Path]:
    """Sub-directories in order: a staged run's stages as they ran (pipeline.yaml), else by name."""
    directory = Path(directory)
    children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (directory / "pipeline.yaml").exists():
        stages = [s["name"] for s in (yaml.safe_load((directory / "pipeline.yaml").read_text()) or {}).get("stages", [])]
        children.sort(key=lambda p: stages.index(p.name) if p.name in stages else len(stages))
    return children


def _runs_below(directory: Path) -> list[Path]:
    """Child directories that are runs, or hold runs (a staged run's stages)."""
    found = []
    for child in _children(directory):
        if is_run(child) or any(is_run(grandchild) for grandchild in child.iterdir() if grandchild.is_dir()):
            found.append(child)
    return found


def _page(title: str, body: str, scripts: tuple[str, ...]) -> str:
    # "</" inside inlined code would end the <script> element early.
    inlined = [_asset(name).replace("</", "<\\/") for name in scripts]
    code = "\n".join(f"<script>\n{text}\n</script>" for text in inlined)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(title)}</title><style>\n{_asset('report.css')}\n</style>{code}</head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


# ----- charts ------------------------------------------------------------------------------------
def _read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return rows


def loss_chart(rows: list[dict], key: str = "loss", width: int = 480, height: int = 220) -> str:
    """An inline SVG line chart of metrics[key] over steps (log scale when the values span decades)."""
    points = [(r["step"], float(r[key])) for r in rows if key in r and "step" in r and math.isfinite(float(r[key]))]
    if len(points) < 2:
        return "<p class=\"muted\">not enough logged steps for a loss curve yet</p>"
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    log = min(values) > 0 and max(values) / min(values) > 20
    ys = [math.log10(v) for v in values] if log else values
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    left, right, top, bottom = 52, 10, 10, 28
    sx = lambda s: left + (s - x0) / max(x1 - x0, 1e-12) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    line = " ".join(f"{sx(s):.1f},{sy(y):.1f}" for s, y in zip(steps, ys))
    # SDS losses are noisy by nature: a centred moving average (no lag) shows the trend.
    half = max(1, len(ys) // 25)
    smooth = [sum(ys[max(0, i - half) : i + half + 1]) / len(ys[max(0, i - half) : i + half + 1]) for i in range(len(ys))]
    trend = " ".join(f"{sx(s):.1f},{sy(y):.1f}" for s, y in zip(steps, smooth))
    fmt = (lambda y: f"{10 ** y:.3g}") if log else (lambda y: f"{y:.3g}")
    return (
        f"<svg class=\"chart loss-curve\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{_esc(key)} over steps\">"
        f"<rect x=\"{left}\" y=\"{top}\" width=\"{width - left - right}\" height=\"{height - top - bottom}\" fill=\"none\" stroke=\"#dde1e7\"/>"
        f"<polyline class=\"raw\" points=\"{line}\" fill=\"none\" stroke=\"#9dbbe0\" stroke-width=\"1\"/>"
        f"<polyline class=\"trend\" points=\"{trend}\" fill=\"none\" stroke=\"#0b5cad\" stroke-width=\"2\"><title>moving average</title></polyline>"
        f"<text x=\"{left - 4}\" y=\"{top + 10}\" text-anchor=\"end\">{fmt(y1)}</text>"
        f"<text x=\"{left - 4}\" y=\"{height - bottom}\" text-anchor=\"end\">{fmt(y0)}</text>"
        f"<text x=\"{left}\" y=\"{height - 8}\">step {x0}</text>"
        f"<text x=\"{width - right}\" y=\"{height - 8}\" text-anchor=\"end\">step {x1}</text>"
        f"<text x=\"{(left + width) / 2}\" y=\"{height - 8}\" text-anchor=\"middle\">{_esc(key)}{' (log)' if log else ''}</text>"
        "</svg>"
    )


def per_view_chart(per_view: list[dict], width: int = 480, height: int = 160) -> str:
    """Bars of PSNR per eval view (azimuth on the axis): where the result is weak."""
    if not per_view:
        return ""
    values = [float(v["psnr"]) for v in per_view]
    top_value = max(max(values), 1.0)
    left, bottom, top = 30, 22, 8
    bar = (width - left) / len(values)
    parts = [f"<svg class=\"chart per-view\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"PSNR per view\">"]
    for i, (view, value) in enumerate(zip(per_view, values)):
        h = max(value, 0) / top_value * (height - bottom - top)
        x = left + i * bar
        parts.append(f"<rect x=\"{x + 2:.1f}\" y=\"{height - bottom - h:.1f}\" width=\"{bar - 4:.1f}\" height=\"{h:.1f}\" fill=\"#7aa7d8\"><title>{value:.2f} dB</title></rect>")
        parts.append(f"<text x=\"{x + bar / 2:.1f}\" y=\"{height - 6}\" text-anchor=\"middle\">{float(view.get('azimuth', 0)):.0f}&#176;</text>")
    parts.append(f"<text x=\"{left - 4}\" y=\"{top + 10}\" text-anchor=\"end\">{top_value:.0f}</text></svg>")
    return "".join(parts)


# ----- one run -----------------------------------------------------------------------------------
def _eval_panel(run_dir: Path) -> str:
    path = run_dir / "eval.json"
    if not path.exists():
        return "<p class=\"muted\">no eval.json (runs without a reference scene are not scored)</p>"
    data = json.loads(path.read_text())
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
        for k, v in data.items()
        if k != "per_view"
    )
    return f"<table class=\"figures\">{rows}</table>" + per_view_chart(data.get("per_view", []))


def _viewer_panel(run_dir: Path) -> str:
    glb = run_dir / "mesh.glb"
    if not glb.exists():
        return "<p class=\"muted\">no mesh.glb (export one with <code>distill3d export RUN --format glb</code>)</p>"
    if glb.stat().st_size > MAX_EMBEDDED_GLB:
        return f"<p>the mesh is too large to embed; <a href=\"mesh.glb\">download mesh.glb</a></p>"
    data = base64.b64encode(glb.read_bytes()).decode("ascii")
    return (
        "<canvas class=\"glb-viewer\" data-glb=\"glb-data\" title=\"drag to orbit, wheel to zoom, double-click to reset\"></canvas>"
        f"<script type=\"application/octet-stream\" id=\"glb-data\">{data}</script>"
        "<p class=\"muted\">drag to orbit, wheel to zoom, double-click to reset &middot; <a href=\"mesh.glb\">mesh.glb</a></p>"
    )


def _turntable_panel(run_dir: Path) -> str:
    if (run_dir / "turntable.gif").exists():
        extra = " &middot; <a href=\"turntable.mp4\">MP4</a>" if (run_dir / "turntable.mp4").exists() else ""
        return f"<img class=\"turntable\" src=\"turntable.gif\" alt=\"turntable\"><p class=\"muted\"><a href=\"turntable.gif\">GIF</a>{extra}</p>"
    if (run_dir / "turntable.mp4").exists():
        return "<video class=\"turntable\" src=\"turntable.mp4\" autoplay loop muted playsinline></video>"
    return "<p class=\"muted\">no turntable yet (written when the run finishes)</p>"


def _job_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "job.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_run_page(run_dir: Path, back: str | None = None) -> Path:
    run_dir = Path(run_dir)
    config_text = (run_dir / "config.yaml").read_text()
    config = yaml.safe_load(config_text) or {}
    state = _job_state(run_dir)
    title = run_dir.name
    facts = [f"recipe {_esc(config.get('name', '?'))}", f"seed {_esc(config.get('seed', '?'))}",
             f"{_esc((config.get('trainer') or {}).get('steps', '?'))} steps"]
    status = ""
    if state.get("status"):
        status = f" <span class=\"badge {_esc(state['status'])}\">{_esc(state['status'])}</span>"
        if state.get("seconds") is not None:
            facts.append(f"{state['seconds']:.1f} s")
    error = f"<pre class=\"error\">{_esc(state['error'])}</pre>" if state.get("error") else ""
    back_link = f"<p><a href=\"{_esc(back)}\">&larr; all runs</a></p>" if back else ""
    prompt = f"<p>{_esc(config['prompt'])}</p>" if config.get("prompt") else ""
    log = " &middot; <a href=\"job.log\">job.log</a>" if (run_dir / "job.log").exists() else ""
    body = (
        f"{back_link}<h1>{_esc(title)}{status}</h1>{prompt}<p class=\"muted\">{' &middot; '.join(facts)}{log}</p>{error}"
        "<div class=\"panels\">"
        f"<section class=\"panel\" id=\"turntable\"><h2>Turntable</h2>{_turntable_panel(run_dir)}</section>"
        f"<section class=\"panel\" id=\"viewer\"><h2>3D model</h2>{_viewer_panel(run_dir)}</section>"
        f"<section class=\"panel\" id=\"loss\"><h2>Loss</h2>{loss_chart(_read_metrics(run_dir))}</section>"
        f"<section class=\"panel\" id=\"eval\"><h2>Evaluation</h2>{_eval_panel(run_dir)}</section>"
        "</div>"
        f"<section class=\"panel\" id=\"config\" style=\"margin-top:16px\"><details><summary><b>Resolved config</b> (config.yaml)</summary><pre>{_esc(config_text)}</pre></details></section>"
    )
    path = run_dir / "index.html"
    atomic_write_text(path, _page(f"{title} - distill3d", body, ("glb_viewer.js",)))
    return path


# ----- many runs ---------------------------------------------------------------------------------
def _thumbnail_dir(run: Path) -> Path | None:
    """The directory whose turntable stands for a run: itself, or a staged run's last stage."""
    if (run / "turntable.gif").exists():
        return run
    stages = [p for p in _children(run) if (p / "turntable.gif").exists()] if run.is_dir() else []
    return stages[-1] if stages else None


def _card(directory: Path, record: dict) -> str:
    run = directory / record["run_dir"]
    status = record.get("status") or "unknown"
    link = f"{quote(record['run_dir'])}/index.html" if (run / "index.html").exists() else None
    thumb_dir = _thumbnail_dir(run)
    if thumb_dir is not None:
        src = quote(str(thumb_dir.relative_to(directory).as_posix())) + "/turntable.gif"
        thumb = f"<img class=\"thumb\" src=\"{src}\" alt=\"turntable of {_esc(record['name'])}\" loading=\"lazy\">"
    else:
        thumb = f"<div class=\"nothumb\">{_esc(status)}</div>"
    if link:
        thumb = f"<a href=\"{link}\">{thumb}</a>"
    figures = record.get("eval") or {}
    facts = []
    if record.get("seconds") is not None:
        facts.append(f"{record['seconds']:.1f} s")
    if "psnr" in figures:
        facts.append(f"{figures['psnr']:.2f} dB")
    if "mask_iou" in figures:
        facts.append(f"IoU {figures['mask_iou']:.3f}")
    if record.get("resumed_from"):
        facts.append(f"resumed at {record['resumed_from']}")
    error = record.get("error") or ""
    search = " ".join(str(record.get(k) or "") for k in ("name", "prompt", "image", "error")).lower()
    name = f"<a class=\"name\" href=\"{link}\">{_esc(record['name'])}</a>" if link else f"<span class=\"name\">{_esc(record['name'])}</span>"
    return (
        f"<article class=\"card\" data-status=\"{_esc(status)}\" data-search=\"{_esc(search)}\">{thumb}"
        f"<div>{name} <span class=\"badge {_esc(status)}\">{_esc(status)}</span></div>"
        + (f"<div class=\"muted\">{_esc(record['prompt'])}</div>" if record.get("prompt") else "")
        + (f"<div class=\"muted\">{_esc(Path(record['image']).name)}</div>" if record.get("image") else "")
        + (f"<div class=\"muted\">{' &middot; '.join(facts)}</div>" if facts else "")
        + (f"<pre class=\"error\">{_esc(error)}</pre>" if error and status != "done" else "")
        + "</article>"
    )


def _records_from_dirs(directory: Path) -> list[dict]:
    records = []
    for run in _runs_below(directory):
        state = _job_state(run)
        config = {}
        if is_run(run):
            config = yaml.safe_load((run / "config.yaml").read_text()) or {}
        status = state.get("status") or ("done" if _thumbnail_dir(run) is not None else "incomplete")
        eval_figures = state.get("eval")
        if eval_figures is None and (run / "eval.json").exists():
            data = json.loads((run / "eval.json").read_text())
            eval_figures = {k: data[k] for k in ("psnr", "mask_iou") if k in data}
        records.append({"name": run.name, "run_dir": run.name, "status": status, "prompt": config.get("prompt", ""),
                        "seconds": state.get("seconds"), "error": state.get("error"), "eval": eval_figures})
    return records


def write_collection_page(directory: Path, records: list[dict], title: str, subtitle: str = "", back: str | None = None) -> Path:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("status") or "unknown"] = counts.get(r.get("status") or "unknown", 0) + 1
    buttons = "".join(
        f"<button data-status=\"{_esc(s)}\" class=\"{'active' if s == 'all' else ''}\">{_esc(s)} ({len(records) if s == 'all' else counts[s]})</button>"
        for s in ["all"] + sorted(counts)
    )
    cards = "".join(_card(directory, r) for r in records)
    back_link = f"<p><a href=\"{_esc(back)}\">&larr; back</a></p>" if back else ""
    body = (
        f"{back_link}<h1>{_esc(title)}</h1><p class=\"muted\">{subtitle}</p>"
        "<div class=\"gallery\"><div class=\"toolbar\">"
        "<input class=\"filter-text\" type=\"search\" placeholder=\"filter by name, prompt or error\">"
        f"<span class=\"filter-status\">{buttons}</span><span class=\"filter-count muted\"></span></div>"
        f"<div class=\"grid\">{cards}</div></div>"
    )
    path = Path(directory) / "index.html"
    atomic_write_text(path, _page(f"{title} - distill3d", body, ("gallery.js",)))
    return path


def _write_run_or_stages(run: Path, back: str) -> None:
    if is_run(run):
        if has_outputs(run):
            write_run_page(run, back)
    elif run.is_dir() and _runs_below(run):
        for stage in _runs_below(run):
            _write_run_or_stages(stage, "../index.html")
        write_collection_page(run, _records_from_dirs(run), run.name, "stages of a staged run", back)


def write_batch_report(out: Path, summary: dict, changed: list[str] | None = None) -> Path:
    """The batch gallery from summary.json's records; run pages rewritten for `changed` jobs
    (all jobs when None)."""
    out = Path(out)
    for record in summary["jobs"]:
        if changed is None or record["name"] in changed:
            _write_run_or_stages(out / record["run_dir"], "../index.html")
    counts = summary.get("counts", {})
    subtitle = (
        f"recipe {_esc(summary.get('recipe', '?'))} &middot; {len(summary['jobs'])} jobs: "
        + ", ".join(f"{n} {_esc(s)}" for s, n in counts.items() if n)
    )
    return write_collection_page(out, summary["jobs"], f"batch {out.name}", subtitle)


def write_report(directory: Path) -> Path:
    """index.html for a run directory, a staged run, a batch directory or any folder of runs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory; give a run directory or a batch directory")
    summary_path = directory / "summary.json"
    if summary_path.exists():
        return write_batch_report(directory, json.loads(summary_path.read_text()))
    if is_run(directory):
        if not has_outputs(directory):
            raise ReportError(
                f"{directory} is a run without outputs yet (no {', '.join(OUTPUT_FILES)}); "
                f"let it train (or `distill3d resume {directory}`) and run report again"
            )
        return write_run_page(directory)
    runs = _runs_below(directory)
    if not runs:
        raise ReportError(
            f"{directory} holds no run outputs: no config.yaml, no summary.json and no run directories inside; "
            "give the --out directory of `distill3d generate`, `demo` or `batch`"
        )
    for run in runs:
        _write_run_or_stages(run, "../index.html")
    return write_collection_page(directory, _records_from_dirs(directory), directory.name, f"{len(runs)} runs")
