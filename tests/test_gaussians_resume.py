"""A Gaussians run killed between a checkpoint and the end, with densification (clone, split,
prune: parameter shapes and Adam moments changing) in between, resumes bit-identically on CPU;
a run whose Gaussians all get pruned stops with a clear error and an intact checkpoint."""

import pytest
import torch

from distill3d.engine.checkpoint import latest_checkpoint, load_checkpoint
from distill3d.engine.pipeline import load_pipeline, resume_pipeline, run_pipeline
from distill3d.representations.gaussians.densify import AllGaussiansPrunedError

SMALL = [
    "trainer.resolution=16", "trainer.eval_resolution=16", "trainer.eval_views=2", "trainer.video_frames=2",
    "trainer.video_resolution=16", "trainer.log_every=1", "trainer.steps=8", "trainer.checkpoint_every=3",
    "representation.num_points=300", "representation.init_opacity=0.3",
    "representation.densify={start: 1, stop: '100%', interval: 2, grad_threshold: 0.00005, min_opacity: 0.005, opacity_reset_interval: 6}",
]


class Killed(Exception):
    pass


def runner(kill_at: int | None = None):
    """Trains a stage; with kill_at, the process 'dies' after that step (no checkpoint written)."""

    def report(trainer):
        if kill_at is not None and trainer.start_step == 0:
            original = trainer.train_step

            def step_then_die(step):
                logged = original(step)
                if step + 1 == kill_at:
                    raise Killed
                return logged

            trainer.train_step = step_then_die
        return trainer.fit()

    return report


def test_kill_mid_densification_resumes_bit_identically(tmp_path):
    values = {"scene": "default"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_pipeline(load_pipeline("oracle-gaussians", SMALL, values), straight, runner(), quiet=True)
    with pytest.raises(Killed):
        run_pipeline(load_pipeline("oracle-gaussians", SMALL, values), killed, runner(kill_at=5), quiet=True)
    resumed_from = load_checkpoint(latest_checkpoint(killed / "checkpoints"))
    assert resumed_from["step"] == 3  # densification at steps 4 (and the kill at 5) are replayed
    resume_pipeline(killed, None, runner(), quiet=True)
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(killed / "checkpoints"))
    assert a["step"] == b["step"] == 8
    n_start, n_mid, n_end = 300, resumed_from["representation"]["means"].shape[0], a["representation"]["means"].shape[0]
    assert len({n_start, n_mid, n_end}) > 1  # the count did change on the way
    assert a["representation"].keys() == b["representation"].keys()
    for key in a["representation"]:
        assert torch.equal(a["representation"][key], b["representation"][key]), key
    ma, mb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[i]["exp_avg"], mb[i]["exp_avg"]) for i in ma)


def test_all_gaussians_pruned_stops_clearly(tmp_path):
    sets = SMALL + ["representation.densify={start: 1, interval: 2, min_opacity: 0.99}"]
    with pytest.raises(AllGaussiansPrunedError, match="prune all 300 Gaussians"):
        run_pipeline(load_pipeline("oracle-gaussians", sets, {"scene": "default"}), tmp_path / "run", runner(), quiet=True)
