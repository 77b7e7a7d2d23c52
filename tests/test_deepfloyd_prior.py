"""The DeepFloyd IF stage-I prior on a tiny random-weight IF (T5 + pixel UNet) built in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.interfaces import BuildContext, RenderOutput
from distill3d.guidance.priors.deepfloyd import DeepFloydIFConfig, DeepFloydIFPrior
from distill3d.guidance.priors.loading import EmptyPromptError, GatedModelError, ModelNotFoundError
from tiny_models import build_tiny_if


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory) -> Path:
    return build_tiny_if(tmp_path_factory.mktemp("tiny-if") / "model")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def ctx_for(cache_dir, prompt="A photo of a Hamburger", negative="", **kw):
    return BuildContext(prompt=prompt, negative_prompt=negative, cache_dir=cache_dir, **kw)


@pytest.fixture(scope="module")
def prior(if_dir, cache_dir):
    return DeepFloydIFPrior(DeepFloydIFConfig(model=str(if_dir)), ctx_for(cache_dir))


def cameras(azimuth, elevation=None):
    n = len(azimuth)
    el = torch.zeros(n) if elevation is None else torch.tensor(elevation, dtype=torch.float32)
    return make_cameras(el, torch.tensor(azimuth, dtype=torch.float32), torch.full((n,), 3.2), torch.full((n,), 40.0))


def test_loads_pixel_space_prior(prior):
    assert prior.image_size == 16 and prior.image_channels == 3 and prior.prediction_type == "epsilon"
    assert prior.alphas_cumprod.shape == (1000,)
    assert prior.alphas_cumprod[-1] < 1e-3  # squaredcos_cap_v2 ends near zero
    assert not hasattr(prior, "vae")


def test_registered_entry_point(if_dir, cache_dir):
    from distill3d.plugins.registry import build_plugin

    p = build_plugin("prior", {"name": "deepfloyd-if", "model": str(if_dir)}, ctx_for(cache_dir), "guidance.0.prior")
    assert isinstance(p, DeepFloydIFPrior)


def test_encode_images_maps_to_minus_one_one_at_model_size(prior):
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    x = prior.encode_images(rgb)
    assert x.shape == (2, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    ref = torch.nn.functional.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(x, ref)
    x.sum().backward()
    assert rgb.grad.abs().sum() > 0
    ones = prior.encode_images(torch.ones(1, 3, 16, 16))
    assert torch.equal(ones, torch.ones(1, 3, 16, 16))


def test_predict_noise_takes_the_first_three_of_six_channels(prior):
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([50, 800])
    cond, _ = prior.conditions(cameras([0.0, 180.0]), None)
    eps = prior.predict_noise(x, t, cond)
    with torch.no_grad():
        full = prior.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert full.shape[1] == 6 and eps.shape == (2, 3, 16, 16)
    assert torch.allclose(eps, full[:, :3], atol=1e-5)


def test_t5_embeddings_lowercased_with_attention_mask(prior, if_dir):
    from transformers import T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(if_dir / "tokenizer")
    enc = T5EncoderModel.from_pretrained(if_dir / "text_encoder").eval()
    text = "a photo of a hamburger, side view"  # the prompt was "A photo of a Hamburger"
    ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
    c, u = prior.conditions(cameras([90.0]), None)
    assert c["encoder_hidden_states"].shape == (1, 77, 32)
    assert torch.allclose(c["encoder_hidden_states"], ref, atol=1e-5)
    # Empty negative prompt: the embedding of "" (as IFPipeline's unconditional branch).
    ids = tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_u = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
    assert torch.allclose(u["encoder_hidden_states"], ref_u, atol=1e-5)


def test_same_cache_for_differently_cased_prompt(if_dir, cache_dir, prior):
    p = DeepFloydIFPrior(DeepFloydIFConfig(model=str(if_dir)), ctx_for(cache_dir, prompt="a photo of a hamburger"))
    assert p.embedding_cache.stats.encoder_loads == 0 and p.embedding_cache.stats.misses == 0


def _pixels(rgb):
    """IF stage I's encoder, written out: resize to the model's 16 px and map to [-1, 1]."""
    return torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), (16, 16), mode="bilinear", align_corners=False) * 2 - 1


def _render(b=2, size=32):
    rgb = torch.rand(b, size, size, 3, requires_grad=True)
    return rgb, RenderOutput(rgb=rgb, opacity=torch.ones(b, size, size, 1), depth=torch.ones(b, size, size, 1), background=torch.zeros(b, size, size, 3))


def _eps(prior, x_t, t, condition):
    with torch.no_grad():
        return prior.unet(x_t, t, encoder_hidden_states=condition["encoder_hidden_states"]).sample[:, :3]


def test_sds_step_with_if_is_weighted_residual_through_the_pixel_encoder(if_dir, cache_dir, monkeypatch):
    from distill3d.guidance.sds import SDSConfig, SDSGuidance

    from sds_reference import NoiseRecorder, cfg, noised, render_gradient

    scale = 20.0
    g = SDSGuidance(SDSConfig(prior={"name": "deepfloyd-if", "model": str(if_dir)}, guidance_scale=scale), ctx_for(cache_dir, total_steps=100))
    recorder = NoiseRecorder(g.prior, monkeypatch)
    rgb, out = _render()
    cams = cameras([30.0, -150.0])
    torch.manual_seed(3)
    g(out, cams, 3)["sds"].backward()
    rec = recorder.last
    torch.testing.assert_close(rec["x"], _pixels(rgb.detach()))
    x_t = noised(g.prior, rec["x"], rec["noise"], rec["t"])
    cond, uncond = g.prior.conditions(cams, None)
    eps_hat = cfg(_eps(g.prior, x_t, rec["t"], uncond), _eps(g.prior, x_t, rec["t"], cond), scale)
    abar = g.prior.alphas_cumprod[rec["t"]].view(-1, 1, 1, 1)
    expected = render_gradient(_pixels, rgb, (1 - abar) * (eps_hat - rec["noise"]), 1.0)
    assert expected.abs().max() > 0
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_perp_neg_sds_step_with_if_matches_the_hand_written_plan(if_dir, cache_dir, monkeypatch):
    from distill3d.guidance.perp_neg import PerpNegSDSConfig, PerpNegSDSGuidance

    from sds_reference import NoiseRecorder, mixed, noised, perp, perp_neg_rows_stable_dreamfusion, render_gradient, rows

    scale, azimuths = 20.0, [-60.0, 100.0]
    g = PerpNegSDSGuidance(PerpNegSDSConfig(prior={"name": "deepfloyd-if", "model": str(if_dir)}, guidance_scale=scale), ctx_for(cache_dir, total_steps=100))
    recorder = NoiseRecorder(g.prior, monkeypatch)
    rgb, out = _render()
    cams = cameras(azimuths)
    torch.manual_seed(4)
    g(out, cams, 3)["sds"].backward()
    rec = recorder.last
    t, noise = rec["t"], rec["noise"]
    x_t = noised(g.prior, rec["x"], noise, t)
    views = g.prior.view_conditions(cams)
    plan = [perp_neg_rows_stable_dreamfusion(a) for a in azimuths]
    eps_u = _eps(g.prior, x_t, t, views.uncond)
    d_pos = _eps(g.prior, x_t, t, mixed(views.directional, [p[0] for p in plan])) - eps_u
    eps_hat = eps_u + scale * d_pos
    for k in range(2):
        d_k = _eps(g.prior, x_t, t, rows(views.directional, [p[1][k] for p in plan])) - eps_u
        eps_hat = eps_hat + scale * torch.tensor([p[2][k] for p in plan]).view(-1, 1, 1, 1) * perp(d_k, d_pos)
    abar = g.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = render_gradient(_pixels, rgb, (1 - abar) * (eps_hat - noise), 1.0)
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_empty_prompt(if_dir, cache_dir):
    with pytest.raises(EmptyPromptError):
        DeepFloydIFPrior(DeepFloydIFConfig(model=str(if_dir)), ctx_for(cache_dir, prompt=" "))


def test_not_cached_message_mentions_the_gate(cache_dir):
    with pytest.raises(ModelNotFoundError) as info:
        DeepFloydIFPrior(DeepFloydIFConfig(), ctx_for(cache_dir))
    msg = str(info.value)
    assert "DeepFloyd/IF-I-XL-v1.0" in msg and "not in the local" in msg and "gated" in msg
    assert "huggingface-cli download DeepFloyd/IF-I-XL-v1.0 --local-dir DIR" in msg and "--model DIR" in msg


def test_gated_repo_error_from_the_hub(cache_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        OSError.__init__(err, "401 Client Error. Access to model DeepFloyd/IF-I-XL-v1.0 is restricted.")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(GatedModelError) as info:
        DeepFloydIFPrior(DeepFloydIFConfig(), ctx_for(cache_dir))
    msg = str(info.value)
    assert "gated" in msg and "https://huggingface.co/DeepFloyd/IF-I-XL-v1.0" in msg and "huggingface-cli login" in msg


def test_no_network_online_is_reported_as_not_cached(cache_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    class ConnectError(OSError):
        pass

    def no_network(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub") from ConnectError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ModelNotFoundError, match="no connection to the hub"):
        DeepFloydIFPrior(DeepFloydIFConfig(model="someone/if-model"), ctx_for(cache_dir))
