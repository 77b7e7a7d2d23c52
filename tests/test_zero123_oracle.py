"""The oracle Zero123 answers from the exact scene knowing only the camera vector relative to the
input view; the reference-view depth and normal terms."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, RenderOutput, cat_conditions
from distill3d.engine.reference_scene import DEFAULT_SCENE, load_scene
from distill3d.guidance.priors.oracle_zero123 import OracleZero123Config, OracleZero123Prior
from distill3d.guidance.priors.zero123 import camera_embedding
from distill3d.guidance.reference import ReferenceLossConfig, ReferenceViewGuidance


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle123")
    image = np.zeros((64, 64, 4), np.uint8)
    image[16:48, 16:48] = [255, 0, 0, 255]
    iio.imwrite(root / "input.png", image)
    return root / "input.png"


def view(input_image, **kw):
    from distill3d.engine.reference_view import ReferenceViewConfig, load_reference_view

    return load_reference_view(ReferenceViewConfig(image=str(input_image), size=64, **kw), None)


def oracle(input_image, elevation=20.0, azimuth=0.0) -> OracleZero123Prior:
    ctx = BuildContext(scene=DEFAULT_SCENE, reference_view=view(input_image, elevation=elevation, azimuth=azimuth, distance=3.2, fovy=40.0))
    return OracleZero123Prior(OracleZero123Config(noise_std=0.1), ctx)


def test_it_recovers_the_target_cameras_from_the_vector_alone(input_image):
    prior = oracle(input_image, elevation=20.0, azimuth=-35.0)
    cams = make_cameras([-20.0, 50.0, 5.0], [170.0, -60.0, 10.0], [3.0, 3.5, 3.2], [40.0, 40.0, 40.0])
    vectors = camera_embedding(cams.elevation, cams.azimuth, cams.distance, 20.0, -35.0, 3.2)
    recovered = prior.target_cameras(vectors)
    assert torch.allclose(recovered.c2w, cams.c2w, atol=1e-4)


def test_predictions_are_the_exact_render_at_the_described_camera(input_image):
    """At x_t = sqrt(abar) * mu the optimal noise is 0 exactly when mu is the render at the camera the
    vector describes; the unconditional rows answer the grey mean."""
    prior = oracle(input_image)
    cams = make_cameras([30.0, -10.0], [120.0, -90.0], [3.2, 3.4], [40.0, 40.0])
    background = torch.full((2, 24, 24, 3), 0.25)
    render = load_scene(DEFAULT_SCENE).render(cams, 24, 24, background=background)
    out = RenderOutput(rgb=render.rgb, opacity=render.opacity, depth=render.depth, background=background)
    cond, uncond = prior.conditions(cams, out)
    assert set(cond) == {"camera", "weight", "background"}  # no absolute camera goes in
    t = torch.tensor([400, 400])
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = render.rgb.permute(0, 3, 1, 2) * 2 - 1
    eps = prior.predict_noise(abar.sqrt() * x0, t, cond)
    assert eps.abs().max() < 1e-4
    eps_wrong_view = prior.predict_noise(abar.sqrt() * x0.flip(0), t, cond)
    assert eps_wrong_view.abs().max() > 0.05
    gray = torch.zeros_like(x0)  # the grey mean 0.5 -> 0 in [-1, 1]
    assert prior.predict_noise(abar.sqrt() * gray, t, uncond).abs().max() < 1e-6
    both = prior.predict_noise(torch.cat([abar.sqrt() * gray, abar.sqrt() * x0]), torch.cat([t, t]), cat_conditions(uncond, cond))
    assert both.abs().max() < 1e-4


def test_depth_and_normal_terms(input_image):
    view = dict(distance=3.2, fovy=40.0, elevation=10.0, resolution=32)
    cfg = ReferenceLossConfig(**view, rgb_weight=0.0, mask_weight=0.0, depth_weight={"linear": [[0, 0.0], [10, 2.0]]}, normal_weight=1.0)
    guidance = ReferenceViewGuidance(cfg, BuildContext(scene=DEFAULT_SCENE, total_steps=20))
    cams, settings = guidance.views(0)
    assert settings.need_normals
    exact = load_scene(DEFAULT_SCENE).render(cams, 32, 32, background=torch.ones(1, 32, 32, 3))
    alpha = exact.opacity
    depth = torch.where(alpha > 0, exact.depth / alpha.clamp_min(1e-6), exact.depth)
    from distill3d.guidance.depth import normals_from_depth

    normals = normals_from_depth(depth, cams)

    def loss(d, n, step=10):
        return guidance(RenderOutput(rgb=exact.rgb, opacity=alpha, depth=d, background=exact.background, normal=n), cams, step)

    good = loss(depth * 3.0 + 1.0, normals)  # depth is compared up to scale and shift
    assert good["ref_depth"].item() < 1e-4 and good["ref_normal"].item() < 1e-4
    bad = loss(-depth, -normals)
    assert bad["ref_depth"].item() == pytest.approx(4.0, abs=1e-3) and bad["ref_normal"].item() == pytest.approx(2.0, abs=1e-3)
    assert loss(-depth, normals, step=5)["ref_depth"].item() == pytest.approx(2.0, abs=1e-3)  # the ramp: half the weight
    # The normal target faces the camera: the front of a sphere-like blob looks back along -view.
    fg = alpha[0, ..., 0] > 0.5
    from distill3d.engine.cameras import pixel_rays

    _, dirs = pixel_rays(cams, 32, 32)
    assert float((guidance._targets(torch.device("cpu"))["normal"][0][fg] * dirs[0][fg]).sum(-1).max()) <= 1e-6


def test_depth_terms_without_depth_are_refused(input_image):
    with pytest.raises(UserError, match="need a depth map of the input view"):
        ReferenceViewGuidance(ReferenceLossConfig(depth_weight=1.0), BuildContext(reference_view=view(input_image)))
