"""The loop end to end at toy sizes: run directory, resume after SIGINT/SIGKILL, NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill3d.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from distill3d.engine.errors import NonFiniteLossError
from distill3d.engine.recipe import load_recipe
from distill3d.engine.trainer import Trainer

TINY = [
    "trainer.resolution=16", "trainer.eval_resolution=16", "trainer.eval_views=2",
    "trainer.video_frames=2", "trainer.video_resolution=16", "trainer.log_every=1",
    "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64",
    "representation.samples_per_ray=16", "representation.occupancy.warmup_steps=4", "representation.occupancy.update_every=4",
    "representation.occupancy.resolution=16",
]


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "distill3d.engine.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def demo_args(out: Path, steps: int, every: int):
    sets = [*TINY, f"trainer.checkpoint_every={every}"]
    return ["demo", "--steps", str(steps), "--out", str(out), "--quiet", *sum((["--set", s] for s in sets), [])]


def final_state(run: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))["representation"]


def wait_for_checkpoint(run: Path, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if list_checkpoints(run / "checkpoints"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = cli(*demo_args(out, 60, 5))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def test_run_directory_is_complete(reference_run):
    run = reference_run
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "turntable.mp4", "turntable.gif"):
        assert (run / name).stat().st_size > 0, name
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 61))
    assert all("sds" in l and "loss" in l and "steps_per_s" in l for l in lines)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["views"] == 2 and 0 <= ev["mask_iou"] <= 1 and ev["psnr"] > 5
    assert len(list_checkpoints(run / "checkpoints")) == 2  # keep_checkpoints
    assert not list((run / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_to_identical_result(reference_run, tmp_path, sig):
    run = tmp_path / "run"
    proc = cli(*demo_args(run, 60, 5))
    wait_for_checkpoint(run, proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if sig in (signal.SIGINT, signal.SIGTERM):  # stopped at a step boundary with a checkpoint
        assert proc.returncode == 130
    stopped_at = load_checkpoint(latest_checkpoint(run / "checkpoints"))["step"]
    assert 0 < stopped_at < 60, "the interruption should land mid-run"
    resumed = cli("resume", str(run), "--quiet")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads((run / "eval.json").read_text())["psnr"] == json.loads((reference_run / "eval.json").read_text())["psnr"]
    a, b = final_state(run), final_state(reference_run)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run"
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path, monkeypatch):
    recipe = load_recipe("oracle-nerf", [*TINY, "trainer.steps=20", "trainer.checkpoint_every=4"])
    trainer = Trainer.create(recipe, tmp_path / "run", quiet=True)
    original = trainer.guidance[0].forward

    def poisoned(out, cameras, step):
        terms = original(out, cameras, step)
        return {k: v * float("nan") for k, v in terms.items()} if step == 9 else terms

    monkeypatch.setattr(trainer.guidance[0], "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 9.*step_0000008.pt"):
        trainer.fit()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "step_0000008.pt"
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in state["representation"].values() if v.is_floating_point())
    resumed = Trainer.resume(tmp_path / "run", quiet=True)
    assert resumed.start_step == 8


def test_existing_run_is_not_overwritten(reference_run):
    recipe = load_recipe("oracle-nerf", TINY)
    with pytest.raises(Exception, match="already holds a run"):
        Trainer.create(recipe, reference_run)


def test_resume_of_finished_run_rewrites_outputs(reference_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    (run / "turntable.gif").unlink()
    proc = cli("resume", str(run), "--quiet")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "already finished" in err and (run / "turntable.gif").exists()
