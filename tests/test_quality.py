"""Quality with teeth: short oracle runs must improve on their own step-0 evaluation by a margin.

An untrained NeRF already scores well above zero against the default scene (its density blob
covers the middle of the picture), so an absolute floor alone passes without any training. Each
run here is scored before its first step and after its last, with the same views and the same
code, and the gain must exceed a margin calibrated on the correct code (see the figures beside
each threshold): a training loop whose steps do too little (e.g. a learning rate 20 times too
small) falls well short of it. The runs are tiny (16-32 px, a few dozen steps) so they take a
few seconds each on a shared 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distill3d.engine.evaluation import evaluate_against_reference
from distill3d.engine.recipe import RecipeConfig, load_recipe
from distill3d.engine.reference_scene import DEFAULT_SCENE
from distill3d.engine.trainer import Trainer

EVAL = ["trainer.eval_views=4", "trainer.eval_resolution=32", "trainer.video_frames=2", "trainer.video_resolution=16", "trainer.log_every=1000"]

NERF = [
    "trainer.resolution=32", "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64",
    "representation.samples_per_ray=32", "representation.occupancy.resolution=16", "representation.occupancy.warmup_steps=8",
    "representation.occupancy.update_every=8",
]

DMTET = [
    "trainer.resolution=32", "representation.grid_resolution=16", "representation.levels=4", "representation.log2_table_size=12",
    "representation.max_resolution=64", "trainer.export=[]",
    "representation.normal_consistency_weight=0",  # the recipe's smoothing regulariser is not what is measured here
    # the recipe refines a seeded surface with small geometry steps (1e-3); from the default sphere
    # the loop is measured at the steps it was calibrated with
    "representation.lr_sdf=0.005", "representation.lr_deformation=0.005",
]

# Short runs learn with every group's learning rate x 10 (the trainer's own lr_scale), so that a
# few dozen steps separate a working loop from one that barely moves.
FAST = ["trainer.lr_scale=10"]


def scene_override(path) -> str:
    """The recipe key of the oracle's ground truth (`scene` in engine v2, `reference` before)."""
    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    return f"{'scene' if 'scene' in names else 'reference'}={path}"


def scores(trainer: Trainer) -> dict:
    tc = trainer.recipe.trainer
    reference = getattr(trainer.ctx, "scene", None) or trainer.ctx.reference
    return evaluate_against_reference(trainer.representation.eval(), reference, trainer.sampler, tc.eval_views, tc.eval_resolution)


def before_and_after(recipe_name: str, overrides: list[str], tmp_path) -> tuple[dict, dict]:
    recipe = load_recipe(recipe_name, [scene_override(DEFAULT_SCENE), *EVAL, *overrides])
    trainer = Trainer.create(recipe, tmp_path / "run", quiet=True)
    before = scores(trainer)
    result = trainer.fit()
    assert result.finished and result.eval is not None
    # eval.json holds the scores of the final state (recomputed here), not of some other state.
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    final = scores(trainer)
    assert written["psnr"] == pytest.approx(final["psnr"], abs=1e-4) and written["mask_iou"] == pytest.approx(final["mask_iou"], abs=1e-6)
    return before, result.eval


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def test_oracle_nerf_gains_over_its_step_zero_evaluation(tmp_path):
    before, after = before_and_after("oracle-nerf", [*NERF, *FAST, "trainer.steps=50"], tmp_path)
    gain_psnr = after["psnr"] - before["psnr"]
    gain_iou = after["mask_iou"] - before["mask_iou"]
    # Calibrated on this code: 15.05 -> 23.14 dB (+8.1), IoU 0.436 -> 0.866 (+0.43).
    # Every group's learning rate x 0.05 in the trainer: 15.05 -> 15.23 dB (+0.18), IoU +0.000.
    assert gain_psnr > 4.0, (before, after)
    assert gain_iou > 0.2, (before, after)
    # ... and reaching the scene, not only moving: floors far above the untrained figures.
    assert after["psnr"] > 20.0 and after["mask_iou"] > 0.75, after


def test_oracle_dmtet_gains_over_its_step_zero_evaluation(tmp_path):
    before, after = before_and_after("oracle-dmtet", [*DMTET, *FAST, "trainer.steps=40"], tmp_path)
    gain_psnr = after["psnr"] - before["psnr"]
    gain_iou = after["mask_iou"] - before["mask_iou"]
    # From the default sphere (radius 0.5), silhouette gradients move the surface a few cells:
    # calibrated 14.37 -> 15.38 dB (+1.0), IoU 0.457 -> 0.540 (+0.083).
    # Every group's learning rate x 0.05 in the trainer: +0.17 dB, IoU +0.015.
    assert gain_psnr > 0.6, (before, after)
    assert gain_iou > 0.05, (before, after)
