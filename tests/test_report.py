"""`distill3d report`: what goes into the pages (the browser test checks how they behave)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill3d.engine.cli import app
from distill3d.engine.report import ReportError, loss_chart, write_report


def fake_run(run_dir: Path, prompt: str = "a mug", glb: bytes | None = b"glTF-bytes", steps=(10, 20, 30)) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"name: oracle-nerf\nseed: 7\nprompt: {json.dumps(prompt)}\ntrainer: {{steps: 30}}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 100.0 / s**2}) + "\n" for s in steps))
    (run_dir / "eval.json").write_text(json.dumps({"psnr": 31.25, "mask_iou": 0.9812, "per_view": [{"azimuth": 0.0, "psnr": 31.25}]}))
    (run_dir / "turntable.gif").write_bytes(b"GIF89a")
    if glb is not None:
        (run_dir / "mesh.glb").write_bytes(glb)
    return run_dir


def test_run_page_holds_everything_offline(tmp_path):
    run = fake_run(tmp_path / "run", prompt="a <b>bold</b> mug", glb=bytes(range(256)))
    html = write_report(run).read_text()
    # The GLB is embedded (a page opened from disk may not fetch files beside it).
    data = re.search(r'<script type="application/octet-stream" id="glb-data">([^<]*)</script>', html).group(1)
    assert base64.b64decode(data) == bytes(range(256))
    # The viewer code ships inlined: nothing is loaded from the network.
    assert "class GLBViewer" in html and not re.search(r"(src|href)=\"(https?:)?//", html)
    assert 'src="turntable.gif"' in html
    assert "a &lt;b&gt;bold&lt;/b&gt; mug" in html and "<b>bold</b>" not in html  # the prompt is text, not markup
    assert "31.25" in html and "0.9812" in html and "seed: 7" in html
    assert html.count("<polyline") == 2  # the logged loss and its moving average


def test_loss_chart_scales():
    rows = [{"step": s, "loss": 10.0 ** (-s / 10)} for s in range(10, 51, 10)]
    chart = loss_chart(rows)
    assert "(log)" in chart and ">0.1<" in chart and ">1e-05<" in chart
    points = [tuple(map(float, p.split(","))) for p in re.search(r'class="raw" points="([^"]+)"', chart).group(1).split()]
    ys = [y for _, y in points]
    assert ys == sorted(ys) and len(set(round(b - a, 3) for a, b in zip(ys, ys[1:]))) == 1  # log10 -> evenly spaced
    linear = loss_chart([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 3.0}])
    assert "(log)" not in linear
    assert "not enough logged steps" in loss_chart([{"step": 1, "loss": 2.0}])


def test_folder_of_runs_and_staged_run(tmp_path):
    fake_run(tmp_path / "runs" / "mug")
    fake_run(tmp_path / "runs" / "staged" / "coarse", glb=None)
    fake_run(tmp_path / "runs" / "staged" / "refine")
    (tmp_path / "runs" / "notes").mkdir()
    index = write_report(tmp_path / "runs").read_text()
    assert index.count('class="card"') == 2
    assert 'href="mug/index.html"' in index and 'src="staged/refine/turntable.gif"' in index
    staged = (tmp_path / "runs" / "staged" / "index.html").read_text()
    assert staged.count('class="card"') == 2 and 'href="refine/index.html"' in staged
    assert (tmp_path / "runs" / "staged" / "coarse" / "index.html").exists()


def test_batch_summary_shows_status_and_errors(tmp_path):
    fake_run(tmp_path / "b" / "ok")
    summary = {"recipe": "oracle-nerf", "counts": {"done": 1, "failed": 1, "pending": 1}, "jobs": [
        {"name": "ok", "run_dir": "ok", "status": "done", "prompt": "a mug", "seconds": 3.5, "eval": {"psnr": 31.25}},
        {"name": "bad", "run_dir": "bad", "status": "failed", "prompt": "x", "error": "reference file <x> does not exist"},
        {"name": "later", "run_dir": "later", "status": "pending", "prompt": "y"},
    ]}
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    index = write_report(tmp_path / "b").read_text()
    cards = re.findall(r'<article class="card" data-status="(\w+)"', index)
    assert cards == ["done", "failed", "pending"]
    assert "reference file &lt;x&gt; does not exist" in index
    assert ">failed (1)<" in index and ">all (3)<" in index
    assert (tmp_path / "b" / "ok" / "index.html").exists()


def test_staged_run_in_pipeline_order(tmp_path):
    run = tmp_path / "c2f"
    fake_run(run / "nerf-coarse")
    fake_run(run / "a-refine")  # sorts first by name, ran last
    (run / "pipeline.yaml").write_text("name: x\nstages:\n- {name: nerf-coarse}\n- {name: a-refine}\n")
    write_report(tmp_path)
    staged = (run / "index.html").read_text()
    assert re.findall(r'href="([\w-]+)/index.html"><img', staged) == ["nerf-coarse", "a-refine"]
    assert 'src="c2f/a-refine/turntable.gif"' in (tmp_path / "index.html").read_text()  # the result is the last stage


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "holds no run outputs"),
    (lambda d: (d / "config.yaml").write_text("name: x\n"), "a run without outputs yet"),
])
def test_nothing_to_report_is_a_clear_error(tmp_path, setup, fragment):
    setup(tmp_path)
    with pytest.raises(ReportError, match=fragment):
        write_report(tmp_path)


def test_report_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "error: " in result.output and "is not a directory" in result.output
    fake_run(tmp_path / "run")
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "run" / "index.html")
