"""The oracle prior: exact noise prediction of a Gaussian around the exact scene render."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill3d.engine.cameras import orbit_cameras
from distill3d.engine.interfaces import BuildContext, RenderOutput, cat_conditions
from distill3d.engine.reference_scene import DEFAULT_SCENE, PrimitiveScene, load_scene
from distill3d.guidance.priors.oracle import OracleConfig, OraclePrior
from distill3d.guidance.timesteps import classifier_free_guidance


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP stalls on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_prior(**kw) -> OraclePrior:
    return OraclePrior(OracleConfig(**kw), BuildContext())


def fake_render(rgb_bhwc: torch.Tensor, background: torch.Tensor | None = None) -> RenderOutput:
    b, h, w, _ = rgb_bhwc.shape
    bg = torch.ones(b, h, w, 3) if background is None else background
    return RenderOutput(rgb=rgb_bhwc, opacity=torch.ones(b, h, w, 1), depth=torch.zeros(b, h, w, 1), background=bg)


def test_schedule_is_sd_scaled_linear():
    prior = make_prior()
    abar = prior.alphas_cumprod
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    assert "alphas_cumprod" in dict(prior.named_buffers())
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    # beta_1 = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) / 999)^2
    beta1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    assert abar[1].item() == pytest.approx((1 - 0.00085) * (1 - beta1), rel=1e-6)
    assert abar[-1].item() == pytest.approx(0.0047, abs=2e-4)  # SD's well-known final value
    assert torch.all(abar[1:] < abar[:-1])


def test_eps_hat_formula_by_hand():
    s = 0.3
    prior = make_prior(noise_std=s)
    t = torch.tensor([100, 700])
    x_t = torch.tensor([0.25, -0.6]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    mu = torch.tensor([-0.5, 0.8]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    got = prior.predict_noise(x_t, t, {"mean": mu})
    for i in range(2):
        a = prior.alphas_cumprod[t[i]].item()
        xi, mi = x_t[i, 0, 0, 0].item(), mu[i, 0, 0, 0].item()
        want = math.sqrt(1 - a) * (xi - math.sqrt(a) * mi) / (a * s * s + 1 - a)
        assert torch.allclose(got[i], torch.full_like(got[i], want), rtol=1e-5, atol=1e-6)
    assert not got.requires_grad


def test_small_t_and_small_s_recovers_the_noise():
    prior = make_prior(noise_std=1e-4)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([0, 5])
    x_t = prior.add_noise(mu, eps, t)
    assert torch.allclose(prior.predict_noise(x_t, t, {"mean": mu}), eps, atol=1e-3)
    # s = 0: exact at every t (the data is a point mass at mu).
    prior0 = make_prior(noise_std=0.0)
    t = torch.tensor([500, 900])
    x_t = prior0.add_noise(mu, eps, t)
    assert torch.allclose(prior0.predict_noise(x_t, t, {"mean": mu}), eps, atol=1e-4)


def test_expected_sds_gradient_pulls_toward_mu():
    """E[eps_hat(x_t) - eps] = k_t (x - mu), k_t = sqrt(abar (1 - abar)) / (abar s^2 + 1 - abar)."""
    s = 0.2
    prior = make_prior(noise_std=s)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 6, 6, generator=g) * 2 - 1
    mu = torch.rand(1, 3, 6, 6, generator=g) * 2 - 1
    draws = 20000
    t = torch.full((draws,), 500)
    eps = torch.randn(draws, 3, 6, 6, generator=g)
    x_t = prior.add_noise(x.expand(draws, -1, -1, -1), eps, t)
    mean_grad = (prior.predict_noise(x_t, t, {"mean": mu.expand(draws, -1, -1, -1)}) - eps).mean(0, keepdim=True)
    a = prior.alphas_cumprod[500].item()
    k = math.sqrt(a * (1 - a)) / (a * s * s + 1 - a)
    assert torch.allclose(mean_grad, k * (x - mu), atol=0.01)
    cos = torch.nn.functional.cosine_similarity(mean_grad.flatten(), (x - mu).flatten(), dim=0)
    assert cos > 0.999


def test_conditions_render_scene_over_the_renders_background():
    prior = make_prior()
    cams = orbit_cameras(2, elevation=15, distance=3.2, fovy=42.5)
    h, w = 24, 32
    bg = torch.zeros(2, h, w, 3)
    bg[..., 2] = 1.0  # blue background
    bg[1] = torch.rand(h, w, 3)
    out = fake_render(torch.rand(2, h, w, 3), background=bg)
    cond, uncond = prior.conditions(cams, out)
    assert set(cond) == {"mean"} and set(uncond) == {"mean"}
    mu = cond["mean"]
    assert mu.shape == (2, 3, h, w)
    exact = prior.scene.render(cams, h, w)
    empty = exact.opacity[..., 0] < 0.5
    mu_hwc = mu.permute(0, 2, 3, 1)
    assert empty.any() and (~empty).any()
    assert torch.allclose(mu_hwc[empty], bg[empty] * 2 - 1, atol=1e-6)
    assert torch.allclose(mu_hwc[~empty], exact.rgb[~empty] * 2 - 1, atol=1e-6)
    assert torch.allclose(uncond["mean"], torch.zeros_like(mu))  # grey 0.5 -> 0
    assert make_prior(unconditional_gray=0.75).conditions(cams, out)[1]["mean"].unique().tolist() == [0.5]
    # Conditions stack along the batch (as the SDS guidance does for CFG).
    both = cat_conditions(uncond, cond)
    assert both["mean"].shape == (4, 3, h, w)


def test_shaded_renders_get_the_exact_render_shaded_the_same_way():
    from distill3d.representations.shading import ShadingConfig, shading_extras

    prior = make_prior()
    cams = orbit_cameras(2, elevation=15, distance=3.2, fovy=42.5)
    h, w = 24, 32
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.8, 0.5], [-0.6, 0.2, 0.7]]), dim=-1)
    config = ShadingConfig(ambient=0.2, diffuse=0.7)
    exact = prior.scene.render(cams, h, w)
    hit = exact.opacity[..., 0] > 0.5
    lambert = (exact.normal * light.view(2, 1, 1, 3)).sum(-1, keepdim=True).clamp_min(0)
    for mode, expected in (("textureless", (0.2 + 0.7 * lambert).expand(-1, -1, -1, 3)), ("lambertian", exact.rgb * (0.2 + 0.7 * lambert))):
        out = fake_render(torch.rand(2, h, w, 3))
        out.extras.update(shading_extras(mode, light, config))
        mu = prior.conditions(cams, out)[0]["mean"].permute(0, 2, 3, 1)
        assert torch.allclose(mu[hit], expected[hit] * 2 - 1, atol=1e-5), mode
        assert torch.allclose(mu[~hit], torch.ones_like(mu[~hit]), atol=1e-6)  # the render's white background
    # albedo renders (and renders that say nothing) keep the unlit exact render
    plain = prior.conditions(cams, fake_render(torch.rand(2, h, w, 3)))[0]["mean"].permute(0, 2, 3, 1)
    assert torch.allclose(plain[hit], exact.rgb[hit] * 2 - 1, atol=1e-6)
    # a shaded render that does not say where its light was is an error, not a silent mismatch
    out = fake_render(torch.rand(2, h, w, 3))
    out.extras["shading"] = "lambertian"
    with pytest.raises(ValueError, match="no 'light'"):
        prior.conditions(cams, out)


def test_image_size_resizes_renders_and_means():
    prior = make_prior(image_size=16)
    cams = orbit_cameras(2)
    rgb = torch.rand(2, 3, 40, 40, requires_grad=True)
    x = prior.encode_images(rgb)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    x.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    cond, uncond = prior.conditions(cams, fake_render(rgb.detach().permute(0, 2, 3, 1)))
    assert cond["mean"].shape == (2, 3, 16, 16) and uncond["mean"].shape == (2, 3, 16, 16)
    # Without image_size the encoding is the plain map to [-1, 1].
    plain = make_prior().encode_images(rgb)
    assert torch.allclose(plain, rgb * 2 - 1)


def test_cfg_scale_one_equals_conditional_prediction():
    prior = make_prior()
    cams = orbit_cameras(2)
    out = fake_render(torch.rand(2, 16, 16, 3))
    cond, uncond = prior.conditions(cams, out)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([300, 300])
    x_t = prior.add_noise(x, torch.randn_like(x), t)
    eps = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(uncond, cond))
    eps_u, eps_c = eps.chunk(2)
    assert not torch.allclose(eps_u, eps_c)
    assert torch.allclose(classifier_free_guidance(eps_u, eps_c, 1.0), eps_c, atol=1e-6)
    assert torch.equal(eps_c, prior.predict_noise(x_t, t, cond))
    # Scale g: the mean gradient's fixed point is (1 - g) mu_u + g mu_c, linear in g.
    guided = classifier_free_guidance(eps_u, eps_c, 3.0)
    target = -2 * uncond["mean"] + 3 * cond["mean"]
    assert torch.allclose(guided, prior.predict_noise(x_t, t, {"mean": target}), atol=1e-5)


def test_sds_descent_reaches_the_exact_render():
    """End to end through SDSGuidance with guidance scale 1: optimising the image itself."""
    from distill3d.guidance.sds import SDSConfig, SDSGuidance

    torch.manual_seed(0)
    ctx = BuildContext(total_steps=150)
    guidance = SDSGuidance(SDSConfig(prior={"name": "oracle", "noise_std": 0.05}, guidance_scale=1.0, weighting="uniform"), ctx)
    assert isinstance(guidance.prior, OraclePrior)
    cams = orbit_cameras(2, elevation=15, distance=3.2, fovy=42.5)
    target = guidance.prior.scene.render(cams, 16, 16).rgb
    image = torch.full((2, 16, 16, 3), 0.5, requires_grad=True)
    opt = torch.optim.Adam([image], lr=0.03)
    start = (image.detach() - target).abs().mean()
    for step in range(150):
        loss = guidance(fake_render(image), cams, step)["sds"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (image.detach() - target).abs().mean()
    assert err < 0.2 * start and err < 0.05, (start, err)


def test_scene_selection(tmp_path):
    assert make_prior().scene.source == str(DEFAULT_SCENE)
    assert isinstance(make_prior().scene, PrimitiveScene)
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"primitives": [{"type": "sphere", "center": [0, 0, 0], "radius": 0.4, "color": [0, 1, 0]}]}))
    from_ctx = OraclePrior(OracleConfig(), BuildContext(scene=path))
    assert from_ctx.scene.source == str(path) and len(from_ctx.scene) == 1
    # An explicit scene wins over the context's reference; built-in names work.
    explicit = OraclePrior(OracleConfig(scene="two_cylinders"), BuildContext(scene=path))
    assert explicit.scene.to_dict() == load_scene("two_cylinders").to_dict()


def test_registry_and_config_validation():
    from distill3d.engine.config import ConfigError
    from distill3d.plugins.registry import build_plugin

    prior = build_plugin("prior", {"name": "oracle", "noise_std": 0.2, "image_size": 32}, BuildContext(), "guidance.prior")
    assert isinstance(prior, OraclePrior) and prior.config.noise_std == 0.2
    with pytest.raises(ConfigError, match="noise_std"):
        build_plugin("prior", {"name": "oracle", "noise_std": -1.0}, BuildContext(), "guidance.prior")
    with pytest.raises(ConfigError, match="unconditional_gray"):
        build_plugin("prior", {"name": "oracle", "unconditional_gray": 2.0}, BuildContext(), "guidance.prior")
    with pytest.raises(ValueError, match="does not exist"):
        make_prior(scene="no_such_scene.json")
