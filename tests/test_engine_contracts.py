"""Engine v2 contracts: representation-owned optimisation, parameter surgery, shared priors,
capabilities checked before work, pipelines, resume --set that takes effect or is refused."""

import importlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from distill3d.engine.checkpoint import latest_checkpoint, load_checkpoint
from distill3d.engine.config import ConfigError
from distill3d.engine.errors import UserError
from distill3d.engine.optim import OptimizerHooks, build_optimizer
from distill3d.engine.pipeline import load_pipeline
from distill3d.engine.recipe import load_recipe
from distill3d.engine.schedules import Schedule
from distill3d.engine.trainer import Trainer, load_run
from tests.test_registry import fake_distribution
from tests.test_trainer import TINY


GROWING = textwrap.dedent(
    '''
    """A toy representation whose parameter count grows: one colour row per step."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from distill3d.engine.interfaces import RenderOutput, Representation


    @dataclass
    class GrowingConfig:
        grow_every: int = 2
        lr: float = 0.05


    class Growing(Representation):
        Config = GrowingConfig
        exports = ()

        def __init__(self, config, ctx):
            super().__init__(config, ctx)
            self.rows = nn.Parameter(torch.zeros(2, 3))

        def resizable_parameters(self):
            return ["rows"]

        def param_groups(self):
            return [{"name": "rows", "params": [self.rows], "lr": {"exponential": [[0, self.config.lr], ["100%", self.config.lr / 10]]}}]

        def render(self, cameras, settings):
            b, h, w = len(cameras), settings.height, settings.width
            rgb = torch.sigmoid(self.rows.mean(0)).view(1, 1, 1, 3).expand(b, h, w, 3)
            ones = rgb.new_ones(b, h, w, 1)
            return RenderOutput(rgb=rgb, opacity=ones, depth=ones, background=torch.zeros_like(rgb))

        def after_step(self, step, hooks):
            if (step + 1) % self.config.grow_every == 0:
                old = self.rows
                new = nn.Parameter(torch.cat([old.detach(), old.detach()[-1:]]))
                source = torch.cat([torch.arange(old.shape[0]), torch.tensor([-1])])
                hooks.replace_parameter(old, new, source)
                self.rows = new

        def stats(self):
            return {"rows": float(self.rows.shape[0])}
    '''
)


@pytest.fixture
def growing_plugin(tmp_path, monkeypatch):
    root = tmp_path / "plugin"
    root.mkdir()
    (root / "growing_rep.py").write_text(GROWING)
    fake_distribution(root, "growing-rep", "distill3d.representations", {"growing": "growing_rep:Growing"})
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield "growing"


def growing_recipe(steps=8, extra=()):
    return load_recipe(
        "oracle-nerf",
        [
            f"trainer.steps={steps}", "trainer.resolution=8", "trainer.eval_views=1", "trainer.checkpoint_every=3",
            "trainer.video_frames=1", "trainer.video_resolution=8", "trainer.log_every=1",
            "representation={name: growing}", *extra,
        ],
    )


# ----- optimiser -----------------------------------------------------------------------------

def test_exponential_schedule_is_log_linear():
    s = Schedule.parse({"exponential": [[0, 1e-3], [100, 1e-5]]}).resolve(100)
    assert s(0) == pytest.approx(1e-3) and s(50) == pytest.approx(1e-4) and s(100) == pytest.approx(1e-5)
    with pytest.raises(Exception, match="positive"):
        Schedule.parse({"exponential": [[0, 0.0], [1, 1.0]]})


def test_replace_parameter_keeps_moments_of_kept_rows_and_zeroes_new_ones():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt, _ = build_optimizer([{"name": "p", "params": [p], "lr": 0.1}], 10, (0.9, 0.99), 1.0)
    (p**2).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    new = torch.nn.Parameter(torch.randn(3, 3))
    OptimizerHooks(opt).replace_parameter(p, new, torch.tensor([3, 1, -1]))
    assert opt.param_groups[0]["params"][0] is new and p not in opt.state
    st = opt.state[new]
    assert torch.equal(st["exp_avg"][0], before["exp_avg"][3]) and torch.equal(st["exp_avg"][1], before["exp_avg"][1])
    assert torch.equal(st["exp_avg_sq"][2], torch.zeros(3)) and torch.equal(st["exp_avg"][2], torch.zeros(3))
    OptimizerHooks(opt).reset_state(new, torch.tensor([0]))
    assert torch.equal(opt.state[new]["exp_avg"][0], torch.zeros(3)) and not torch.equal(opt.state[new]["exp_avg"][1], torch.zeros(3))


def test_duplicate_group_names_are_an_error():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match="declared twice"):
        build_optimizer([{"name": "a", "params": [p]}, {"name": "a", "params": [q]}], 10, (0.9, 0.99), 1.0)


def test_growing_representation_trains_resumes_and_exports(growing_plugin, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.create(growing_recipe(steps=8), run, quiet=True)
    trainer._stop_requested = False
    original = trainer.train_step

    def stop_after_5(step):
        logged = original(step)
        if step == 4:
            trainer._stop_requested = True
        return logged

    trainer.train_step = stop_after_5
    result = trainer.fit()
    assert result.interrupted and result.completed_steps == 5
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"))["representation"]["rows"].shape == (4, 3)
    resumed = Trainer.resume(run, quiet=True)
    assert resumed.representation.rows.shape == (4, 3) and resumed.start_step == 5
    # the optimizer holds the restored parameter, with its moments
    assert resumed.optimizer.param_groups[0]["params"][0] is resumed.representation.rows
    assert resumed.optimizer.state[resumed.representation.rows]["exp_avg"].shape == (4, 3)
    assert resumed.fit().finished
    assert resumed.representation.rows.shape == (6, 3)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["rows"] for line in lines] == [2, 3, 3, 4, 4, 5, 5, 6]
    # lr follows its exponential schedule (0.05 -> 0.005 over the run) step by step
    assert lines[0]["loss"] > 0 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** (7 / 8))
    _, representation = load_run(run, purpose="export")
    assert representation.rows.shape == (6, 3)


def test_resume_set_lr_scale_takes_effect(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.create(load_recipe("oracle-nerf", [*TINY, "trainer.steps=4", "trainer.checkpoint_every=2"]), run, quiet=True)
    trainer.fit()
    lr = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    resumed = Trainer.resume(run, ["trainer.steps=6", "trainer.lr_scale=0.5"], quiet=True)
    resumed.train_step(4)
    after = {g["name"]: g["lr"] for g in resumed.optimizer.param_groups}
    assert after.keys() == lr.keys() and all(after[k] == pytest.approx(0.5 * lr[k]) for k in lr)
    assert "lr_scale: 0.5" in (run / "config.yaml").read_text()


def test_bad_resume_set_is_refused_and_the_run_stays_usable(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.create(load_recipe("oracle-nerf", [*TINY, "trainer.steps=4", "trainer.checkpoint_every=2"]), run, quiet=True)
    trainer.train_step(0)
    trainer.save(2)
    trainer.close()
    config = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="do not fit the run's checkpoint"):
        Trainer.resume(run, ["representation.levels=6"], quiet=True)
    assert (run / "config.yaml").read_text() == config
    assert Trainer.resume(run, quiet=True).start_step == 2  # the refused resume left the run unlocked and usable


def test_torn_metrics_line_is_skipped_on_resume(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.create(load_recipe("oracle-nerf", [*TINY, "trainer.steps=4", "trainer.checkpoint_every=2"]), run, quiet=True)
    trainer.fit()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')
    Trainer.resume(run, ["trainer.steps=5"], quiet=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_entirely_non_finite_sds_gradient_stops_the_run(tmp_path, monkeypatch):
    from distill3d.engine.errors import NonFiniteLossError

    trainer = Trainer.create(load_recipe("oracle-nerf", [*TINY, "trainer.steps=3"]), tmp_path / "run", quiet=True)
    prior = trainer.guidance[0].prior
    monkeypatch.setattr(prior, "predict_noise", lambda x_t, t, c, is_conditional=None: torch.full_like(x_t, float("inf")))
    with pytest.raises(NonFiniteLossError, match="step 0"):
        trainer.fit()


# ----- shared priors ---------------------------------------------------------------------------

def test_priors_declared_once_are_shared_by_name(tmp_path):
    recipe = load_recipe(
        "oracle-nerf",
        [*TINY, "trainer.steps=2", "priors={truth: {name: oracle, noise_std: 0.05}}",
         "guidance=[{name: sds, guidance_scale: 1.0, prior: truth}, {name: sds, guidance_scale: 1.0, weight: 0.5, prior: truth}]"],
    )
    assert recipe.priors["truth"]["noise_std"] == 0.05  # resolved with every default
    trainer = Trainer.create(recipe, tmp_path / "run", quiet=True)
    assert trainer.guidance[0].prior is trainer.guidance[1].prior is trainer.ctx.priors["truth"]
    assert set(trainer.ctx.priors) == {"truth"}
    logged = trainer.train_step(0)
    assert "sds" in logged and "sds_1" in logged


def test_unknown_prior_name_is_named_before_any_work():
    with pytest.raises(ConfigError, match=r"guidance.0.prior: no prior named 'sd'.*truth"):
        load_recipe("oracle-nerf", ["priors={truth: {name: oracle}}", "guidance=[{name: sds, prior: sd}]"])


def test_frozen_prior_weights_stay_out_of_checkpoints():
    from distill3d.engine.interfaces import BuildContext, Prior

    class Tiny(Prior):
        FROZEN = ("net",)

        def __init__(self):
            super().__init__(None, BuildContext())
            self.net = torch.nn.Linear(2, 2)
            self.adapter = torch.nn.Linear(2, 2)

    prior = Tiny()
    keys = set(prior.state_dict())
    assert keys == {"adapter.weight", "adapter.bias"}
    Tiny().load_state_dict(prior.state_dict())  # loads without the frozen keys


# ----- capabilities and pipelines ----------------------------------------------------------------

def test_export_format_the_representation_cannot_write_fails_at_resolve(growing_plugin):
    with pytest.raises(ConfigError, match=r"trainer.export: representation 'growing' cannot export 'glb'"):
        growing_recipe(extra=["trainer.export=[glb]"])


def test_stage_that_cannot_be_seeded_from_the_previous_fails_before_work(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "stages": [{"name": "a", "recipe": "oracle-dmtet"}, {"name": "b", "recipe": "oracle-dmtet"}]}))
    with pytest.raises(ConfigError, match=r"stage 'b'.*cannot be seeded from a 'dmtet' run"):
        load_pipeline(str(path))


@pytest.mark.parametrize("name", ["/abs", "../x", "a/b", "", ".hidden"])
def test_stage_names_that_would_escape_out_are_refused(tmp_path, name):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "stages": [{"name": name, "recipe": "oracle-nerf"}]}))
    with pytest.raises(ConfigError, match="stages.0.name"):
        load_pipeline(str(path))


def test_pipeline_overrides_address_one_stage_or_all():
    pipeline = load_pipeline("oracle-nerf-dmtet", ["dmtet:trainer.steps=7", "trainer.log_every=3"], {"scene": "default"})
    nerf, dmtet = pipeline.stages
    assert (nerf.name, dmtet.name, dmtet.init_from) == ("nerf", "dmtet", "nerf")
    assert dmtet.recipe.trainer.steps == 7 and nerf.recipe.trainer.steps != 7
    assert nerf.recipe.trainer.log_every == dmtet.recipe.trainer.log_every == 3
    assert nerf.recipe.scene == dmtet.recipe.scene == "default"
    with pytest.raises(ConfigError, match="names stage 'coarse'"):
        load_pipeline("oracle-nerf-dmtet", ["coarse:trainer.steps=3"])


def test_new_run_refuses_a_folder_holding_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        Trainer.create(load_recipe("oracle-nerf", TINY), out, quiet=True)


def test_collapsed_occupancy_grid_keeps_training(tmp_path):
    sets = [*TINY, "trainer.steps=3", "representation.occupancy.warmup_steps=0", "representation.occupancy.update_every=1", "representation.density_blob=none"]
    trainer = Trainer.create(load_recipe("oracle-nerf", sets), tmp_path / "run", quiet=True)
    with torch.no_grad():  # a field with no density anywhere: every cell below the threshold
        for p in trainer.representation.density_net.parameters():
            p.zero_()
        trainer.representation.density_net[-1].bias.fill_(-200)  # softplus underflows to exactly 0
    logged = trainer.train_step(0)
    assert logged["occupied_fraction"] == 1.0 and "skipped" not in logged
    assert trainer.representation.encoding.parameters().__next__().grad is not None


def test_rays_with_no_samples_at_all_render_background_without_failing(tmp_path):
    sets = [*TINY, "trainer.steps=3", "representation.occupancy.warmup_steps=0"]
    trainer = Trainer.create(load_recipe("oracle-nerf", sets), tmp_path / "run", quiet=True)
    occupancy = trainer.representation.occupancy
    occupancy.initialized.fill_(True)
    occupancy.occupied.fill_(False)  # every sample skipped
    monkey = trainer.representation.update
    trainer.representation.update = lambda step: None
    logged = trainer.train_step(0)
    trainer.representation.update = monkey
    assert logged["occupied_fraction"] == 0.0 and logged["loss"] == logged["loss"]
