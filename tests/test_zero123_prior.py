"""The Zero123 prior: the camera vector pinned to this project's cameras, both public folder layouts
loaded component by component (never running the folder's code), conditioning exactly as trained,
and one clear error per bad model."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from distill3d.engine.cameras import make_cameras, spherical_to_position
from distill3d.engine.interfaces import BuildContext, cat_conditions
from distill3d.guidance.priors.loading import InvalidModelFolderError, ModelNotFoundError
from distill3d.guidance.priors.zero123 import Zero123Config, Zero123Prior, camera_embedding, camera_from_embedding
from tests.tiny_zero123 import build_tiny_zero123

LAYOUTS = ["Zero123Pipeline", "Zero1to3StableDiffusionPipeline"]


# ----- the camera vector ------------------------------------------------------------------------


def test_camera_embedding_values():
    v = camera_embedding(30.0, 90.0, 4.0, 0.0, 0.0, 3.8)
    assert v.shape == (4,)
    assert torch.allclose(v, torch.tensor([-math.pi / 6, 1.0, 0.0, 0.2]), atol=1e-6)
    # Relative: only differences matter (reference at elevation 10, azimuth -20, distance 3).
    v = camera_embedding(-5.0, 25.0, 2.5, 10.0, -20.0, 3.0)
    assert torch.allclose(v, torch.tensor([math.radians(15), math.sin(math.radians(45)), math.cos(math.radians(45)), -0.5]), atol=1e-6)
    # Stable Zero123: the 4th entry is the reference's absolute polar angle, 90 - elevation.
    s = camera_embedding(30.0, 90.0, 4.0, 20.0, 0.0, 3.8, variant="stable")
    assert torch.allclose(s, torch.tensor([-math.radians(10), 1.0, 0.0, math.radians(70)]), atol=1e-6)
    batch = camera_embedding(torch.tensor([[0.0, 10.0]]), torch.zeros(1, 2), 3.8, 0.0, 0.0, 3.8)
    assert batch.shape == (1, 2, 4)


def test_positive_azimuth_is_counterclockwise_seen_from_above_and_to_the_reference_cameras_right():
    """Zero123 was trained with azimuth growing counterclockwise about the up axis seen from above
    (threestudio: z up, camera at (cos az, sin az) in x-y). Derived from our camera positions (y up):
    the sign of sin(d_azimuth) must be the sign of (p_ref x p_target) . up, and a positive d_azimuth
    moves the camera toward the reference camera's right (also true in threestudio's frame)."""
    g = torch.Generator().manual_seed(0)
    ref_az = torch.rand(64, generator=g) * 360 - 180
    az = torch.rand(64, generator=g) * 360 - 180
    el = torch.zeros(64)
    p_ref = spherical_to_position(el, ref_az, torch.ones(64))
    p_t = spherical_to_position(el, az, torch.ones(64))
    up = torch.tensor([0.0, 1.0, 0.0])
    ccw = (torch.cross(p_ref, p_t, dim=-1) * up).sum(-1)
    v = camera_embedding(el, az, 1.0, el, ref_az, 1.0)
    keep = ccw.abs() > 1e-3
    assert torch.equal(torch.sign(v[keep, 1]), torch.sign(ccw[keep]))
    # 90 degrees of positive azimuth from the front: the camera goes to the front camera's right.
    front = make_cameras(0.0, 0.0, 3.8, 20.0)
    right = front.c2w[0, :3, 0]
    moved = make_cameras(0.0, 90.0, 3.8, 20.0).position[0] - front.position[0]
    assert float(camera_embedding(0.0, 90.0, 3.8, 0.0, 0.0, 3.8)[1]) == pytest.approx(1.0)
    assert float(moved @ right) > 3.0
    # Seen from above (looking down -y, x to the right), +z is toward the viewer's bottom: azimuth 0
    # (+z, "6 o'clock") -> 90 (+x, "3 o'clock") is a counterclockwise turn.
    assert torch.allclose(spherical_to_position(torch.zeros(1), torch.tensor([90.0]), torch.ones(1)), torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)


def test_camera_from_embedding_inverts_it():
    g = torch.Generator().manual_seed(1)
    el, az, d = torch.rand(20, generator=g) * 80 - 20, torch.rand(20, generator=g) * 360 - 180, 2.5 + torch.rand(20, generator=g)
    v = camera_embedding(el, az, d, 5.0, 30.0, 3.8)
    el2, az2, d2 = camera_from_embedding(v, 5.0, 30.0, 3.8)
    assert torch.allclose(el2, el, atol=1e-4) and torch.allclose(d2, d, atol=1e-5)
    assert torch.allclose(torch.remainder(az2 - az + 180, 360) - 180, torch.zeros(20), atol=1e-3)
    _, _, d3 = camera_from_embedding(camera_embedding(el, az, d, 5.0, 30.0, 3.8, "stable"), 5.0, 30.0, 3.8, "stable")
    assert torch.allclose(d3, torch.full((20,), 3.8))


# ----- loading ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero123")
    folders = {name: build_tiny_zero123(root / name, name) for name in LAYOUTS}
    image = np.zeros((48, 48, 4), np.uint8)
    image[10:38, 14:34] = [220, 60, 40, 255]
    image[20:28, 20:28] = [40, 200, 90, 255]
    import imageio.v3 as iio

    iio.imwrite(root / "input.png", image)
    return root, folders


def input_view(root, **kw):
    from distill3d.engine.reference_view import ReferenceViewConfig, load_reference_view

    return load_reference_view(ReferenceViewConfig(image=str(root / "input.png"), size=64, elevation=10.0, distance=3.8, fovy=20.0, **kw), None)


def make_prior(folder, root, **kw) -> Zero123Prior:
    return Zero123Prior(Zero123Config(model=str(folder), **kw), BuildContext(reference_view=input_view(root)))


def test_both_layouts_load_the_same_weights_and_predict_the_same(tiny):
    root, folders = tiny
    a, b = (make_prior(folders[name], root) for name in LAYOUTS)
    assert a.zlayout.projection_folder == "clip_camera_projection" and b.zlayout.projection_folder == "cc_projection"
    assert torch.equal(a.projection.weight, b.projection.weight)  # same seed: same random weights in both files
    cams = make_cameras([0.0, 30.0], [45.0, -120.0], [3.8, 3.5], [20.0, 20.0])
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([300, 700])
    ca, ua = a.conditions(cams)
    cb, ub = b.conditions(cams)
    ea = a.predict_noise(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(ua, ca))
    eb = b.predict_noise(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(ub, cb))
    assert ea.shape == (4, 4, 16, 16) and torch.allclose(ea, eb, atol=1e-5)
    assert not torch.allclose(ea[:2], ea[2:], atol=1e-3)  # conditional and unconditional rows differ
    assert a.state_dict() == {} or all(not k.startswith(("unet.", "vae.", "projection.")) for k in a.state_dict())


def test_conditioning_is_exactly_as_trained(tiny, monkeypatch):
    """8 UNet input channels = [noisy latent, unscaled VAE posterior mode of the input over white];
    cross-attention = projection(cat[CLIP image embedding, camera vector]); zeros when unconditional."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    root, folders = tiny
    folder = folders["Zero123Pipeline"]
    prior = make_prior(folder, root)
    seen = {}
    real_forward = prior.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kw):
        seen.update(sample=sample.clone(), states=encoder_hidden_states.clone(), t=timestep.clone())
        return real_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(prior.unet, "forward", spy)
    cams = make_cameras([40.0], [90.0], [3.0], [20.0])
    cond, uncond = prior.conditions(cams)
    x = torch.randn(1, 4, 16, 16)
    prior.predict_noise(torch.cat([x, x]), torch.tensor([10, 10]), cat_conditions(cond, uncond))
    # Independent computation from the folder's own components.
    image = prior.reference_view.over_white(32)  # (1, 3, 32, 32): RGB over white at the model's size
    assert torch.allclose(image[0, :, 0, 0], torch.ones(3))  # the background is white
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    latent = vae.encode(image * 2 - 1).latent_dist.mode()  # NOT scaled by 0.18215
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.nn.functional.interpolate(image, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    clip = encoder(pixel_values=(pixels - mean) / std).image_embeds[:, None]
    from safetensors.torch import load_file

    w = load_file(str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    vector = camera_embedding(40.0, 90.0, 3.0, 10.0, 0.0, 3.8)
    states = torch.cat([clip, vector.view(1, 1, 4)], -1) @ w["proj.weight"].T + w["proj.bias"]
    assert seen["sample"].shape == (2, 8, 16, 16)
    assert torch.allclose(seen["sample"][:, :4], torch.cat([x, x]))
    assert torch.allclose(seen["sample"][0, 4:], latent[0], atol=1e-5)
    assert torch.count_nonzero(seen["sample"][1, 4:]) == 0
    assert torch.allclose(seen["states"][0], states[0], atol=1e-5)
    assert torch.count_nonzero(seen["states"][1]) == 0
    # Renders: resized to the model's size, VAE sample x 0.18215 (like Stable Diffusion).
    assert prior.scaling_factor == pytest.approx(0.18215)


def test_code_in_the_folder_is_never_run(tiny, tmp_path):
    root, folders = tiny
    folder = shutil.copytree(folders["Zero123Pipeline"], tmp_path / "z")
    marker = tmp_path / "ran.txt"
    (folder / "clip_camera_projection" / "zero123.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "pipeline_zero1to3.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    make_prior(folder, root)
    assert not marker.exists()


def test_missing_component_is_named(tiny, tmp_path):
    root, folders = tiny
    for name, part in (("Zero123Pipeline", "clip_camera_projection"), ("Zero1to3StableDiffusionPipeline", "image_encoder")):
        folder = shutil.copytree(folders[name], tmp_path / name)
        shutil.rmtree(folder / part)
        with pytest.raises(InvalidModelFolderError, match=f"missing {part}/"):
            make_prior(folder, root)


def test_unknown_pipeline_and_missing_index(tiny, tmp_path):
    root, folders = tiny
    folder = shutil.copytree(folders["Zero123Pipeline"], tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(InvalidModelFolderError, match="'StableDiffusionPipeline', which is not a Zero123 model.*Zero123Pipeline"):
        make_prior(folder, root)
    (folder / "model_index.json").unlink()
    with pytest.raises(InvalidModelFolderError, match="missing model_index.json"):
        make_prior(folder, root)


def test_projection_with_wrong_weights_is_a_clear_error(tiny, tmp_path):
    from safetensors.torch import save_file

    root, folders = tiny
    folder = shutil.copytree(folders["Zero123Pipeline"], tmp_path / "bad")
    save_file({"other.weight": torch.zeros(32, 36)}, str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InvalidModelFolderError, match=r"proj.weight \(D, D \+ 4\)"):
        make_prior(folder, root)


def test_without_an_input_image_the_prior_says_how_to_give_one(tiny):
    from distill3d.engine.errors import UserError

    _, folders = tiny
    with pytest.raises(UserError, match="--image FILE"):
        Zero123Prior(Zero123Config(model=str(folders["Zero123Pipeline"])), BuildContext())


def test_offline_hub_id_names_the_model_and_how_to_get_it(tiny, monkeypatch, tmp_path):
    root, _ = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        make_prior("bennyguo/zero123-xl-diffusers", root)
    text = str(err.value)
    assert "bennyguo/zero123-xl-diffusers" in text and "huggingface-cli download bennyguo/zero123-xl-diffusers" in text
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        make_prior(str(tmp_path / "no" / "such" / "folder"), root)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_cuda_matches_the_fp32_cpu_reference(tiny):
    root, folders = tiny
    folder = folders["Zero123Pipeline"]
    view = input_view(root)
    cpu = Zero123Prior(Zero123Config(model=str(folder)), BuildContext(reference_view=view))
    gpu = Zero123Prior(Zero123Config(model=str(folder)), BuildContext(device=torch.device("cuda"), half_precision=True, reference_view=view))
    assert gpu.dtype == torch.float16
    cams = make_cameras([0.0, 30.0], [45.0, -120.0], [3.8, 3.5], [20.0, 20.0])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([300, 700])
    c, u = cpu.conditions(cams)
    ref = cpu.predict_noise(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(u, c))
    c, u = gpu.conditions(cams.to("cuda"))
    out = gpu.predict_noise(torch.cat([x, x]).cuda(), torch.cat([t, t]).cuda(), cat_conditions(u, c)).cpu()
    assert (out - ref).abs().max() < 2e-2 * ref.abs().max()
