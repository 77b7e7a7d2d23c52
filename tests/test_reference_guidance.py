"""Reference-view losses: exact targets from a scene or an RGBA image, clear errors otherwise."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.engine.reference_scene import DEFAULT_SCENE, load_scene
from distill3d.guidance.reference import ReferenceViewConfig, ReferenceViewGuidance


def test_scene_reference_gives_zero_loss_for_the_exact_render():
    cfg = ReferenceViewConfig(resolution=24, rgb_weight=1.0, mask_weight=1.0)
    guidance = ReferenceViewGuidance(cfg, BuildContext(scene=DEFAULT_SCENE))
    cams, settings = guidance.views(0)
    background = torch.full((1, 24, 24, 3), 0.3)
    exact = load_scene(DEFAULT_SCENE).render(cams, 24, 24, background=background)
    terms = guidance(exact, cams, 0)
    assert terms["ref_rgb"].item() < 1e-10 and terms["ref_mask"].item() < 1e-9  # opacity is clamped to [1e-5, 1 - 1e-5]
    blank = exact.__class__(rgb=background.clone(), opacity=torch.zeros(1, 24, 24, 1), depth=exact.depth, background=background)
    terms = guidance(blank, cams, 0)
    assert terms["ref_rgb"].item() > 1e-3 and terms["ref_mask"].item() == pytest.approx(exact.opacity.mean().item(), rel=1e-3)


def test_rgba_image_reference_and_every(tmp_path):
    image = np.zeros((32, 32, 4), dtype=np.uint8)
    image[8:24, 8:24] = [255, 0, 0, 255]
    path = tmp_path / "ref.png"
    iio.imwrite(path, image)
    cfg = ReferenceViewConfig(image=str(path), resolution=16, every=3, rgb_weight=1.0, mask_weight=1.0)
    guidance = ReferenceViewGuidance(cfg, BuildContext())
    assert [guidance.active(s) for s in range(4)] == [True, False, False, True]
    cams, _ = guidance.views(0)
    background = torch.ones(1, 16, 16, 3)
    rgb = background.clone()
    rgb[:, 4:12, 4:12] = torch.tensor([1.0, 0.0, 0.0])
    opacity = torch.zeros(1, 16, 16, 1)
    opacity[:, 4:12, 4:12] = 1
    from distill3d.engine.interfaces import RenderOutput

    terms = guidance(RenderOutput(rgb=rgb, opacity=opacity, depth=opacity, background=background), cams, 0)
    # The matching render scores near 0 (the antialiased 32 -> 16 resize only softens the edge);
    # no dark fringe from the transparent black pixels (premultiplied resize): edge colours stay red.
    assert terms["ref_rgb"].item() < 0.01 and terms["ref_mask"].item() < 0.01
    target_rgb, target_alpha = guidance._target
    edge = target_alpha[0, :, :, 0] > 0.1
    assert torch.allclose(target_rgb[0][edge], torch.tensor([1.0, 0.0, 0.0]).expand_as(target_rgb[0][edge]), atol=1e-4)
    wrong = guidance(RenderOutput(rgb=background, opacity=torch.zeros_like(opacity), depth=opacity, background=background), cams, 0)
    assert wrong["ref_rgb"].item() > 0.1 and wrong["ref_mask"].item() > 0.2


def test_rgb_image_without_alpha_is_a_clear_error(tmp_path):
    path = tmp_path / "photo.png"
    iio.imwrite(path, np.zeros((8, 8, 3), dtype=np.uint8))
    guidance = ReferenceViewGuidance(ReferenceViewConfig(image=str(path), resolution=8), BuildContext())
    cams, _ = guidance.views(0)
    from distill3d.engine.interfaces import RenderOutput

    blank = RenderOutput(rgb=torch.ones(1, 8, 8, 3), opacity=torch.zeros(1, 8, 8, 1), depth=torch.zeros(1, 8, 8, 1), background=torch.ones(1, 8, 8, 3))
    with pytest.raises(UserError, match="no alpha channel"):
        guidance(blank, cams, 0)


def test_missing_reference_is_a_clear_error():
    with pytest.raises(UserError, match="needs an image"):
        ReferenceViewGuidance(ReferenceViewConfig(), BuildContext())
