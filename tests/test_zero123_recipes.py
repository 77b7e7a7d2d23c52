"""The image-to-3D recipes end to end at toy sizes through the trainer, with tiny random-weight models:
zero123, stable-zero123, magic123 (SD + Zero123 coarse NeRF, then DMTet refine ending in a GLB) and
the oracle image-to-3D recipe."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import yaml

from distill3d.engine.recipe import load_recipe_data, recipe_path, resolve_recipe
from distill3d.engine.trainer import Trainer
from tests.tiny_models import build_tiny_sd
from tests.tiny_zero123 import build_tiny_zero123

NERF = [
    "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64",
    "representation.samples_per_ray=16", "representation.occupancy.warmup_steps=4", "representation.occupancy.update_every=4",
    "representation.occupancy.resolution=16",
]
COMMON = [
    "trainer.resolution=16", "trainer.batch_size=2", "trainer.eval_resolution=16", "trainer.eval_views=2", "trainer.video_frames=2",
    "trainer.video_resolution=16", "trainer.log_every=1", "trainer.checkpoint_every=100", "trainer.steps=2",
    "guidance.0.resolution=16", "guidance.0.reference_view.size=32",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-to-3d")
    image = np.zeros((48, 48, 4), np.uint8)
    image[12:36, 14:34] = [230, 120, 30, 255]
    iio.imwrite(root / "photo.png", image)
    return {
        "root": root,
        "image": root / "photo.png",
        "zero123": build_tiny_zero123(root / "zero123", "Zero1to3StableDiffusionPipeline"),
        "sd": build_tiny_sd(root / "sd"),
    }


def run_stages(name: str, out, overrides: list[str], stage_overrides: dict[str, list[str]] | None = None) -> list:
    """What the CLI does with a (staged) recipe: each stage's own `set`, then ours; seeded from the last."""
    data = yaml.safe_load(recipe_path(name).read_text())
    stages = data.get("stages") or [{"name": "main", "recipe": name}]
    results, previous = [], None
    for st in stages:
        sets = [*st.get("set", []), *overrides, *(stage_overrides or {}).get(st["name"], [])]
        recipe_data = load_recipe_data(st["recipe"], sets)
        if previous is not None:
            recipe_data["init_from"] = str(previous)
        run_dir = out / st["name"] if len(stages) > 1 else out
        results.append(Trainer.create(resolve_recipe(recipe_data), run_dir, quiet=True).fit())
        previous = run_dir
    return results


def losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero123_recipe_with_a_tiny_model(models, tmp_path):
    out = tmp_path / "run"
    sets = [*COMMON, *NERF, f"guidance.0.reference_view.image={models['image']}", f"guidance.1.prior.model={models['zero123']}",
            "guidance.0.reference_view.elevation=10", "trainer.export=[]"]
    (result,) = run_stages("zero123", out, sets)
    assert result.finished
    logged = losses(out)
    assert {"ref_rgb", "ref_mask", "sds"} <= set(logged[-1]) and all(np.isfinite(row["loss"]) for row in logged)
    assert iio.imread(out / "reference.png").shape == (32, 32, 4)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["guidance"][1]["prior"]["camera_vector"] == "zero123"


def test_stable_zero123_recipe_uses_the_stable_camera_vector(models, tmp_path):
    out = tmp_path / "run"
    sets = [*COMMON, *NERF, f"guidance.0.reference_view.image={models['image']}", f"guidance.1.prior.model={models['zero123']}",
            "trainer.export=[]"]
    (result,) = run_stages("stable-zero123", out, sets)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert result.finished and config["name"] == "stable-zero123"
    assert config["guidance"][1]["prior"]["camera_vector"] == "stable"
    assert config["guidance"][0]["rgb_weight"] == {"linear": [[0, 100.0], [200, 1000.0]]}


def test_magic123_two_priors_then_dmtet_refine_ending_in_a_glb(models, tmp_path):
    out = tmp_path / "magic123"
    sets = [*COMMON, "prompt=a red chair", f"guidance.0.reference_view.image={models['image']}",
            f"guidance.1.prior.model={models['sd']}", f"guidance.2.prior.model={models['zero123']}"]
    coarse, refine = run_stages(
        "magic123", out, sets,
        {"coarse": NERF, "refine": ["representation.grid_resolution=16", "trainer.export_texture_size=64", "representation.hidden_layers=1",
                                     "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64"]},
    )
    assert coarse.finished and refine.finished
    for stage in ("coarse", "refine"):
        assert {"ref_rgb", "sds", "sds_2"} <= set(losses(out / stage)[-1])  # SD (2D) and Zero123 (3D) in one run
    assert (out / "refine" / "mesh.glb").exists()
    config = yaml.safe_load((out / "refine" / "config.yaml").read_text())
    assert config["init_from"] == str(out / "coarse") and config["representation"]["name"] == "dmtet"


def test_oracle_image_to_3d_recipe_learns_from_the_image(tmp_path):
    """A short oracle-zero123 run: the input is an exact render, the loss falls, eval.json is written."""
    from benchmarks.bench_zero123_oracle import render_input_image
    from distill3d.engine.reference_scene import DEFAULT_SCENE

    image = render_input_image(str(DEFAULT_SCENE), tmp_path / "input.png", 0.0, 3.2, 42.5, size=64)
    out = tmp_path / "run"
    sets = [*NERF, "trainer.resolution=24", "trainer.eval_resolution=24", "trainer.eval_views=2", "trainer.video_frames=2",
            "trainer.video_resolution=16", "trainer.log_every=1", "trainer.steps=40", "guidance.0.resolution=24",
            f"reference={DEFAULT_SCENE}", f"guidance.0.reference_view.image={image}", "guidance.0.reference_view.size=64"]
    (result,) = run_stages("oracle-zero123", out, sets)
    logged = losses(out)
    first, last = logged[0], logged[-1]
    evaluation = json.loads((out / "eval.json").read_text())
    assert last["ref_rgb"] < 0.9 * first["ref_rgb"] and last["sds"] < first["sds"], (first, last, evaluation)
    assert evaluation["psnr"] > 12.0 and evaluation["views"] == 2, evaluation
