"""The Stable Diffusion prior on a tiny random-weight SD saved to disk and loaded like a user's model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.interfaces import BuildContext, RenderOutput
from distill3d.guidance.priors.loading import (
    EmptyPromptError,
    InvalidModelFolderError,
    ModelNotFoundError,
    PriorError,
    PriorOutOfMemoryError,
)
from distill3d.guidance.priors.stable_diffusion import (
    StableDiffusionConfig,
    StableDiffusionPrior,
    model_output_to_epsilon,
)
from tiny_models import build_tiny_sd


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is as fast, and far faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def ctx_for(cache_dir, prompt="a photo of a cat", negative="ugly, blurry", **kw) -> BuildContext:
    return BuildContext(prompt=prompt, negative_prompt=negative, cache_dir=cache_dir, **kw)


@pytest.fixture(scope="module")
def prior(sd_dir, cache_dir) -> StableDiffusionPrior:
    return StableDiffusionPrior(StableDiffusionConfig(model=str(sd_dir), view_negative_prompts={"back": "face"}), ctx_for(cache_dir))


def cameras(elevation, azimuth):
    n = len(azimuth)
    return make_cameras(torch.tensor(elevation, dtype=torch.float32), torch.tensor(azimuth, dtype=torch.float32), torch.full((n,), 3.2), torch.full((n,), 40.0))


def test_loads_from_folder_with_native_sizes(prior):
    assert prior.image_size == 32 and prior.latent_size == 16 and prior.latent_channels == 4
    assert prior.dtype == torch.float32 and prior.prediction_type == "epsilon"
    assert prior.alphas_cumprod.shape == (1000,) and prior.num_train_timesteps == 1000
    assert prior.scaling_factor == pytest.approx(0.18215)
    assert not any(p.requires_grad for p in prior.parameters())
    prior.train()
    assert not prior.unet.training and not prior.vae.training


def test_registered_entry_point(sd_dir, cache_dir):
    from distill3d.plugins.registry import build_plugin

    p = build_plugin("prior", {"name": "stable-diffusion", "model": str(sd_dir), "half_precision": True}, ctx_for(cache_dir), "guidance.0.prior")
    assert isinstance(p, StableDiffusionPrior)
    assert p.dtype == torch.float32  # half precision only on CUDA


def test_embeddings_match_the_diffusers_pipeline(prior, sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pos, neg = pipe.encode_prompt("a photo of a cat, back view", "cpu", 1, True, negative_prompt="ugly, blurry, face")
    c, u = prior.conditions(cameras([0.0], [180.0]), None)
    assert torch.allclose(c["encoder_hidden_states"], pos, atol=1e-5)
    assert torch.allclose(u["encoder_hidden_states"], neg, atol=1e-5)  # per-view negative: "face" on the back


def test_view_dependent_conditions(prior):
    cams = cameras([0.0, 0.0, 0.0, 75.0], [0.0, 90.0, -170.0, 0.0])
    c, u = prior.conditions(cams, None)
    emb, pos = c["encoder_hidden_states"], prior.prompts.positive
    assert emb.shape == (4, 77, 32) and u["encoder_hidden_states"].shape == (4, 77, 32)
    for i, d in enumerate([0, 1, 2, 3]):  # front, side, back, overhead
        assert torch.equal(emb[i], pos[d])
    neg = u["encoder_hidden_states"]
    assert torch.equal(neg[0], neg[1]) and not torch.equal(neg[0], neg[2])  # only the back view adds "face"
    views = prior.view_conditions(cams)
    assert views.directional["encoder_hidden_states"].shape == (4, 77, 32)
    assert views.direction.tolist() == [0, 1, 2, 3]


def test_plain_prompt_without_view_dependence(sd_dir, cache_dir):
    p = StableDiffusionPrior(StableDiffusionConfig(model=str(sd_dir), view_dependent_prompts=False), ctx_for(cache_dir))
    c, _ = p.conditions(cameras([0.0, 0.0], [0.0, 180.0]), None)
    assert torch.equal(c["encoder_hidden_states"][0], p.prompts.base[0])
    assert torch.equal(c["encoder_hidden_states"][1], p.prompts.base[0])


def test_encode_images_resizes_and_keeps_gradient(prior):
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = prior.encode_images(rgb)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_vae_encode_values_are_the_scaled_posterior_of_the_image_in_minus_one_one(prior):
    """Written out: resize to the VAE's size, map [0, 1] -> [-1, 1], sample the posterior, times 0.18215."""
    rgb = torch.rand(2, 3, 24, 24)
    torch.manual_seed(11)
    latents = prior.encode_images(rgb)
    x = torch.nn.functional.interpolate(rgb, (32, 32), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        posterior = prior.vae.encode(x).latent_dist
    torch.manual_seed(11)
    expected = posterior.sample() * 0.18215
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    # The scale matters: the unscaled posterior (or a [0, 1] input) is far from it.
    assert (latents - expected / 0.18215).abs().max() > 10 * (latents - expected).abs().max() + 1e-3


def test_rgb_as_latents(sd_dir, cache_dir):
    p = StableDiffusionPrior(StableDiffusionConfig(model=str(sd_dir), rgb_as_latents=True), ctx_for(cache_dir))
    x = torch.rand(1, 4, 64, 64)
    lat = p.encode_images(x)
    assert lat.shape == (1, 4, 16, 16)
    assert torch.allclose(lat, torch.nn.functional.interpolate(x, (16, 16), mode="bilinear", align_corners=False) * 2 - 1)
    with pytest.raises(PriorError, match="4-channel latent"):
        p.encode_images(torch.rand(1, 3, 64, 64))
    # An RGB render goes in with its opacity as the 4th channel, differentiably.
    from distill3d.engine.interfaces import RenderOutput

    rgb = torch.rand(1, 64, 64, 3, requires_grad=True)
    opacity = torch.rand(1, 64, 64, 1, requires_grad=True)
    out = RenderOutput(rgb=rgb, opacity=opacity, depth=opacity, background=torch.ones(1, 64, 64, 3))
    lat = p.encode_render(out)
    expected = torch.cat([rgb, opacity], -1).permute(0, 3, 1, 2)
    assert torch.allclose(lat, torch.nn.functional.interpolate(expected, (16, 16), mode="bilinear", align_corners=False) * 2 - 1)
    lat.sum().backward()
    assert opacity.grad.abs().sum() > 0 and rgb.grad.abs().sum() > 0


def test_predict_noise_is_the_unet_without_graph(prior):
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    t = torch.tensor([20, 900])
    cond, _ = prior.conditions(cameras([0.0, 0.0], [0.0, 90.0]), None)
    eps = prior.predict_noise(x, t, cond)
    assert not eps.requires_grad and eps.shape == x.shape
    with torch.no_grad():
        ref = prior.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(eps, ref, atol=1e-5)


def test_v_prediction_conversion_is_exact():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    assert torch.allclose(model_output_to_epsilon(v, x_t, t, sched.alphas_cumprod, "v_prediction"), eps, atol=1e-4)
    assert torch.allclose(model_output_to_epsilon(x0, x_t, t, sched.alphas_cumprod, "sample"), eps, atol=1e-3)
    assert model_output_to_epsilon(eps, x_t, t, sched.alphas_cumprod, "epsilon") is eps
    with pytest.raises(PriorError, match="prediction_type"):
        model_output_to_epsilon(eps, x_t, t, sched.alphas_cumprod, "flow")


def test_v_prediction_model_is_converted(tmp_path, cache_dir):
    d = build_tiny_sd(tmp_path / "sd-v", prediction_type="v_prediction")
    p = StableDiffusionPrior(StableDiffusionConfig(model=str(d)), ctx_for(cache_dir))
    assert p.prediction_type == "v_prediction"
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([100, 700])
    cond, _ = p.conditions(cameras([0.0, 0.0], [0.0, 0.0]), None)
    with torch.no_grad():
        v = p.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    abar = p.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(p.predict_noise(x, t, cond), abar.sqrt() * v + (1 - abar).sqrt() * x, atol=1e-5)


def _vae_encoder(prior, z: torch.Tensor):
    """The render (B, H, W, 3) -> latents, written out with a fixed posterior draw z."""

    def encode(rgb):
        x = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), (32, 32), mode="bilinear", align_corners=False) * 2 - 1
        posterior = prior.vae.encode(x).latent_dist
        return (posterior.mean + posterior.std * z) * 0.18215

    return encode


def _posterior_draw(prior, rgb, latents):
    with torch.no_grad():
        x = torch.nn.functional.interpolate(rgb.detach().permute(0, 3, 1, 2), (32, 32), mode="bilinear", align_corners=False) * 2 - 1
        posterior = prior.vae.encode(x).latent_dist
    return (latents / 0.18215 - posterior.mean) / posterior.std


def _render(b=2, size=24):
    rgb = torch.rand(b, size, size, 3, requires_grad=True)
    out = RenderOutput(rgb=rgb, opacity=torch.ones(b, size, size, 1), depth=torch.ones(b, size, size, 1), background=torch.zeros(b, size, size, 3))
    return rgb, out


def test_sds_step_render_gradient_is_weighted_residual_through_the_vae(sd_dir, cache_dir, monkeypatch):
    from distill3d.guidance.sds import SDSConfig, SDSGuidance

    from sds_reference import NoiseRecorder, cfg, noised, render_gradient

    scale, weight = 7.5, 3.0
    g = SDSGuidance(SDSConfig(prior={"name": "stable-diffusion", "model": str(sd_dir)}, guidance_scale=scale, weight=weight), ctx_for(cache_dir, total_steps=100))
    prior = g.prior
    recorder = NoiseRecorder(prior, monkeypatch)
    rgb, out = _render()
    cams = cameras([10.0, 10.0], [0.0, 120.0])
    torch.manual_seed(5)
    g(out, cams, 5)["sds"].backward()
    rec = recorder.last
    latents, noise, t = rec["x"], rec["noise"], rec["t"]
    cond, uncond = prior.conditions(cams, None)
    x_t = noised(prior, latents, noise, t)
    with torch.no_grad():
        eps_u = prior.unet(x_t, t, encoder_hidden_states=uncond["encoder_hidden_states"]).sample
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    grad = (1 - abar) * (cfg(eps_u, eps_c, scale) - noise)
    expected = render_gradient(_vae_encoder(prior, _posterior_draw(prior, rgb, latents)), rgb, grad, weight)
    assert expected.abs().max() > 0
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_perp_neg_sds_step_matches_the_hand_written_plan_and_formula(sd_dir, cache_dir, monkeypatch):
    from distill3d.guidance.perp_neg import PerpNegSDSConfig, PerpNegSDSGuidance

    from sds_reference import NoiseRecorder, mixed, noised, perp, perp_neg_rows_stable_dreamfusion, render_gradient, rows

    scale, azimuths = 7.5, [30.0, -170.0]
    spec = {"name": "stable-diffusion", "model": str(sd_dir)}
    g = PerpNegSDSGuidance(PerpNegSDSConfig(prior=spec, guidance_scale=scale), ctx_for(cache_dir, total_steps=100))
    prior = g.prior
    recorder = NoiseRecorder(prior, monkeypatch)
    rgb, out = _render()
    cams = cameras([10.0, 10.0], azimuths)
    torch.manual_seed(6)
    g(out, cams, 5)["sds"].backward()
    rec = recorder.last
    latents, noise, t = rec["x"], rec["noise"], rec["t"]
    views = prior.view_conditions(cams)
    plan = [perp_neg_rows_stable_dreamfusion(a) for a in azimuths]
    x_t = noised(prior, latents, noise, t)

    def unet(condition):
        with torch.no_grad():
            return prior.unet(x_t, t, encoder_hidden_states=condition["encoder_hidden_states"]).sample

    eps_u = unet(views.uncond)
    d_pos = unet(mixed(views.directional, [p[0] for p in plan])) - eps_u
    negative = torch.zeros_like(d_pos)
    for k in range(2):
        d_k = unet(rows(views.directional, [p[1][k] for p in plan])) - eps_u
        w_k = torch.tensor([p[2][k] for p in plan]).view(-1, 1, 1, 1)
        negative = negative + w_k * perp(d_k, d_pos)
    eps_hat = eps_u + scale * (d_pos + negative)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    grad = (1 - abar) * (eps_hat - noise)
    expected = render_gradient(_vae_encoder(prior, _posterior_draw(prior, rgb, latents)), rgb, grad, 1.0)
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    # The negative terms are not negligible here: plain CFG would give a clearly different gradient.
    plain = render_gradient(_vae_encoder(prior, _posterior_draw(prior, rgb, latents)), rgb, (1 - abar) * (eps_u + scale * d_pos - noise), 1.0)
    assert (plain - expected).abs().max() > 0.05 * expected.abs().max()


def test_embedding_cache_hit_skips_the_text_encoder(sd_dir, cache_dir, monkeypatch):
    cfg = StableDiffusionConfig(model=str(sd_dir))
    StableDiffusionPrior(cfg, ctx_for(cache_dir, prompt="a red chair"))  # fills the cache

    def boom(self, source):
        raise AssertionError("text encoder loaded on a cache hit")

    monkeypatch.setattr(StableDiffusionPrior, "load_text_encoder", boom)
    p = StableDiffusionPrior(cfg, ctx_for(cache_dir, prompt="a red chair"))
    assert p.embedding_cache.stats.misses == 0 and p.embedding_cache.stats.encoder_loads == 0
    with pytest.raises(AssertionError, match="cache hit"):  # a new prompt misses
        StableDiffusionPrior(cfg, ctx_for(cache_dir, prompt="a wooden chair"))


def test_cache_invalidated_when_the_text_encoder_changes(tmp_path, cache_dir):
    d = build_tiny_sd(tmp_path / "sd")
    StableDiffusionPrior(StableDiffusionConfig(model=str(d)), ctx_for(cache_dir))
    config = d / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 1e-06'))
    p = StableDiffusionPrior(StableDiffusionConfig(model=str(d)), ctx_for(cache_dir))
    assert p.embedding_cache.stats.encoder_loads == 1 and p.embedding_cache.stats.hits == 0


def test_missing_text_encoder_weights_are_named(tmp_path, cache_dir):
    d = build_tiny_sd(tmp_path / "sd")
    for w in (d / "text_encoder").glob("*.safetensors"):
        w.unlink()
    # The folder check accepts it (the weights are needed only to encode uncached prompts) ...
    with pytest.raises(InvalidModelFolderError, match="text_encoder/ has no weights.*not in the embedding cache"):
        StableDiffusionPrior(StableDiffusionConfig(model=str(d)), ctx_for(cache_dir, prompt="a dog"))


def test_not_cached_hub_id_says_how_to_download(cache_dir, monkeypatch):
    for env_offline, local_only in ((True, None), (False, True)):
        if not env_offline:
            monkeypatch.delenv("HF_HUB_OFFLINE")
        with pytest.raises(ModelNotFoundError) as info:
            StableDiffusionPrior(StableDiffusionConfig(model="distill3d-tests/no-such-model", local_files_only=local_only), ctx_for(cache_dir))
        msg = str(info.value)
        assert "distill3d-tests/no-such-model" in msg and "not in the local" in msg
        assert "huggingface-cli download distill3d-tests/no-such-model --local-dir DIR" in msg and "--model DIR" in msg


def test_cached_hub_snapshot_loads_offline(sd_dir, cache_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    p = StableDiffusionPrior(StableDiffusionConfig(model="someone/tiny-sd"), ctx_for(cache_dir))
    assert p.source.hub_id == "someone/tiny-sd" and p.source.commit == commit
    assert p.source.folder == repo / "snapshots" / commit
    assert commit in p.encoder_key()


def test_folder_that_is_not_a_model(sd_dir, cache_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(InvalidModelFolderError) as info:
        StableDiffusionPrior(StableDiffusionConfig(model=str(broken)), ctx_for(cache_dir))
    assert "vae/" in str(info.value) and "scheduler/scheduler_config.json" in str(info.value)
    assert "not a diffusers Stable Diffusion model folder" in str(info.value)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(InvalidModelFolderError, match="from_single_file"):
        StableDiffusionPrior(StableDiffusionConfig(model=str(ckpt)), ctx_for(cache_dir))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StableDiffusionPrior(StableDiffusionConfig(model=str(tmp_path / "missing" / "dir")), ctx_for(cache_dir))


def test_empty_prompt(sd_dir, cache_dir):
    for prompt in ("", "  "):
        with pytest.raises(EmptyPromptError, match="prompt is empty"):
            StableDiffusionPrior(StableDiffusionConfig(model=str(sd_dir)), ctx_for(cache_dir, prompt=prompt))
    # The prior's own prompt setting wins over the run's.
    p = StableDiffusionPrior(StableDiffusionConfig(model=str(sd_dir), prompt="a dog"), ctx_for(cache_dir, prompt=""))
    assert p.prompts.base_text == "a dog"


def test_cuda_out_of_memory_message(prior, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prior.unet, "forward", oom)
    cond, _ = prior.conditions(cameras([0.0], [0.0]), None)
    with pytest.raises(PriorOutOfMemoryError) as info:
        prior.predict_noise(torch.randn(1, 4, 16, 16), torch.tensor([10]), cond)
    msg = str(info.value)
    for hint in ("batch_size", "resolution", "half_precision", "attention_slicing", "vae_slicing", "Tried to allocate"):
        assert hint in msg


def test_checkpoints_hold_no_model_weights(sd_dir, cache_dir):
    from distill3d.guidance.sds import SDSConfig, SDSGuidance

    g = SDSGuidance(SDSConfig(prior={"name": "stable-diffusion", "model": str(sd_dir)}), ctx_for(cache_dir))
    state = g.state_dict()
    assert not any(".unet." in k or ".vae." in k or k.startswith(("prior.unet", "prior.vae")) for k in state)
    g.load_state_dict(state)  # strict: the frozen networks are not reported missing
    g.load_state_dict({**state, **{f"prior.unet.{k}": v for k, v in g.prior.unet.state_dict().items()}})  # older checkpoints
    assert len(list(g.prior.unet.parameters())) > 0  # still a submodule: moves with .to(device)


def test_a_run_caches_its_text_embeddings_under_DISTILL3D_CACHE(sd_dir, tmp_path, monkeypatch):
    """The README: embeddings are cached under ~/.cache/distill3d, `DISTILL3D_CACHE` moves it."""
    from distill3d.engine.recipe import load_recipe
    from distill3d.engine.trainer import Trainer

    monkeypatch.setenv("DISTILL3D_CACHE", str(tmp_path / "moved"))
    recipe = load_recipe("dreamfusion-sd", [
        f"guidance.0.prior.model={sd_dir}", "prompt=a red chair", "representation.levels=2", "representation.log2_table_size=10",
    ])
    Trainer.create(recipe, tmp_path / "run", quiet=True)
    cached = list((tmp_path / "moved").rglob("*.safetensors"))
    assert cached and all("text_embeddings" in str(p) for p in cached)
