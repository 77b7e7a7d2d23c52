"""The pure-torch hash encoding against a deliberately naive reference.

The reference loops over levels, points and the 8 corners with the hash in Python integers, so
it states the index semantics of the module docstring directly: pos = clamp(x, 0, 1) * res in
x's dtype, cell = min(floor(pos), res - 1), corner k at offsets (k & 1, k >> 1 & 1, k >> 2 & 1),
dense rows x + y (res+1) + z (res+1)^2 when (res+1)^3 fits the table, else the Instant-NGP hash
(x * 1 ^ y * 2654435761 ^ z * 805459861) mod 2^32 mod table_size.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from distill3d.representations.nerf import hash_encoding as he
from distill3d.representations.nerf.hash_encoding import (
    HashEncoding,
    HashEncodingConfig,
    corner_indices,
    hash_encode_torch,
    level_resolutions,
)

# res 2, 4, 8, 16 with a 256-row table: two dense levels (27, 125 rows), two hashed (729, 4913).
SMALL = HashEncodingConfig(levels=4, features=2, log2_table_size=8, base_resolution=2, per_level_scale=2.0)
# One feature (no complex pairing); res 3, 4, 6 with 64 rows: (3+1)^3 = 64 is dense, exactly at the limit.
ODD = HashEncodingConfig(levels=3, features=1, log2_table_size=6, base_resolution=3, per_level_scale=1.5)
# Four features (two complex pairs); res 5 dense, 15 hashed.
FOUR = HashEncodingConfig(levels=2, features=4, log2_table_size=9, base_resolution=5, per_level_scale=3.0)
CONFIGS = {"small": SMALL, "odd": ODD, "four": FOUR}


def naive_encode(x: torch.Tensor, table: torch.Tensor, config: HashEncodingConfig, grad_out=None):
    """out (N, L*F) and the rows (L, N, 8); given grad_out also grad_table ({row: gradient}) and
    grad_x. float64 numpy arithmetic except pos, computed in x's dtype as the module specifies."""
    T, F, L = 1 << config.log2_table_size, config.features, config.levels
    xs = x.detach().cpu().numpy()
    scalar = xs.dtype.type
    tab = table.detach().cpu().numpy()
    n = xs.shape[0]
    out = np.zeros((n, L * F))
    g = None if grad_out is None else grad_out.detach().double().cpu().numpy()
    grad_table = {}
    grad_x = np.zeros((n, 3))
    rows = np.zeros((L, n, 8), dtype=np.int64)
    for level in range(L):
        res = int(math.floor(config.base_resolution * config.per_level_scale**level))
        dense = (res + 1) ** 3 <= T
        for i in range(n):
            xi = [scalar(xs[i, a]) for a in range(3)]
            inside = [1.0 if 0 <= v <= 1 else 0.0 for v in xi]
            pos = [min(max(v, scalar(0)), scalar(1)) * scalar(res) for v in xi]  # in x's dtype
            cell = [min(int(math.floor(p)), res - 1) for p in pos]
            frac = [float(p) - c for p, c in zip(pos, cell)]
            for k in range(8):
                off = (k & 1, (k >> 1) & 1, (k >> 2) & 1)
                c = [cell[a] + off[a] for a in range(3)]
                if dense:
                    row = c[0] + c[1] * (res + 1) + c[2] * (res + 1) ** 2
                else:
                    row = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) % 2**32 % T
                rows[level, i, k] = level * T + row
                per_axis = [frac[a] if off[a] else 1.0 - frac[a] for a in range(3)]
                w = per_axis[0] * per_axis[1] * per_axis[2]
                value = tab[level * T + row].astype(np.float64)
                out[i, level * F : (level + 1) * F] += w * value
                if g is not None:
                    gl = g[i, level * F : (level + 1) * F]
                    grad_table[level * T + row] = grad_table.get(level * T + row, 0.0) + w * gl
                    for a in range(3):
                        others = [per_axis[b] for b in range(3) if b != a]
                        dw = (1.0 if off[a] else -1.0) * res * others[0] * others[1] * inside[a]
                        grad_x[i, a] += dw * float(gl @ value)
    out_t = torch.from_numpy(out)
    if g is None:
        return out_t, rows
    return out_t, rows, grad_table, torch.from_numpy(grad_x)


def dense(grad_table: dict, table: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(table.shape, dtype=torch.float64)
    for row, value in grad_table.items():
        out[row] = torch.from_numpy(value)
    return out


def special_points(config: HashEncodingConfig, dtype=torch.float32) -> torch.Tensor:
    """Random points plus corners of the cube, cell boundaries of every level, and points outside."""
    pts = [torch.rand(24, 3, dtype=torch.float64)]
    pts.append(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [1.0, 0.0, 1.0]], dtype=torch.float64))
    for res in level_resolutions(config):
        k = torch.randint(0, res + 1, (4, 3)).double()
        pts.append(k / res)  # exactly on cell boundaries (corners at multiples of 1/res)
    pts.append(torch.tensor([[-0.2, 0.5, 1.3], [1.5, -1.0, 0.25]], dtype=torch.float64))
    return torch.cat(pts).to(dtype)


@pytest.fixture(autouse=True)
def _threads_even_for_small_inputs(monkeypatch):
    # The worker-thread path is normally skipped below MIN_PARALLEL_POINTS points.
    monkeypatch.setattr(he, "MIN_PARALLEL_POINTS", 0)


@pytest.fixture(params=["default", "real-columns", "serial", "chunked"])
def impl(request, monkeypatch):
    """Each internal code path: complex-paired 1-D gathers (CPU default), real columns (the path
    other devices take), levels run inline instead of on worker threads, and point chunking."""
    if request.param == "real-columns":
        monkeypatch.setattr(he, "_USE_COMPLEX", False)
    elif request.param == "serial":
        monkeypatch.setattr(he, "PARALLEL_LEVELS", False)
    elif request.param == "chunked":
        monkeypatch.setattr(he, "CHUNK", 7)
    return request.param


def test_configs_exercise_dense_and_hashed_levels():
    for config in CONFIGS.values():
        dense = [d for _, d in he._plan(config)]
        assert any(dense) and not all(dense)
    assert [d for _, d in he._plan(ODD)] == [True, False, False]
    assert level_resolutions(ODD) == [3, 4, 6]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_naive(name, dtype, impl):
    config = CONFIGS[name]
    T = 1 << config.log2_table_size
    x = special_points(config, dtype).requires_grad_()
    table = torch.randn(config.levels * T, config.features, dtype=dtype, requires_grad=True)
    out = hash_encode_torch(x, table, config)
    assert out.shape == (x.shape[0], config.levels * config.features) and out.dtype == dtype
    grad_out = torch.randn_like(out)
    ref, _, ref_gtable, ref_gx = naive_encode(x, table, config, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    gx, gtable = torch.autograd.grad(out, (x, table), grad_out)
    torch.testing.assert_close(gtable.double(), dense(ref_gtable, table), atol=tol * 10, rtol=tol)
    torch.testing.assert_close(gx.double(), ref_gx, atol=tol * 100, rtol=tol * 10)
    assert torch.all(gx[-2:][(x[-2:] < 0) | (x[-2:] > 1)] == 0)  # clamped coordinates


def test_default_config_matches_naive():
    config = HashEncodingConfig()
    T = 1 << config.log2_table_size
    x = special_points(config)[::3]
    table = torch.randn(config.levels * T, config.features)
    grad_out = torch.randn(x.shape[0], config.levels * config.features)
    ref, rows, ref_gtable, ref_gx = naive_encode(x, table, config, grad_out)
    xg = x.clone().requires_grad_()
    tg = table.clone().requires_grad_()
    out = hash_encode_torch(xg, tg, config)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.backward(grad_out)
    touched = torch.tensor(sorted(ref_gtable))
    expected = torch.from_numpy(np.stack([ref_gtable[row] for row in touched.tolist()]))
    torch.testing.assert_close(tg.grad.double()[touched], expected, atol=1e-5, rtol=1e-5)
    assert tg.grad.abs().sum(1).count_nonzero() <= len(touched)  # nothing written elsewhere
    torch.testing.assert_close(xg.grad.double(), ref_gx, atol=1e-3, rtol=1e-4)
    idx, w = corner_indices(x, config)
    assert idx.shape == (config.levels, x.shape[0], 8) and idx.dtype == torch.int64
    assert torch.equal(idx, torch.from_numpy(rows))
    assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_corner_indices_match_naive_rows(name):
    config = CONFIGS[name]
    x = special_points(config)
    table = torch.zeros((1 << config.log2_table_size) * config.levels, config.features)
    _, rows = naive_encode(x, table, config)
    idx, w = corner_indices(x, config)
    assert torch.equal(idx, torch.from_numpy(rows))
    assert w.shape == idx.shape and torch.allclose(w.sum(-1), torch.ones(()))


def test_output_is_level_major(impl):
    config = SMALL
    T = 1 << config.log2_table_size
    table = torch.empty(config.levels * T, config.features)
    for level in range(config.levels):
        for f in range(config.features):
            table[level * T : (level + 1) * T, f] = 10 * level + f  # constant per level and feature
    x = special_points(config)
    out = hash_encode_torch(x, table, config)
    expected = torch.tensor([10.0 * level + f for level in range(config.levels) for f in range(config.features)])
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-4, rtol=1e-5)


def test_gradcheck_float64():
    config = HashEncodingConfig(levels=2, features=2, log2_table_size=6, base_resolution=2, per_level_scale=2.0)
    assert [d for _, d in he._plan(config)] == [True, False]
    x = (0.05 + 0.9 * torch.rand(6, 3, dtype=torch.float64)).requires_grad_()
    table = torch.randn(config.levels * 64, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hash_encode_torch(a, b, config), (x, table))


def test_double_backward():
    config = HashEncodingConfig(levels=2, features=2, log2_table_size=4, base_resolution=1, per_level_scale=2.0)
    assert [d for _, d in he._plan(config)] == [True, False]
    x = (0.05 + 0.9 * torch.rand(3, 3, dtype=torch.float64)).requires_grad_()
    table = torch.randn(config.levels * 16, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: hash_encode_torch(a, b, config), (x, table))


def test_table_only_gradient_and_no_grad(impl):
    config = SMALL
    table = torch.randn((1 << config.log2_table_size) * config.levels, 2, requires_grad=True)
    x = special_points(config)
    out = hash_encode_torch(x, table, config)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, _, ref_gtable, _ = naive_encode(x, table, config, grad_out)
    torch.testing.assert_close(table.grad.double(), dense(ref_gtable, table), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        again = hash_encode_torch(x, table, config)
    with torch.inference_mode():
        inference = hash_encode_torch(x, table, config)
    assert torch.equal(again, out.detach()) and torch.equal(inference, out.detach())


def test_worker_threads_give_identical_results(monkeypatch):
    config = SMALL
    table = torch.randn((1 << config.log2_table_size) * config.levels, 2, requires_grad=True)
    x = torch.rand(300, 3, requires_grad=True)
    grad_out = torch.randn(300, config.levels * 2)
    threads_seen = set()
    corners = he._corners

    def spy(*args):
        threads_seen.add(threading.current_thread().name)
        return corners(*args)

    monkeypatch.setattr(he, "_corners", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for parallel in (True, False):
            monkeypatch.setattr(he, "PARALLEL_LEVELS", parallel)
            out = hash_encode_torch(x, table, config)
            results.append((out, *torch.autograd.grad(out, (x, table), grad_out)))
    finally:
        torch.set_num_threads(before)
    if he._omp_set_num_threads() is not None:
        assert any(name.startswith("hash-encoding") for name in threads_seen)  # workers did run
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_input_and_shape_checks():
    config = SMALL
    table = torch.randn((1 << config.log2_table_size) * config.levels, 2, requires_grad=True)
    out = hash_encode_torch(torch.zeros(0, 3), table, config)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.all(table.grad == 0)
    with pytest.raises(ValueError):
        hash_encode_torch(torch.zeros(4, 2), table, config)
    with pytest.raises(ValueError):
        hash_encode_torch(torch.zeros(4, 3), table[:-1], config)


def test_gradient_buffer_reuse_never_clobbers_live_gradients():
    # A 2^19-row table of 8 x 2 features: its 32 MB gradient goes through the buffer pool.
    config = HashEncodingConfig(levels=8)
    table = HashEncoding(config).embeddings
    assert table.shape == (config.levels << config.log2_table_size, config.features)
    x = torch.rand(200, 3)
    g1, g2 = torch.randn(200, 16), torch.randn(200, 16)

    def backward(g):
        hash_encode_torch(x, table, config).backward(g)

    backward(g1)
    first = table.grad
    snapshot = first.clone()
    table.grad = None
    backward(g2)  # `first` is still alive: must get another buffer
    second = table.grad
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, snapshot)
    table.grad = None
    del first
    backward(g1)  # the first buffer is free again and is reused, fully re-zeroed
    assert torch.equal(table.grad, snapshot)
    backward(g2)  # accumulation into an existing .grad
    torch.testing.assert_close(table.grad, snapshot + second)
    # A view alone keeps a buffer in use.
    table.grad = None
    del second
    backward(g1)
    view = table.grad[1:]
    table.grad = None
    backward(g2)
    backward(g2)
    assert torch.equal(view, snapshot[1:])


def test_module_matches_function():
    config = SMALL
    module = HashEncoding(config)
    assert module.output_dim == 8 and module.embeddings.shape == (config.levels << config.log2_table_size, 2)
    x = torch.rand(50, 3)
    assert torch.equal(module(x), hash_encode_torch(x, module.embeddings, config))


def test_float64_points_with_float32_table(impl):
    config = SMALL
    x = special_points(config, torch.float64).requires_grad_()
    table = torch.randn((1 << config.log2_table_size) * config.levels, 2, requires_grad=True)
    out = hash_encode_torch(x, table, config)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(out)
    ref, _, ref_gtable, ref_gx = naive_encode(x, table, config, grad_out)  # pos in float64, like x
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    gx, gtable = torch.autograd.grad(out, (x, table), grad_out)
    assert gx.dtype == torch.float64
    torch.testing.assert_close(gtable.double(), dense(ref_gtable, table), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, ref_gx, atol=1e-3, rtol=1e-4)
