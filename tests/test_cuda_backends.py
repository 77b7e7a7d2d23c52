"""Every accelerated NeRF backend against the torch reference on CUDA (skipped without a GPU).

Run on a GPU machine with `pytest -m cuda tests/test_cuda_backends.py`. Inputs are real-sized
where that matters (the 16 x 2, 2^19 hash grid; thousands of rays). Tolerances (float32):
values rtol 1e-5 / atol 1e-5, gradients rtol 1e-4 / atol 1e-4 relative to the gradient's scale
(atomic adds change the summation order), marching bit-identical. tiny-cuda-nn's grid is a
different function, so its wrapper is checked for what it must get right (linearity in the table
against its backward, batch padding); nerfacc's compositing must equal torch's, its marcher is a different sampler and
is checked for validity only.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from distill3d.engine.backends import choose, resolve_op
from distill3d.representations.nerf.hash_encoding import HashEncodingConfig, hash_encode_torch
from distill3d.representations.nerf.rendering import Samples, composite_torch, march_torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
FULL = HashEncodingConfig()  # 16 levels x 2 features, table 2^19, resolutions 16 .. 2048
SMALL = HashEncodingConfig(levels=4, features=2, log2_table_size=10, base_resolution=4, per_level_scale=2.0)


# The optional package behind each accelerated backend. Only its absence may skip a test: on a CUDA
# machine where the package imports, any failure to choose or run the backend is a failure.
PACKAGES = {"triton": "triton", "nerfacc": "nerfacc", "tcnn": "tinycudann"}


def _needs(op: str, name: str):
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (optional backend {name!r})")
    assert choose(op, name, CUDA) == name
    return resolve_op(op, name, CUDA)


def _scaled_close(a, b, rtol=1e-4, atol=1e-4):
    scale = b.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=atol)


def test_auto_prefers_triton_on_cuda():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: kernels would run through the interpreter")
    for op in ("hash_encoding", "composite", "march"):
        assert choose(op, "auto", CUDA) == "triton"


# ----- hash encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SMALL, FULL], ids=["small", "16x2-2^19"])
def test_triton_hash_encoding_matches_torch(config):
    encode = _needs("hash_encoding", "triton")
    g = torch.Generator(device=CUDA).manual_seed(0)
    n = 1 << 16
    x = torch.rand(n, 3, device=CUDA, generator=g)
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 0.125], [-0.1, 1.1, 0.5]], device=CUDA)
    table = torch.randn((1 << config.log2_table_size) * config.levels, config.features, device=CUDA, generator=g) * 0.1
    grad_out = torch.randn(n, config.levels * config.features, device=CUDA, generator=g)

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    t1, t2 = table.clone().requires_grad_(), table.clone().requires_grad_()
    out1, out2 = encode(x1, t1, config), hash_encode_torch(x2, t2, config)
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    gx1, gt1 = torch.autograd.grad(out1, (x1, t1), grad_out)
    gx2, gt2 = torch.autograd.grad(out2, (x2, t2), grad_out)
    _scaled_close(gt1, gt2)
    _scaled_close(gx1, gx2)
    # Table-only backward (x without grad) takes the kernel's other path.
    t3 = table.clone().requires_grad_()
    (gt3,) = torch.autograd.grad(encode(x, t3, config), t3, grad_out)
    _scaled_close(gt3, gt2)


def test_tcnn_hash_encoding_is_linear_in_its_table_with_a_matching_backward():
    """tiny-cuda-nn's grid is another function than ours, so it cannot be compared with the torch
    reference; what the wrapper must get right can be checked without it. The encoding is linear
    in the table, so out(T + V) - out(T) = J V exactly, and the table gradient of <G, out> is J^T G:
    <G, out(T + V) - out(T)> must equal <grad, V> (a wrong loss scale or parameter slice breaks
    it). Rows are independent of the batch padding the wrapper adds."""
    encode = _needs("hash_encoding", "tcnn")
    config = FULL
    g = torch.Generator(device=CUDA).manual_seed(0)
    size = (1 << config.log2_table_size) * config.levels
    table = (torch.rand(size, config.features, device=CUDA, generator=g) * 2 - 1) * 1e-2
    v = (torch.rand(size, config.features, device=CUDA, generator=g) * 2 - 1) * 1e-2
    x = torch.rand(1000, 3, device=CUDA, generator=g)  # not a multiple of the batch granularity
    upstream = torch.randn(1000, config.levels * config.features, device=CUDA, generator=g)
    t = table.clone().requires_grad_()
    out = encode(x, t, config)
    assert out.shape == (1000, config.levels * config.features) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad((out * upstream).sum(), t)
    with torch.no_grad():
        change = ((encode(x, table + v, config) - out) * upstream).sum()
    predicted = (grad * v).sum()
    assert predicted.abs() > 0
    torch.testing.assert_close(change, predicted, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(encode(x[:37], table, config), out.detach()[:37], rtol=1e-6, atol=1e-7)
    # Different points give different features (the table is really read).
    assert (out[0] - out[1]).abs().max() > 0


# ----- compositing -----------------------------------------------------------------------------


def _packed(n_rays=4096, max_samples=96, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    counts = torch.randint(0, max_samples + 1, (n_rays,), device=CUDA, generator=g)
    idx = torch.repeat_interleave(torch.arange(n_rays, device=CUDA), counts)
    s = idx.numel()
    samples = Samples(idx, torch.rand(s, device=CUDA, generator=g) * 4, 0.01 + 0.05 * torch.rand(s, device=CUDA, generator=g), n_rays)
    sigmas = torch.rand(s, device=CUDA, generator=g) * 20
    rgbs = torch.rand(s, 3, device=CUDA, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(s, 3, device=CUDA, generator=g), dim=-1)
    return samples, sigmas, rgbs, normals


FIELDS = ("weights", "rgb", "opacity", "depth", "normal")


@pytest.mark.parametrize("name", ["triton", "nerfacc"])
def test_composite_backends_match_torch(name):
    composite = _needs("composite", name)
    samples, sigmas, rgbs, normals = _packed()
    leaves_a = [t.clone().requires_grad_() for t in (sigmas, rgbs, normals)]
    leaves_b = [t.clone().requires_grad_() for t in (sigmas, rgbs, normals)]
    out_a = composite(*leaves_a[:2], samples, leaves_a[2])
    out_b = composite_torch(*leaves_b[:2], samples, leaves_b[2])
    g = torch.Generator(device=CUDA).manual_seed(1)
    upstream = {f: torch.randn(getattr(out_b, f).shape, device=CUDA, generator=g) for f in FIELDS}
    for f in FIELDS:
        torch.testing.assert_close(getattr(out_a, f), getattr(out_b, f), rtol=1e-5, atol=1e-5)
    grads_a = torch.autograd.grad(sum((getattr(out_a, f) * upstream[f]).sum() for f in FIELDS), leaves_a)
    grads_b = torch.autograd.grad(sum((getattr(out_b, f) * upstream[f]).sum() for f in FIELDS), leaves_b)
    for a, b in zip(grads_a, grads_b):
        _scaled_close(a, b)


# ----- marching --------------------------------------------------------------------------------


def _scene(n_rays=8192, resolution=64, fraction=0.3):
    from distill3d.representations.nerf.occupancy import OccupancyConfig, OccupancyGrid
    from distill3d.representations.nerf.rendering import ray_sphere_bounds

    g = torch.Generator(device=CUDA).manual_seed(2)
    origins = torch.nn.functional.normalize(torch.randn(n_rays, 3, device=CUDA, generator=g), dim=-1) * 3
    target = (torch.rand(n_rays, 3, device=CUDA, generator=g) * 2 - 1) * 0.7
    dirs = torch.nn.functional.normalize(target - origins, dim=-1)
    near, far, _ = ray_sphere_bounds(origins, dirs, 1.0)
    grid = OccupancyGrid(OccupancyConfig(resolution=resolution), radius=1.0).to(CUDA)
    grid.occupied.copy_(torch.rand(resolution, resolution, resolution, device=CUDA, generator=g) < fraction)
    return origins, dirs, near, far, grid


@pytest.mark.parametrize("jitter", [False, True])
@pytest.mark.parametrize("with_grid", [False, True])
def test_triton_march_is_bit_identical(with_grid, jitter):
    march = _needs("march", "triton")
    origins, dirs, near, far, grid = _scene()
    occupied = grid if with_grid else None
    torch.manual_seed(3)
    a = march(origins, dirs, near, far, 128, occupied, jitter)
    torch.manual_seed(3)
    b = march_torch(origins, dirs, near, far, 128, occupied, jitter)
    assert a.ray_indices.shape == b.ray_indices.shape, f"{a.ray_indices.numel()} vs {b.ray_indices.numel()} samples"
    assert torch.equal(a.ray_indices, b.ray_indices)
    assert torch.equal(a.t_mid, b.t_mid), f"{(a.t_mid != b.t_mid).sum()} t values differ"
    assert torch.equal(a.deltas, b.deltas)


def test_nerfacc_march_gives_valid_samples():
    march = _needs("march", "nerfacc")
    origins, dirs, near, far, grid = _scene()
    s = march(origins, dirs, near, far, 128, grid, True)
    assert s.ray_indices.numel() > 0
    assert torch.all(s.ray_indices[1:] >= s.ray_indices[:-1])
    assert torch.all(s.deltas > 0)
    idx = s.ray_indices
    assert torch.all(s.t_mid >= near[idx] - 1e-4) and torch.all(s.t_mid <= far[idx] + 1e-4)
    points = origins[idx] + dirs[idx] * s.t_mid[:, None]
    assert grid(points).float().mean() > 0.99  # samples lie in occupied cells
