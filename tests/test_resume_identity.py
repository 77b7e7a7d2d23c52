"""Resume is bit-identical on CPU beyond the oracle NeRF: DMTet, a staged pipeline interrupted in
its second stage, and a run with the (tiny) Stable Diffusion prior."""

import pytest
import torch

from distill3d.engine.checkpoint import latest_checkpoint, load_checkpoint
from distill3d.engine.pipeline import load_pipeline, resume_pipeline, run_pipeline
from tests.test_trainer import TINY
from tests.tiny_models import build_tiny_sd

DMTET = ["dmtet:representation.grid_resolution=12", "dmtet:trainer.resolution=16", "dmtet:trainer.eval_resolution=16",
         "dmtet:trainer.eval_views=2", "dmtet:trainer.video_frames=2", "dmtet:trainer.video_resolution=16",
         "dmtet:trainer.checkpoint_every=2", "dmtet:trainer.steps=6", "dmtet:representation.levels=4",
         "dmtet:representation.log2_table_size=12", "dmtet:trainer.export=[]", "dmtet:trainer.log_every=1"]
NERF = [f"nerf:{s}" for s in TINY] + ["nerf:trainer.steps=6", "nerf:trainer.checkpoint_every=3"]


def final_state(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def runner(stop_in: str | None = None, at_step: int = 3):
    """A CLI-like reporter that interrupts stage `stop_in` after `at_step` steps (like Ctrl-C)."""

    def report(trainer):
        if stop_in is not None and trainer.run_dir.name == stop_in and trainer.start_step == 0:
            original = trainer.train_step

            def step_and_maybe_stop(step):
                logged = original(step)
                if step + 1 == at_step:
                    trainer._stop_requested = True
                return logged

            trainer.train_step = step_and_maybe_stop
        return trainer.fit()

    return report


def test_pipeline_interrupted_in_its_second_stage_resumes_bit_identically(tmp_path):
    values = {"scene": "default"}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_pipeline(load_pipeline("oracle-nerf-dmtet", NERF + DMTET, values), straight, runner(), quiet=True)
    run_pipeline(load_pipeline("oracle-nerf-dmtet", NERF + DMTET, values), interrupted, runner("dmtet", 3), quiet=True)
    assert final_state(interrupted / "dmtet")["step"] == 3 and not (interrupted / "dmtet" / "status.json").exists()
    nerf_before = final_state(interrupted / "nerf")
    resume_pipeline(interrupted, None, runner(), quiet=True)
    assert same(final_state(interrupted / "nerf")["representation"], nerf_before["representation"])  # finished stage kept
    a, b = final_state(straight / "dmtet"), final_state(interrupted / "dmtet")
    assert a["step"] == b["step"] == 6
    assert same(a["representation"], b["representation"])  # DMTet resumed bit-identically


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_stable_diffusion_run_resumes_bit_identically(tiny_sd, tmp_path):
    sets = [*TINY, "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.export=[]", f"guidance.0.prior.model={tiny_sd}",
            "representation.shading.train_mix={albedo: 1.0}"]
    values = {"prompt": "a cat"}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_pipeline(load_pipeline("dreamfusion-sd", sets, values), straight, runner(), quiet=True)
    run_pipeline(load_pipeline("dreamfusion-sd", sets, values), interrupted, runner("interrupted", 2), quiet=True)
    assert final_state(interrupted)["step"] == 2
    resume_pipeline(interrupted, None, runner(), quiet=True)
    a, b = final_state(straight), final_state(interrupted)
    assert a["step"] == b["step"] == 4 and same(a["representation"], b["representation"])
    assert not any("unet" in k for k in b["guidance"])  # frozen prior weights stay out
