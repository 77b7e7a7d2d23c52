"""Perp-Neg maths against hand-computed values, and its SDS guidance on a prior with known outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import distill3d.guidance.sds as sds_module
from distill3d.engine.cameras import make_cameras
from distill3d.engine.config import ConfigError, from_dict
from distill3d.engine.interfaces import BuildContext, Prior, RenderOutput
from distill3d.guidance.perp_neg import (
    PerpNegSDSConfig,
    PerpNegSDSGuidance,
    perp_neg_guidance,
    perpendicular_component,
)
from distill3d.guidance.timesteps import classifier_free_guidance
from distill3d.guidance.view_prompts import FRONT, SIDE, ViewConditions, perp_neg_plan, view_directions


def batch_dot(a, b):
    return (a * b).flatten(1).sum(1)


def test_perpendicular_component_hand_values():
    x = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    y = torch.tensor([[[[1.0, 0.0]]]])
    assert perpendicular_component(x, y).flatten().tolist() == [0.0, 4.0]
    y2 = torch.tensor([[[[2.0, 2.0]]]])  # <x,y>/<y,y> = 14/8
    assert perpendicular_component(x, y2).flatten().tolist() == pytest.approx([3 - 3.5, 4 - 3.5])
    # y = 0: the 1e-6 floor leaves x unchanged; x parallel to y: nothing left.
    assert torch.equal(perpendicular_component(x, torch.zeros_like(x)), x)
    assert perpendicular_component(2 * y2, y2).abs().max().item() < 1e-6


def test_perpendicular_component_is_per_sample():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = perpendicular_component(x, y)
    assert batch_dot(p, y).abs().max().item() < 1e-4
    for i in range(3):  # same as one sample at a time
        assert torch.allclose(p[i : i + 1], perpendicular_component(x[i : i + 1], y[i : i + 1]), atol=1e-6)


def test_perp_neg_guidance_hand_values():
    eps_u = torch.tensor([[[[1.0, 1.0]]]])
    eps_pos = torch.tensor([[[[2.0, 1.0]]]])  # d_pos = (1, 0)
    eps_neg = torch.tensor([[[[2.0, 2.0]]]])  # d_neg = (1, 1), perp to d_pos = (0, 1)
    out = perp_neg_guidance(eps_u, eps_pos, [eps_neg], torch.tensor([[-2.0]]), scale=10.0)
    # eps_u + 10 * ((1, 0) + -2 * (0, 1)) = (1 + 10, 1 - 20)
    assert out.flatten().tolist() == pytest.approx([11.0, -19.0])


def test_negative_contribution_is_orthogonal_to_positive_delta():
    torch.manual_seed(1)
    b = 4
    eps_u, eps_pos = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    negs = [torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)]
    w = torch.tensor([[-2.0, -0.5], [0.0, -1.0], [-3.0, 0.0], [-1.0, -1.0]])
    s = 7.5
    out = perp_neg_guidance(eps_u, eps_pos, negs, w, s)
    d_pos = eps_pos - eps_u
    negative_part = (out - eps_u) / s - d_pos
    cos = batch_dot(negative_part, d_pos) / (negative_part.flatten(1).norm(dim=1) * d_pos.flatten(1).norm(dim=1) + 1e-12)
    assert cos.abs().max().item() < 1e-4
    # ... and equals the hand-written sum, sample by sample.
    for i in range(b):
        expected = torch.zeros_like(d_pos[i])
        for k in range(2):
            a, p = (negs[k][i] - eps_u[i]).flatten(), d_pos[i].flatten()
            expected += w[i, k] * ((a - (a @ p) / (p @ p) * p).view_as(expected))
        assert torch.allclose(negative_part[i], expected, atol=1e-4)


def test_zero_weights_reduce_to_cfg():
    torch.manual_seed(2)
    eps_u, eps_pos, neg = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    out = perp_neg_guidance(eps_u, eps_pos, [neg, neg], torch.zeros(2, 2), 100.0)
    assert torch.allclose(out, classifier_free_guidance(eps_u, eps_pos, 100.0), atol=1e-4)


# --- Perp-Neg SDS over a prior with known outputs ----------------------------------------------


class KnownViewPrior(Prior):
    """predict_noise returns the condition itself: eps for a condition row is its 'e' tensor."""

    def __init__(self, shape=(4, 4, 4)):
        nn.Module.__init__(self)
        g = torch.Generator().manual_seed(3)
        self.directional = torch.randn(4, *shape, generator=g)  # front, side, back, overhead
        self.uncond_row = torch.randn(1, *shape, generator=g)
        self.register_buffer("alphas_cumprod", torch.linspace(0.9999, 0.01, 1000))
        self.calls = []

    def encode_images(self, rgb):
        return rgb

    def conditions(self, cameras, out):
        raise AssertionError("Perp-Neg must use view_conditions")

    def view_conditions(self, cameras, out=None):
        b = len(cameras)
        return ViewConditions({"e": self.directional}, {"e": self.uncond_row.expand(b, -1, -1, -1)}, view_directions(cameras.elevation, cameras.azimuth))

    def predict_noise(self, x_t, t, condition):
        self.calls.append((x_t.shape[0], t.clone()))
        return condition["e"].clone()


@pytest.fixture
def known_prior(monkeypatch):
    prior = KnownViewPrior()
    monkeypatch.setattr(sds_module, "build_prior", lambda ctx, spec, path: prior)
    return prior


def cams(elevation, azimuth):
    n = len(azimuth)
    return make_cameras(torch.tensor(elevation, dtype=torch.float32), torch.tensor(azimuth, dtype=torch.float32), torch.full((n,), 3.0), torch.full((n,), 40.0))


def expected_eps(prior, azimuths, scale, weighting="stable-dreamfusion"):
    """Perp-Neg's eps written out, with each camera's plan row written by hand from methods.md
    (sds_reference.perp_neg_rows_*), not taken from the code's own perp_neg_plan."""
    from sds_reference import perp_neg_rows_stable_dreamfusion, perp_neg_rows_threestudio

    row = {"stable-dreamfusion": perp_neg_rows_stable_dreamfusion, "threestudio": perp_neg_rows_threestudio}[weighting]
    plan = [row(a) for a in azimuths]
    d = prior.directional
    eps_u = prior.uncond_row.expand(len(azimuths), -1, -1, -1)
    pos = torch.stack([sum(m * d[k] for k, m in enumerate(p[0])) for p in plan])
    d_pos = pos - eps_u
    acc = torch.zeros_like(d_pos)
    for j, (_, directions, weights) in enumerate(plan):
        for i in range(2):
            a, p = (d[directions[i]] - eps_u[j]).flatten(), d_pos[j].flatten()
            acc[j] += weights[i] * (a - (a @ p) / (p @ p) * p).view_as(acc[j])
    return eps_u + scale * (d_pos + acc)


@pytest.mark.parametrize("weighting", ["stable-dreamfusion", "threestudio"])
def test_guided_noise_matches_hand_computation_one_call(known_prior, weighting):
    ctx = BuildContext(total_steps=100)
    g = PerpNegSDSGuidance(PerpNegSDSConfig(guidance_scale=7.0, perp_neg_weighting=weighting), ctx)
    cameras = cams([0.0, 10.0, 20.0, 0.0], [30.0, 100.0, -170.0, -60.0])
    x_t = torch.randn(4, 4, 4, 4)
    t = torch.full((4,), 500)
    eps = g.guided_noise(x_t, t, cameras, None)
    assert torch.allclose(eps, expected_eps(known_prior, [30.0, 100.0, -170.0, -60.0], 7.0, weighting), atol=1e-4)
    assert len(known_prior.calls) == 1
    assert known_prior.calls[0][0] == 4 * 4  # [uncond, pos, neg_1, neg_2] for 4 cameras


def test_zero_weight_negatives_are_left_out_of_the_call(known_prior):
    g = PerpNegSDSGuidance(PerpNegSDSConfig(guidance_scale=5.0), BuildContext())
    cameras = cams([0.0, 0.0], [0.0, 10.0])  # stable-dreamfusion: front weight 0 for both (r > 0.8)
    x_t = torch.randn(2, 4, 4, 4)
    eps = g.guided_noise(x_t, torch.full((2,), 300), cameras, None)
    assert known_prior.calls[-1][0] == 3 * 2
    assert torch.allclose(eps, expected_eps(known_prior, [0.0, 10.0], 5.0), atol=1e-4)
    assert g.last_plan.negative_weights[:, 0].abs().max().item() == 0.0
    # Overhead views: both negatives drop out, plain CFG on the overhead prompt.
    eps = g.guided_noise(torch.randn(1, 4, 4, 4), torch.full((1,), 300), cams([80.0], [0.0]), None)
    assert known_prior.calls[-1][0] == 2
    assert torch.allclose(eps, classifier_free_guidance(known_prior.uncond_row, known_prior.directional[3:4], 5.0), atol=1e-5)


def test_perp_neg_sds_step_gradient_is_weighted_residual(known_prior, monkeypatch):
    from sds_reference import NoiseRecorder

    g = PerpNegSDSGuidance(PerpNegSDSConfig(guidance_scale=10.0), BuildContext(total_steps=10))
    recorder = NoiseRecorder(known_prior, monkeypatch)
    latents = torch.zeros(2, 4, 4, 4, requires_grad=True)
    out = RenderOutput(rgb=torch.zeros(2, 4, 4, 3), opacity=torch.ones(2, 4, 4, 1), depth=torch.ones(2, 4, 4, 1), background=torch.zeros(2, 4, 4, 3))
    grad = g.sds_grad(latents, cams([0.0, 0.0], [20.0, 150.0]), out, 0)
    noise, t = recorder.last["noise"], recorder.last["t"]
    abar = known_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (1 - abar) * (expected_eps(known_prior, [20.0, 150.0], 10.0) - noise)
    assert torch.allclose(grad, expected, atol=1e-4)


def test_config_from_recipe_mapping_and_validation():
    cfg = from_dict(
        PerpNegSDSConfig,
        {"prior": {"name": "stable-diffusion"}, "guidance_scale": 100, "perp_neg_weighting": "threestudio", "negative_w": -3, "f_sb": [1, 0.5, -0.6]},
        "guidance.0",
    )
    assert cfg.perp_neg_weighting == "threestudio" and cfg.negative_w == -3.0 and cfg.f_sb == (1.0, 0.5, -0.6)
    assert cfg.timesteps.t_min == 0.02  # SDS fields are inherited
    with pytest.raises(ConfigError, match="perp_neg_weighting"):
        from_dict(PerpNegSDSConfig, {"perp_neg_weighting": "nope"}, "guidance.0")


def test_rejects_prior_without_view_conditions(monkeypatch):
    class Plain(Prior):
        def __init__(self):
            nn.Module.__init__(self)

    monkeypatch.setattr(sds_module, "build_prior", lambda ctx, spec, path: Plain())
    with pytest.raises(ConfigError, match="view-dependent"):
        PerpNegSDSGuidance(PerpNegSDSConfig(prior={"name": "oracle"}), BuildContext())


# threestudio's scales 100 (SD) and 20 (IF) are 101 and 21 in the diffusers convention.
@pytest.mark.parametrize("recipe, prior, scale", [("dreamfusion-sd", "stable-diffusion", 101.0), ("dreamfusion-if", "deepfloyd-if", 21.0)])
def test_text_to_3d_recipes_resolve_and_accept_perp_neg(recipe, prior, scale):
    from distill3d.engine.recipe import load_recipe, load_recipe_data

    r = load_recipe(recipe)
    entry = r.guidance[0]
    assert entry["prior"]["name"] == prior and entry["guidance_scale"] == scale
    assert (entry["timesteps"]["t_min"], entry["timesteps"]["t_max"], entry["weighting"]) == (0.02, 0.98, "sds")
    assert r.trainer.steps == 10000 and r.trainer.resolution == 64 and r.trainer.batch_size == 1
    # --perp-neg renames the entry to the Perp-Neg guidance: every key of the sds entry stays valid.
    raw = dict(load_recipe_data(recipe)["guidance"][0])
    raw.pop("name")
    cfg = from_dict(PerpNegSDSConfig, raw, "guidance.0")
    assert cfg.guidance_scale == scale and cfg.perp_neg_weighting == "stable-dreamfusion"
