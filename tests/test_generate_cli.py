"""Text-to-3D through the CLI, as a user runs it, with tiny random-weight models built here."""

import json
import subprocess
import sys

import pytest

from tests.test_trainer import TINY
from tests.tiny_models import build_tiny_if, build_tiny_sd


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def small(extra=()):
    items = [*TINY, "trainer.checkpoint_every=2", "representation.shading.train_mix={albedo: 1.0}", *extra]
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    return build_tiny_if(tmp_path_factory.mktemp("if") / "tiny-if")


def assert_complete_run(run_dir, steps):
    for name in ("config.yaml", "metrics.jsonl", "turntable.mp4", "turntable.gif", "mesh.glb"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "checkpoints" / f"step_{steps:07d}.pt").exists()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == steps and "sds" in last


@pytest.mark.parametrize("perp_neg", [False, True])
def test_generate_with_tiny_stable_diffusion(tiny_sd, tmp_path, perp_neg):
    out = tmp_path / "run"
    args = ["generate", "a cat", "--recipe", "dreamfusion-sd", "--model", str(tiny_sd), "--steps", "6", "--out", str(out), "--quiet",
            "--negative", "blurry", *small()]
    if perp_neg:
        args.append("--perp-neg")
    code, _, err = run(*args)
    assert code == 0, err
    assert_complete_run(out, 6)
    config = (out / "config.yaml").read_text()
    assert "a cat" in config and "blurry" in config and str(tiny_sd) in config
    assert ("sds-perp-neg" in config) == perp_neg


def test_generate_with_tiny_deepfloyd_if(tiny_if, tmp_path):
    out = tmp_path / "run"
    code, _, err = run("generate", "a cat", "--recipe", "dreamfusion-if", "--model", str(tiny_if), "--steps", "4", "--out", str(out), "--quiet", *small())
    assert code == 0, err
    assert_complete_run(out, 4)


def test_missing_model_says_how_to_get_it(tmp_path):
    code, _, err = run("generate", "a cat", "--recipe", "dreamfusion-sd", "--model", "someone/not-a-cached-model", "--out", str(tmp_path / "r"), *small())
    assert code == 2 and "Traceback" not in err
    assert "someone/not-a-cached-model" in err and "--model" in err and "not" in err.lower()


def test_folder_that_is_not_a_model_says_what_is_missing(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    code, _, err = run("generate", "a cat", "--recipe", "dreamfusion-sd", "--model", str(folder), "--out", str(tmp_path / "r"), *small())
    assert code == 2 and "Traceback" not in err and "unet" in err.lower()


def test_magic3d_two_stages_with_tiny_stable_diffusion(tiny_sd, tmp_path):
    import trimesh

    out = tmp_path / "run"
    tiny_dmtet = ["refine:representation.grid_resolution=12", "refine:trainer.resolution=16", "refine:trainer.eval_resolution=16",
                  "refine:trainer.video_frames=2", "refine:trainer.video_resolution=16", "refine:trainer.checkpoint_every=2",
                  "refine:representation.shading.train_mix={albedo: 1.0}"]
    sets = [f"coarse:{s}" for s in TINY + ["trainer.checkpoint_every=2", "representation.shading.train_mix={albedo: 1.0}"]] + tiny_dmtet
    code, _, err = run("generate", "a cat", "--recipe", "magic3d", "--model", str(tiny_sd), "--steps", "3", "--out", str(out), "--quiet",
                       *sum((["--set", s] for s in sets), []))
    assert code == 0, err
    assert (out / "coarse" / "checkpoints" / "step_0000003.pt").exists()
    assert not (out / "coarse" / "mesh.glb").exists()  # the stage's own `set: [trainer.export=[]]`
    refine = (out / "refine" / "config.yaml").read_text()
    assert "dmtet" in refine and str(out / "coarse") in refine and "a cat" in refine and str(tiny_sd) in refine
    assert len(trimesh.load(out / "refine" / "mesh.glb", force="mesh").faces) > 0
