"""The view-biased oracle: its closed-form mixture denoiser, its bias per view word, and that plain
SDS with it prefers the front view at a back camera (the Janus failure it exists to reproduce)."""

from __future__ import annotations

import math

import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.interfaces import BuildContext, RenderOutput
from distill3d.engine.reference_scene import resolve_scene_path
from distill3d.guidance.perp_neg import PerpNegSDSConfig, PerpNegSDSGuidance
from distill3d.guidance.priors.biased_oracle import (
    COMPONENTS,
    BiasedOracleConfig,
    BiasedOracleError,
    BiasedOraclePrior,
    component_logits,
    mixture_posterior_noise,
)
from distill3d.guidance.priors.oracle import OracleConfig, OraclePrior
from distill3d.guidance.sds import SDSConfig, SDSGuidance
from distill3d.guidance.view_prompts import BACK, DIRECTIONS, FRONT, SIDE

TRUE, FRONT_VIEW, SIDE_VIEW, BACK_VIEW = (COMPONENTS.index(n) for n in ("true", "front", "side", "back"))


# --- the closed form ---------------------------------------------------------------------------


def log_marginal(x_t, abar, means, log_weights, s):
    """log p(x_t) of the noised mixture, summed over the batch (for autograd)."""
    a = abar.view(-1, 1, *([1] * (x_t.dim() - 1)))
    var = a * s**2 + 1 - a
    d = x_t[0].numel()
    sq = ((x_t.unsqueeze(1) - a.sqrt() * means) ** 2).flatten(2).sum(-1) / var.flatten(1)
    logn = -0.5 * sq - 0.5 * d * torch.log(2 * math.pi * var.flatten(1))
    return torch.logsumexp(torch.log_softmax(log_weights, 1) + logn, dim=1).sum()


def test_closed_form_is_tweedie_score_of_the_mixture():
    """eps_hat = -sqrt(1 - abar) grad log p(x_t): the MMSE denoiser of the noised mixture."""
    g = torch.Generator().manual_seed(0)
    n, k, shape = 6, 5, (3, 4, 4)
    means = torch.rand(n, k, *shape, generator=g, dtype=torch.float64) * 2 - 1
    logw = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    abar = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.05, 0.005], dtype=torch.float64)
    s = 0.3
    x0 = means[torch.arange(n), torch.randint(0, k, (n,), generator=g)]
    x_t = (abar.view(-1, 1, 1, 1).sqrt() * x0 + (1 - abar).view(-1, 1, 1, 1).sqrt() * torch.randn(n, *shape, generator=g, dtype=torch.float64))
    x_t.requires_grad_(True)
    (score,) = torch.autograd.grad(log_marginal(x_t, abar, means, logw, s), x_t)
    expected = -(1 - abar).view(-1, 1, 1, 1).sqrt() * score
    got = mixture_posterior_noise(x_t.detach(), abar, means, logw, s)
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-7)


def test_closed_form_matches_monte_carlo():
    """E[eps | x_t] by self-normalised importance sampling over (component, x0) in 2 dimensions."""
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[[-0.8, 0.3], [0.6, -0.5], [0.1, 0.9]]], dtype=torch.float64)  # (1, K=3, 2)
    logw = torch.tensor([[0.0, 1.5, -1.0]], dtype=torch.float64)
    s, m = 0.25, 400_000
    for abar_value, x in ((0.6, [0.1, -0.2]), (0.2, [0.5, 0.4]), (0.95, [-0.7, 0.2])):
        abar = torch.tensor([abar_value], dtype=torch.float64)
        x_t = torch.tensor([x], dtype=torch.float64)
        k = torch.multinomial(torch.softmax(logw[0], 0), m, replacement=True, generator=g)
        x0 = means[0, k] + s * torch.randn(m, 2, generator=g, dtype=torch.float64)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise that maps x0 to x_t
        logp = -0.5 * (eps**2).sum(1)  # p(x_t | x0) up to a constant
        w = torch.softmax(logp, 0)
        mc = (w[:, None] * eps).sum(0)
        got = mixture_posterior_noise(x_t, abar, means, logw, s)[0]
        assert torch.allclose(got, mc, atol=0.02), (abar_value, got, mc)


def test_one_component_is_the_oracle(tmp_path):
    oracle = OraclePrior(OracleConfig(noise_std=0.2), BuildContext())
    x_t = torch.randn(3, 3, 8, 8)
    mean = torch.rand(3, 3, 8, 8) * 2 - 1
    t = torch.tensor([10, 500, 990])
    expected = oracle.predict_noise(x_t, t, {"mean": mean})
    got = mixture_posterior_noise(x_t, oracle.alphas_cumprod[t], mean.unsqueeze(1), torch.zeros(3, 1), 0.2)
    assert torch.allclose(got, expected, atol=1e-5)


# --- the bias per view word --------------------------------------------------------------------


def weights(text, bucket, **kw):
    cfg = BiasedOracleConfig(**kw)
    logits = component_logits(torch.tensor([text], dtype=torch.float32), torch.tensor([bucket]), cfg.front_bias, cfg.other_bias, cfg.suffix_gain)
    return torch.softmax(logits, 1)[0]


def one_hot(direction):
    v = [0.0] * len(DIRECTIONS)
    v[direction] = 1.0
    return v


def test_bias_per_suffix_at_a_back_camera():
    plain = weights([0.0] * 4, BACK)
    back = weights(one_hot(BACK), BACK)
    front = weights(one_hot(FRONT), BACK)
    side = weights(one_hot(SIDE), BACK)
    # Plain prompt: strongly front-biased.
    assert plain[FRONT_VIEW] > 0.8 and plain[TRUE] < 0.15
    # The matching suffix moves weight to consistent views (true and canonical back) but keeps some bias.
    assert back[TRUE] + back[BACK_VIEW] > 0.5 > plain[TRUE] + plain[BACK_VIEW]
    assert 0.1 < back[FRONT_VIEW] < plain[FRONT_VIEW]
    # A suffix naming another view pulls toward that view.
    assert front[FRONT_VIEW] > plain[FRONT_VIEW] and front[TRUE] < plain[TRUE]
    assert side[SIDE_VIEW] > 5 * plain[SIDE_VIEW]
    # Perp-Neg's interpolated words sit in between.
    mixed = weights([0.0, 0.5, 0.5, 0.0], BACK)
    assert back[TRUE] > mixed[TRUE] > plain[TRUE]


def test_front_camera_front_word_is_the_true_view():
    w = weights(one_hot(FRONT), FRONT)
    assert w[TRUE] + w[FRONT_VIEW] > 0.99  # both are the front at a front camera


def test_settings_are_checked():
    with pytest.raises(ValueError, match="suffix_gain"):
        BiasedOracleConfig(suffix_gain=-1)
    with pytest.raises(ValueError, match="noise_std"):
        BiasedOracleConfig(noise_std=0)


# --- conditions through SDS and Perp-Neg ---------------------------------------------------------


def camera(azimuth, elevation=15.0):
    return make_cameras(torch.tensor([elevation]), torch.tensor([float(azimuth)]), torch.tensor([3.2]), torch.tensor([42.5]))


def image_render(param):
    rgb = torch.sigmoid(param)
    b, h, w, _ = rgb.shape
    return RenderOutput(rgb=rgb, opacity=torch.ones(b, h, w, 1), depth=torch.zeros(b, h, w, 1), background=torch.ones(b, h, w, 3))


def distil_image(guidance, cam, steps=120, res=12, seed=0):
    """SDS on a free image at one camera (the smallest 'representation'): MSE to the true and front views."""
    torch.manual_seed(seed)
    param = torch.zeros(1, res, res, 3, requires_grad=True)
    opt = torch.optim.Adam([param], lr=0.05)
    for step in range(steps):
        loss = sum(guidance(image_render(param), cam, step).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.sigmoid(param).detach()
    scene = guidance.prior.scene
    true = scene.render(cam, res, res).rgb
    front = scene.render(camera(0.0), res, res).rgb
    return float(((x - true) ** 2).mean()), float(((x - front) ** 2).mean())


def sds(steps=120, **prior):
    cfg = SDSConfig(prior={"name": "biased-oracle", "scene": "janus_face", **prior}, guidance_scale=1.0)
    return SDSGuidance(cfg, BuildContext(total_steps=steps))


def test_plain_sds_prefers_the_front_view_at_a_back_camera():
    mse_true, mse_front = distil_image(sds(view_dependent_prompts=False), camera(180))
    assert mse_front < mse_true
    # Without the bias the same run finds the true view: the test can tell the two apart.
    mse_true, mse_front = distil_image(sds(view_dependent_prompts=False, front_bias=-20.0), camera(180))
    assert mse_true < mse_front


@pytest.mark.parametrize("view_words", [True, False])
def test_conditions_carry_the_camera_bucket_as_view_words(view_words):
    prior = BiasedOraclePrior(BiasedOracleConfig(scene="janus_face", view_dependent_prompts=view_words), BuildContext())
    cams = make_cameras(torch.tensor([10.0, 10.0, 70.0]), torch.tensor([0.0, 170.0, 100.0]), torch.tensor([3.2] * 3), torch.tensor([42.5] * 3))
    cond, uncond = prior.conditions(cams, image_render(torch.zeros(3, 6, 6, 3)))
    expected = torch.zeros(3, 4)
    if view_words:
        expected[0, FRONT], expected[1, BACK], expected[2, 3] = 1.0, 1.0, 1.0  # front, back, overhead
    assert torch.equal(cond["text"], expected)
    assert cond["null"].sum() == 0 and uncond["null"].sum() == 3 and uncond["text"].abs().sum() == 0
    means, buckets = prior._bound
    assert means.shape == (3, len(COMPONENTS), 3, 6, 6) and buckets.tolist() == [FRONT, BACK, 3]
    # The true view at a front camera (azimuth 0) is its canonical front view.
    assert torch.allclose(means[0, TRUE], means[0, FRONT_VIEW])
    assert not torch.allclose(means[1, TRUE], means[1, FRONT_VIEW])


def test_perp_neg_runs_on_the_biased_oracle():
    cfg = PerpNegSDSConfig(prior={"name": "biased-oracle", "scene": "janus_face"}, guidance_scale=1.0)
    g = PerpNegSDSGuidance(cfg, BuildContext(total_steps=10))
    out = image_render(torch.zeros(2, 8, 8, 3, requires_grad=True))
    cams = make_cameras(torch.tensor([10.0, 20.0]), torch.tensor([30.0, 170.0]), torch.tensor([3.2, 3.2]), torch.tensor([42.5, 42.5]))
    loss = g(out, cams, 0)["sds"]
    assert torch.isfinite(loss)
    assert g.last_plan.negative_weights.shape == (2, 2)


def test_predict_noise_needs_bound_cameras():
    prior = BiasedOraclePrior(BiasedOracleConfig(scene=str(resolve_scene_path("janus_face"))), BuildContext())
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(BiasedOracleError, match="bound"):
        prior.predict_noise(x, torch.tensor([5]), prior.text_condition(torch.zeros(1, 4)))
    with pytest.raises(BiasedOracleError, match="render"):
        prior.view_conditions(camera(0))
