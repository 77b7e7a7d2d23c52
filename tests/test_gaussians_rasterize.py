"""The tiled torch Gaussian rasterizer against a naive dense reference (every pixel against every
Gaussian, autograd through torch.cumprod): forward images and every gradient."""

import math

import pytest
import torch

from distill3d.engine.cameras import orbit_cameras
from distill3d.representations.gaussians.rasterize import (
    ALPHA_MAX,
    ALPHA_MIN,
    RasterSettings,
    covariance_3d,
    project,
    rasterize_gaussians_torch,
)


def dense_reference(means, quats, scales, opacities, features, w2c, s: RasterSettings):
    """Every pixel against every Gaussian, sorted by depth, autograd everywhere."""
    proj = project(means, covariance_3d(scales, quats), opacities, w2c, s)
    keep = proj.radii[:, 0] > 0
    order = torch.argsort(proj.depths.detach().masked_fill(~keep, float("inf")))
    order = order[keep[order]]
    m, con, op, f = proj.means2d[order], proj.conics[order], proj.opacities[order], features[order]
    v, u = torch.meshgrid(torch.arange(s.height) + 0.5, torch.arange(s.width) + 0.5, indexing="ij")
    dx = u.reshape(-1, 1) - m[None, :, 0]
    dy = v.reshape(-1, 1) - m[None, :, 1]
    power = -0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) - con[:, 1] * dx * dy
    raw = op * torch.exp(power)
    alpha = torch.where(raw < ALPHA_MIN, torch.zeros_like(raw), raw.clamp_max(ALPHA_MAX))
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    w = alpha * T
    img = (w @ f).view(s.height, s.width, -1)
    return img, w.sum(1).view(s.height, s.width, 1)


def scene(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.rand(n, 3, generator=g) * 2.5 - 4.5)  # 0.011 .. 0.135
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    features = torch.rand(n, 5, generator=g)
    return [t.requires_grad_() for t in (means, quats, scales, opacities, features)]


@pytest.mark.parametrize("antialiased", [False, True])
def test_tiled_matches_dense_reference_forward_and_backward(antialiased):
    h, w = 37, 45  # not a multiple of the tile size
    cam = orbit_cameras(1, elevation=20.0, distance=2.5, fovy=40.0)
    w2c = torch.linalg.inv(cam.c2w[0])
    focal = float(cam.focal(h)[0])
    # Small chunks and batches so that several chunks, batches and tiles are exercised.
    s = RasterSettings(h, w, focal, antialiased=antialiased, tile_size=8, chunk_elements=64 * 40)
    params = scene()
    img, alpha, info = rasterize_gaussians_torch(*params, w2c, s)
    ref_img, ref_alpha = dense_reference(*params, w2c, s)
    assert info["pairs"] > 0
    assert float(alpha.max()) > 0.5  # the scene covers part of the image
    torch.testing.assert_close(img, ref_img, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, ref_alpha, atol=2e-5, rtol=1e-4)
    g = torch.Generator().manual_seed(1)
    gi, ga = torch.randn(img.shape, generator=g), torch.randn(alpha.shape, generator=g)
    grads = torch.autograd.grad((img * gi).sum() + (alpha * ga).sum(), params)
    ref_grads = torch.autograd.grad((ref_img * gi).sum() + (ref_alpha * ga).sum(), params)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "features"), grads, ref_grads):
        scale = float(b.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(a, b, atol=2e-4 * scale, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_screen_space_mean_gradient_is_retained():
    h = w = 32
    cam = orbit_cameras(1, elevation=0.0, distance=2.5, fovy=40.0)
    s = RasterSettings(h, w, float(cam.focal(h)[0]))
    params = scene(50)
    img, alpha, info = rasterize_gaussians_torch(*params, torch.linalg.inv(cam.c2w[0]), s)
    (img.sum() + alpha.sum()).backward()
    g = info["means2d"].grad
    visible = info["radii"][:, 0] > 0
    assert g is not None and g.shape == (50, 2)
    assert float(g[visible].abs().sum()) > 0
    assert float(g[~visible].abs().sum()) == 0


def test_culling_behind_camera_and_off_screen():
    h = w = 16
    cam = orbit_cameras(1, elevation=0.0, distance=2.0, fovy=40.0)
    s = RasterSettings(h, w, float(cam.focal(h)[0]))
    pos = cam.c2w[0, :3, 3]
    means = torch.stack([torch.zeros(3), pos * 1.5, torch.tensor([5.0, 0.0, 0.0])])  # centre, behind, far off-screen
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    scales = torch.full((3, 3), 0.1)
    img, alpha, info = rasterize_gaussians_torch(means, quats, scales, torch.full((3,), 0.9), torch.eye(3), torch.linalg.inv(cam.c2w[0]), s)
    assert info["radii"][:, 0].tolist()[1:] == [0, 0]
    assert int(info["radii"][0, 0]) > 0
    # only the centre Gaussian's feature (channel 0) shows
    assert float(img[..., 0].max()) > 0.5 and float(img[..., 1:].abs().max()) == 0.0


def test_early_termination_behind_an_opaque_layer():
    """A wall of opaque Gaussians hides what is behind it: the hidden ones get no gradient and the
    image equals the wall alone."""
    h = w = 16
    cam = orbit_cameras(1, elevation=0.0, distance=3.0, fovy=30.0)
    s = RasterSettings(h, w, float(cam.focal(h)[0]), chunk_elements=256 * 32)
    xs = torch.linspace(-1.2, 1.2, 25)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    wall = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((625,), 0.5)], -1)
    hidden = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((625,), -0.5)], -1)
    means = torch.cat([wall, hidden]).requires_grad_()
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(1250, 1)
    scales = torch.full((1250, 3), 0.12)
    opac = torch.full((1250,), 0.8)
    feats = torch.cat([torch.ones(625, 1), torch.zeros(625, 1)])
    img, alpha, _ = rasterize_gaussians_torch(means, quats, scales, opac, feats, torch.linalg.inv(cam.c2w[0]), s)
    img.sum().backward()
    # The wall leaves a transmittance below the 1e-4 cut-off but far above float underflow, so
    # without early termination the hidden layer would get small non-zero gradients.
    assert 1e-7 < float(1 - alpha.max()) and float(1 - alpha.min()) < 1e-4
    assert float(means.grad[625:].abs().max()) == 0.0
    assert float(means.grad[:625].abs().max()) > 0.0
