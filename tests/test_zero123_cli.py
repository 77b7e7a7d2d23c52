"""Image-to-3D through the CLI, as a user runs it, with tiny random-weight models built here:
zero123 (one Zero123 layout), stable-zero123 (the other), magic123 (tiny SD + tiny Zero123, NeRF then
DMTet ending in a GLB), the oracle demo, and bad input as one clear line."""

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import yaml

from tests.tiny_models import build_tiny_sd
from tests.tiny_zero123 import build_tiny_zero123

NERF = [
    "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64",
    "representation.samples_per_ray=16", "representation.occupancy.warmup_steps=4", "representation.occupancy.update_every=4",
    "representation.occupancy.resolution=16",
]
SMALL = [
    "trainer.resolution=16", "trainer.batch_size=2", "trainer.eval_resolution=16", "trainer.eval_views=2", "trainer.video_frames=2",
    "trainer.video_resolution=16", "trainer.log_every=1", "trainer.checkpoint_every=100", "guidance.0.resolution=16",
    "reference_view.size=32",
]


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stderr


def sets(*items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-image-to-3d")
    image = np.zeros((48, 48, 4), np.uint8)
    image[12:36, 14:34] = [230, 120, 30, 255]
    iio.imwrite(root / "photo.png", image)
    return {
        "root": root,
        "image": root / "photo.png",
        "Zero123Pipeline": build_tiny_zero123(root / "z1", "Zero123Pipeline"),
        "Zero1to3StableDiffusionPipeline": build_tiny_zero123(root / "z2", "Zero1to3StableDiffusionPipeline"),
        "sd": build_tiny_sd(root / "sd"),
    }


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe, layout, vector", [("zero123", "Zero123Pipeline", "zero123"), ("stable-zero123", "Zero1to3StableDiffusionPipeline", "stable")])
def test_generate_from_an_image_with_a_tiny_zero123(models, tmp_path, recipe, layout, vector):
    out = tmp_path / "run"
    code, err = cli("generate", "--image", str(models["image"]), "--recipe", recipe, "--elevation", "10", "--model", str(models[layout]),
                    "--steps", "2", "--out", str(out), "--quiet", *sets(*SMALL, *NERF, "trainer.export=[]"))
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["guidance"][1]["prior"]["camera_vector"] == vector and config["reference_view"]["elevation"] == 10.0
    assert {"ref_rgb", "ref_mask", "sds"} <= set(metrics(out)[-1])
    assert iio.imread(out / "reference.png").shape == (32, 32, 4)  # what the model saw


def test_magic123_sd_and_zero123_then_dmtet_to_a_glb(models, tmp_path):
    out = tmp_path / "magic123"
    refine = ["refine:representation.grid_resolution=16", "refine:representation.hidden_layers=1", "refine:representation.levels=4",
              "refine:representation.log2_table_size=12", "refine:representation.max_resolution=64", "refine:trainer.export_texture_size=64"]
    code, err = cli("generate", "a red chair", "--image", str(models["image"]), "--recipe", "magic123",
                    "--model", f"sd={models['sd']}", "--model", f"zero123={models['Zero123Pipeline']}", "--steps", "2", "--out", str(out), "--quiet",
                    *sets(*SMALL, *[f"coarse:{s}" for s in NERF], *refine))
    assert code == 0, err
    for stage in ("coarse", "refine"):
        assert {"ref_rgb", "sds", "sds_2"} <= set(metrics(out / stage)[-1])  # the 2D and the 3D prior in one run
    assert (out / "refine" / "mesh.glb").exists()
    code, err = cli("generate", "a red chair", "--image", str(models["image"]), "--recipe", "magic123", "--model", str(models["sd"]),
                    "--out", str(tmp_path / "x"))
    assert code != 0 and "say which: --model NAME=DIR" in err


def test_demo_image_to_3d_learns_from_the_rendered_image(tmp_path):
    out = tmp_path / "demo"
    code, err = cli("demo", "--image-to-3d", "--elevation", "15", "--steps", "40", "--out", str(out), "--quiet",
                    *sets(*NERF, "trainer.resolution=24", "trainer.eval_resolution=24", "trainer.eval_views=2", "trainer.video_frames=2",
                          "trainer.video_resolution=16", "trainer.log_every=1", "guidance.0.resolution=24", "reference_view.size=64"))
    assert code == 0, err
    logged = metrics(out)
    evaluation = json.loads((out / "eval.json").read_text())
    assert logged[-1]["sds"] < logged[0]["sds"] and evaluation["psnr"] > 12.0, (logged[0], logged[-1], evaluation)
    assert iio.imread(out / "reference.png").shape == (64, 64, 4)


@pytest.mark.parametrize("kind", ["not-an-image", "blank"])
def test_bad_input_image_is_one_clear_line(models, tmp_path, kind):
    path = tmp_path / "photo.png"
    if kind == "not-an-image":
        path.write_text("hello")
        expected = "cannot read"
    else:
        iio.imwrite(path, np.zeros((64, 64, 4), np.uint8))
        expected = "no foreground"
    out = tmp_path / "run"
    code, err = cli("generate", "--image", str(path), "--recipe", "zero123", "--model", str(models["Zero123Pipeline"]), "--out", str(out), "--quiet")
    assert code != 0 and expected in err and "Traceback" not in err
    assert not (out / "reference.png").exists() and not (out / "checkpoints").exists()


def test_demo_image_to_3d_into_gaussians(tmp_path):
    """`demo --image-to-3d --stages gaussians`: the shipped oracle-zero123-gaussians recipe learns the
    scene from the rendered image alone."""
    out = tmp_path / "demo"
    code, err = cli("demo", "--image-to-3d", "--stages", "gaussians", "--steps", "40", "--out", str(out), "--quiet",
                    *sets("representation.num_points=500", "trainer.resolution=24", "trainer.eval_resolution=24", "trainer.eval_views=2",
                          "trainer.video_frames=2", "trainer.video_resolution=16", "trainer.log_every=1", "guidance.0.resolution=24",
                          "reference_view.size=64"))
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["representation"]["name"] == "gaussians" and config["guidance"][1]["prior"]["name"] == "oracle-zero123"
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["psnr"] > 12.0, evaluation
