"""SDS over the Prior interface: the gradient, CFG algebra, weightings, clipping and timestep schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import distill3d.guidance.sds as sds_module
from distill3d.engine.cameras import make_cameras
from distill3d.engine.interfaces import BuildContext, Prior, RenderOutput
from distill3d.guidance.sds import SDSConfig, SDSGuidance
from distill3d.guidance.timesteps import (
    TimestepConfig,
    classifier_free_guidance,
    sample_timesteps,
    sds_loss_from_grad,
    sds_weight,
)

T = 1000


class KnownPrior(Prior):
    """Latents = the render's first 2 channels; eps_hat = fixed tensors per branch (cond/uncond)."""

    def __init__(self, eps_cond, eps_uncond):
        nn.Module.__init__(self)
        self.register_buffer("alphas_cumprod", torch.linspace(0.9999, 0.005, T))
        self.eps_cond, self.eps_uncond = eps_cond, eps_uncond
        self.calls = []

    def encode_images(self, rgb):
        return rgb[:, :2] * 2 - 1

    def conditions(self, cameras, out):
        b = len(cameras)
        return {"which": torch.ones(b)}, {"which": torch.zeros(b)}

    def predict_noise(self, x_t, t, condition):
        self.calls.append((x_t.clone(), t.clone(), condition["which"].clone()))
        w = condition["which"].view(-1, 1, 1, 1)
        return (w * self.eps_cond + (1 - w) * self.eps_uncond).expand_as(x_t)


def make_guidance(monkeypatch, prior, **cfg):
    monkeypatch.setattr(sds_module, "build_prior", lambda ctx, spec, path: prior)
    return SDSGuidance(SDSConfig(**cfg), BuildContext(total_steps=100))


def cams(n):
    return make_cameras(torch.zeros(n), torch.linspace(-90, 90, n), torch.full((n,), 3.0), torch.full((n,), 40.0))


def render(b, h=4):
    rgb = torch.rand(b, h, h, 3, requires_grad=True)
    return RenderOutput(rgb=rgb, opacity=torch.ones(b, h, h, 1), depth=torch.ones(b, h, h, 1), background=torch.zeros(b, h, h, 3))


# --- classifier-free guidance -----------------------------------------------------------------


def test_cfg_algebra():
    torch.manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(classifier_free_guidance(u, c, 1.0), c, atol=1e-6)  # s = 1: the conditional model
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)  # s = 0: the unconditional model
    assert torch.allclose(classifier_free_guidance(u, c, 100.0), u + 100 * (c - u))
    # threestudio's eps_c + s'(eps_c - eps_u) is ours with s = s' + 1.
    assert torch.allclose(classifier_free_guidance(u, c, 8.0), c + 7.0 * (c - u), atol=1e-5)


def test_guided_noise_is_one_batched_call_uncond_first(monkeypatch):
    eps_c, eps_u = torch.full((1, 2, 4, 4), 3.0), torch.full((1, 2, 4, 4), 1.0)
    prior = KnownPrior(eps_c, eps_u)
    g = make_guidance(monkeypatch, prior, guidance_scale=7.5)
    x_t = torch.randn(3, 2, 4, 4)
    eps = g.guided_noise(x_t, torch.full((3,), 10), cams(3), None)
    assert len(prior.calls) == 1
    x_in, t_in, which = prior.calls[0]
    assert x_in.shape[0] == 6 and which.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(x_in[:3], x_t) and torch.equal(x_in[3:], x_t)
    assert torch.allclose(eps, torch.full_like(x_t, 1.0 + 7.5 * 2.0))


# --- the SDS gradient ---------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_sds_grad_equals_weighted_residual(monkeypatch, weighting):
    torch.manual_seed(1)
    eps_c, eps_u = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    prior = KnownPrior(eps_c, eps_u)
    g = make_guidance(monkeypatch, prior, guidance_scale=5.0, weighting=weighting, timesteps=TimestepConfig(per_item=True))
    latents = torch.randn(3, 2, 4, 4)
    grad = g.sds_grad(latents, cams(3), None, step=0)
    x_in, t_in, _ = prior.calls[0]
    x_t, t = x_in[:3], t_in[:3]
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * latents) / (1 - abar).sqrt()  # the noise that was drawn
    eps_hat = eps_u + 5.0 * (eps_c - eps_u)
    w = {"sds": 1 - abar, "uniform": torch.ones_like(abar), "fantasia3d": abar.sqrt() * (1 - abar)}[weighting]
    assert torch.allclose(grad, w * (eps_hat - eps), atol=1e-3)


def test_target_trick_gradient_is_grad_over_batch():
    torch.manual_seed(2)
    latents = torch.randn(4, 2, 3, 3, requires_grad=True)
    grad = torch.randn(4, 2, 3, 3)
    loss = sds_loss_from_grad(latents, grad)
    loss.backward()
    assert torch.allclose(latents.grad, grad / 4)
    assert loss.item() == pytest.approx(0.5 * grad.square().sum().item() / 4, rel=1e-5)


def test_forward_backpropagates_weight_times_grad_to_the_render(monkeypatch):
    eps_c, eps_u = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    prior = KnownPrior(eps_c, eps_u)
    g = make_guidance(monkeypatch, prior, weight=3.0, weighting="uniform")
    out = render(2)
    torch.manual_seed(3)
    loss = g(out, cams(2), 0)["sds"]
    loss.backward()
    x_t, t, _ = prior.calls[0]
    abar = prior.alphas_cumprod[t[:2]].view(-1, 1, 1, 1)
    latents = out.rgb.detach().permute(0, 3, 1, 2)[:, :2] * 2 - 1
    eps = (x_t[:2] - abar.sqrt() * latents) / (1 - abar).sqrt()
    grad = 0 - eps  # eps_hat = 0, w = 1
    # d loss / d rgb[:, :, :, :2] = weight * grad / B * d latents / d rgb (= 2)
    expected = (3.0 * grad / 2 * 2).permute(0, 2, 3, 1)
    assert torch.allclose(out.rgb.grad[..., :2], expected, atol=1e-3)
    assert out.rgb.grad[..., 2].abs().max() == 0


def test_grad_clip_follows_its_schedule_and_nan_is_zeroed(monkeypatch):
    eps_c, eps_u = torch.full((1, 2, 4, 4), 50.0), torch.zeros(1, 2, 4, 4)
    eps_c[..., 0, 0] = float("nan")
    prior = KnownPrior(eps_c, eps_u)
    g = make_guidance(monkeypatch, prior, guidance_scale=1.0, weighting="uniform", grad_clip={"linear": [[0, 0.5], [100, 2.0]]})
    lat = torch.zeros(1, 2, 4, 4)
    for step, c in ((0, 0.5), (50, 1.25), (100, 2.0), (500, 2.0)):
        grad = g.sds_grad(lat, cams(1), None, step)
        assert grad.max().item() == pytest.approx(c) and grad.min().item() >= -c - 1e-6
        assert torch.isfinite(grad).all() and (grad[..., 0, 0] == 0).all()


def test_weightings():
    abar = torch.tensor([0.25, 0.81])
    assert torch.allclose(sds_weight("sds", abar), 1 - abar)
    assert torch.allclose(sds_weight("uniform", abar), torch.ones(2))
    assert torch.allclose(sds_weight("fantasia3d", abar), abar.sqrt() * (1 - abar))
    with pytest.raises(ValueError, match="weighting"):
        sds_weight("nope", abar)


# --- timestep schedules -----------------------------------------------------------------------


def test_fixed_range_one_t_per_batch_by_default():
    torch.manual_seed(4)
    cfg = TimestepConfig()
    ts = torch.stack([sample_timesteps(cfg, 4, 0, 100, T) for _ in range(300)])
    assert (ts == ts[:, :1]).all()  # one t for the whole batch
    assert ts.min() >= 20 and ts.max() <= 980
    assert ts.float().mean().item() == pytest.approx(500, abs=40)


def test_per_item_timesteps_differ():
    torch.manual_seed(5)
    t = sample_timesteps(TimestepConfig(per_item=True), 64, 0, 100, T)
    assert t.shape == (64,) and len(set(t.tolist())) > 10


def test_linear_anneals_the_upper_bound():
    torch.manual_seed(6)
    cfg = TimestepConfig(schedule="linear", t_max=0.98, t_max_end=0.5)
    late = torch.stack([sample_timesteps(cfg, 1, 100, 100, T) for _ in range(200)])
    assert late.max() <= 500
    mid = torch.stack([sample_timesteps(cfg, 1, 50, 100, T) for _ in range(200)])
    assert mid.max() <= 740 and mid.max() > 500


def test_sqrt_schedule_hifa():
    cfg = TimestepConfig(schedule="sqrt", t_min=0.02, t_max=0.98)
    assert sample_timesteps(cfg, 2, 0, 100, T).tolist() == [980, 980]
    assert sample_timesteps(cfg, 1, 25, 100, T).item() == round((0.98 - 0.96 * math.sqrt(0.25)) * T)
    assert sample_timesteps(cfg, 1, 100, 100, T).item() == 20
    assert sample_timesteps(cfg, 1, 400, 100, T).item() == 20  # clamped past the end


def test_deterministic_schedule_dreamgaussian():
    cfg = TimestepConfig(schedule="deterministic", t_min=0.02, t_max=0.98)
    assert sample_timesteps(cfg, 1, 30, 100, T).item() == 700
    assert sample_timesteps(cfg, 1, 0, 100, T).item() == 980  # clipped to t_max
    assert sample_timesteps(cfg, 1, 99, 100, T).item() == 20  # clipped to t_min


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(TimestepConfig(schedule="cosine"), 1, 0, 100, T)
