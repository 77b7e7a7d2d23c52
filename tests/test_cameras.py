import math

import pytest
import torch

from distill3d.engine.cameras import CameraSampler, CameraSamplerConfig, make_cameras, orbit_cameras, pixel_rays


def test_front_camera_on_positive_z_looking_at_origin():
    cam = make_cameras(0.0, 0.0, 3.0, 40.0)
    assert torch.allclose(cam.position[0], torch.tensor([0.0, 0.0, 3.0]), atol=1e-6)
    origins, dirs = pixel_rays(cam, 5, 5)
    assert torch.allclose(dirs[0, 2, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)  # centre pixel
    # image row 0 is the top: its rays point up (+y); column 0 is the left (-x)
    assert dirs[0, 0, 2, 1] > 0 and dirs[0, 2, 0, 0] < 0


def test_azimuth_and_elevation_conventions():
    cam = make_cameras([30.0, 0.0], [90.0, 0.0], 2.0, 40.0)
    p = cam.position
    assert p[0, 0] > 0 and p[0, 1] == pytest.approx(2 * math.sin(math.radians(30)), abs=1e-5)
    assert torch.allclose(cam.c2w[:, :3, 1].norm(dim=-1), torch.ones(2))
    # camera -z axis points at the origin
    forward = -cam.c2w[:, :3, 2]
    assert torch.allclose(forward, -torch.nn.functional.normalize(p, dim=-1), atol=1e-6)


def test_focal_matches_fovy():
    cam = make_cameras(0.0, 0.0, 3.0, 90.0)
    _, dirs = pixel_rays(cam, 64, 64)
    # with fovy 90 the image top is at tan = 1; the top pixel centre sits half a pixel below
    top = dirs[0, 0, 32]
    angle = math.degrees(math.atan2(top[1].item(), -top[2].item()))
    assert angle == pytest.approx(math.degrees(math.atan(31.5 / 32)), abs=1e-3)


def test_sampler_ranges_stratification_and_widening():
    cfg = CameraSamplerConfig(elevation=(-10, 45), distance=(3.0, 3.5), fovy=(40, 45), widen_steps=100)
    sampler = CameraSampler(cfg)
    cams = sampler.sample(8, step=1000)
    assert ((cams.elevation >= -10 - 1e-4) & (cams.elevation <= 45 + 1e-4)).all()
    assert ((cams.distance >= 3.0) & (cams.distance <= 3.5)).all()
    slots = ((cams.azimuth + 180) // 45).long().sort().values
    assert slots.tolist() == list(range(8))  # one azimuth per slice of the circle
    early = sampler.sample(8, step=0)
    assert torch.allclose(early.azimuth, torch.zeros(8)) and torch.allclose(early.elevation, torch.zeros(8), atol=1e-5)
    half = sampler.sample(64, step=50)
    assert half.azimuth.abs().max() <= 90 + 1e-4


def test_perturbations_move_the_look_at_point():
    cams = CameraSampler(CameraSamplerConfig(center_perturb=0.2, up_perturb=0.1)).sample(4)
    forward = -cams.c2w[:, :3, 2]
    to_origin = torch.nn.functional.normalize(-cams.position, dim=-1)
    assert (1 - (forward * to_origin).sum(-1)).max() > 1e-4


def test_orbit_cameras_evenly_spaced():
    cams = orbit_cameras(8, elevation=15, distance=3.0)
    assert torch.allclose(torch.diff(cams.azimuth) % 360, torch.full((7,), 45.0))
    assert torch.allclose(cams.elevation, torch.full((8,), 15.0))
