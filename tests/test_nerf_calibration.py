"""The NeRF surface threshold calibrated on its renders' silhouettes (representations/nerf/calibration.py)."""

import math

import pytest
import torch

from distill3d.engine.cameras import pixel_rays
from distill3d.representations.nerf.calibration import calibration_cameras, max_density_along_rays, silhouette_ious, silhouette_threshold
from distill3d.representations.nerf.rendering import ray_sphere_bounds


def ramp_sphere(points):
    """Density 40 inside r = 0.45, 0 outside r = 0.55, linear between: 20 at r = 0.5."""
    r = points.norm(dim=-1)
    return ((0.55 - r) / 0.1).clamp(0, 1) * 40.0


def sphere_opacity(radius):
    def render(cams, resolution):
        o, d = pixel_rays(cams, resolution, resolution)
        _, _, hit = ray_sphere_bounds(o.reshape(-1, 3), d.reshape(-1, 3), radius)
        return hit.float().reshape(len(cams), resolution, resolution, 1)

    return render


def test_max_density_along_rays_and_ious():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.52, -3.0], [0.0, 2.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3)
    mx = max_density_along_rays(ramp_sphere, o, d, 1.0, samples=400)
    assert mx[0] == pytest.approx(40.0) and mx[1] == pytest.approx(12.0, abs=0.5) and mx[2] == 0
    iou = silhouette_ious(mx, torch.tensor([True, True, False]), torch.tensor([5.0, 20.0, 50.0]))
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5, 0.0]))


@pytest.mark.parametrize("true_radius, level", [(0.5, 20.0), (0.47, 32.0)])
def test_threshold_matches_the_rendered_silhouette(true_radius, level):
    """Renders show a sphere of true_radius; the ramp's density there is `level`: calibration finds it
    from a nominal threshold that is off by a factor 2 either way."""
    for nominal in (level * 2, level / 2):
        thr = silhouette_threshold(ramp_sphere, sphere_opacity(true_radius), nominal, radius=1.0, resolution=48, views=6, samples=256)
        assert abs(math.log2(thr / level)) < 0.25, (nominal, thr)


def test_nothing_rendered_keeps_the_nominal_threshold():
    empty = lambda cams, res: torch.zeros(len(cams), res, res, 1)  # noqa: E731
    assert silhouette_threshold(ramp_sphere, empty, 7.0, resolution=16, views=2) == 7.0
    cams = calibration_cameras(1.0, 12)
    assert len(cams) == 12 and cams.position.norm(dim=-1).allclose(torch.full((12,), 3.2))
