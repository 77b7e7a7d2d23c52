"""Triton kernels against the torch references, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported (triton decorates
its own library, tl.max, tl.sum, ..., at import). So unless this process already runs the
interpreter (e.g. `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`), the kernel tests are
skipped here and `test_kernels_under_interpreter` runs this file again in a subprocess with the
variable set, failing with the child's output if any test fails there. The parent's environment
is never changed.

Tolerances (float32): forward values rtol 1e-5, atol 1e-6 (1e-5 for hash outputs scaled by
O(1) tables); gradients rtol 1e-4, atol 1e-5 (scaled by the gradient's magnitude where it is
large). Marching is compared exactly (bit-identical samples, same order). Inputs are small so
the interpreter finishes in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from distill3d.representations.nerf import triton_kernels as tk  # noqa: E402
from distill3d.representations.nerf.hash_encoding import HashEncodingConfig, hash_encode_torch  # noqa: E402
from distill3d.representations.nerf.rendering import Samples, composite_torch, march_torch  # noqa: E402

CHILD = "DISTILL3D_TRITON_INTERPRETER_CHILD"
READY = os.environ.get("TRITON_INTERPRET") == "1" and tk.interpreter_active()
if os.environ.get(CHILD) == "1" and not READY:
    raise RuntimeError("the interpreter subprocess could not enable TRITON_INTERPRET=1 before triton was imported")

interpreted = pytest.mark.skipif(not READY, reason="runs in the TRITON_INTERPRET=1 subprocess (test_kernels_under_interpreter)")

VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(READY, reason="the interpreter is active in this process: the kernel tests run here directly")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD: "1"})
    root = Path(__file__).resolve().parents[1]
    parent_only = "not test_kernels_under_interpreter and not test_kernels_compile_for_h100_without_a_gpu"
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-rs", "-k", parent_only]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{report}"
    # Every kernel test must have run in the child (none skipped).
    summary = [line for line in proc.stdout.splitlines() if " passed" in line]
    assert summary and "skipped" not in summary[-1], report


def _compile_for_sm90(name: str, constexprs: dict, **options) -> str:
    """PTX of a kernel compiled for an H100 (sm_90): no GPU needed, only triton's bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = tk._kernels()[name]
    scalars = {"N": "i32", "R": "i32", "n_samples": "i32", "G": "i32", "n_f": "fp32", "inv_n": "fp32", "scale": "fp32", "offset": "fp32"}
    pointers = {"start_ptr": "*i64", "off_ptr": "*i64", "ray_out_ptr": "*i64", "r1_ptr": "*i32", "count_ptr": "*i32", "cnt_ptr": "*i32", "grid_ptr": "*u8"}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointers.get(arg, "*fp32")
        else:
            signature[arg] = scalars[arg]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"]


@pytest.mark.skipif(READY, reason="compiles with the real Triton compiler: runs in the parent process, not the interpreter")
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile every kernel for sm_90.

    Also checks the PTX for what exactness and speed rely on: the marcher has no fused
    multiply-adds and no approximate division when mirroring torch on CUDA; the table gradient
    uses relaxed atomic adds.
    """
    pytest.importorskip("triton.backends.nvidia")
    all_on = dict(NEED_EMB=True, NEED_X=True)
    hash_const = dict(LEVELS=16, F=2, BLOCK_F=2, T=1 << 19, BLOCK_N=tk.HASH_BLOCK_N)
    _compile_for_sm90("hash_fwd", hash_const, num_warps=4, enable_fp_fusion=True)
    ptx = _compile_for_sm90("hash_bwd", {**hash_const, **all_on}, num_warps=4, enable_fp_fusion=True)
    assert "red.global.gpu.relaxed.add.f32" in ptx or "atom.global.gpu.relaxed.add.f32" in ptx
    _compile_for_sm90("composite_fwd", dict(HAS_N=True, BLOCK_R=tk.COMPOSITE_BLOCK_R), num_warps=1, enable_fp_fusion=True)
    flags = dict(HAS_N=True, HAS_GW=True, NEED_RGB=True, NEED_N=True, NEED_DL=True, NEED_TM=True)
    _compile_for_sm90("composite_bwd", {**flags, "BLOCK_R": tk.COMPOSITE_BLOCK_R}, num_warps=1, enable_fp_fusion=True)
    march = dict(HAS_JIT=True, HAS_GRID=True, RECIP_N=True, FMA=False, WRITE=True, BLOCK_R=tk.MARCH_BLOCK_R)
    ptx = _compile_for_sm90("march", march, num_warps=1, enable_fp_fusion=False)
    assert "fma." not in ptx and "div." not in ptx
    march.update(FMA=True, RECIP_N=False)
    ptx = _compile_for_sm90("march", march, num_warps=1, enable_fp_fusion=False)
    assert "fma.rn.f32" in ptx and "div.rn.f32" in ptx


# ----- hash encoding ---------------------------------------------------------------------------

# Small configs that cover dense levels, hashed levels (uint32 hash, masked), a level switching
# between them, one and several features (F=3 exercises the padded feature block).
HASH_CONFIGS = [
    HashEncodingConfig(levels=4, features=2, log2_table_size=10, base_resolution=4, per_level_scale=2.0),
    HashEncodingConfig(levels=3, features=1, log2_table_size=6, base_resolution=2, per_level_scale=1.9),
    HashEncodingConfig(levels=2, features=3, log2_table_size=9, base_resolution=7, per_level_scale=3.0),
    HashEncodingConfig(levels=16, features=2, log2_table_size=12, base_resolution=16, per_level_scale=1.4472692374403782),
]


def _points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g)
    # Exact corners, faces, cell boundaries and points outside [0, 1] (clamped).
    x[0] = torch.tensor([0.0, 0.0, 0.0])
    x[1] = torch.tensor([1.0, 1.0, 1.0])
    x[2] = torch.tensor([0.5, 0.25, 0.125])
    x[3] = torch.tensor([-0.2, 1.3, 0.5])
    x[4] = torch.tensor([1.0, 0.0, 0.999999])
    # Many points in one cell: colliding atomic adds in the backward.
    x[5:25] = 0.3 + 1e-3 * torch.rand(20, 3, generator=g)
    return x


def _table(config: HashEncodingConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1 << config.log2_table_size) * config.levels, config.features, generator=g)


@interpreted
@pytest.mark.parametrize("config", HASH_CONFIGS, ids=lambda c: f"L{c.levels}F{c.features}T{c.log2_table_size}")
def test_hash_forward_matches_torch(config):
    x, emb = _points(96), _table(config)
    out = tk.hash_encode_triton(x, emb, config)
    ref = hash_encode_torch(x, emb, config)
    assert out.shape == ref.shape == (96, config.levels * config.features)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # An independent statement of the index rules agrees too.
    torch.testing.assert_close(tk.hash_encode_gather_torch(x, emb, config), ref, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("config", HASH_CONFIGS[:3], ids=lambda c: f"L{c.levels}F{c.features}T{c.log2_table_size}")
def test_hash_backward_table_and_x_match_torch(config):
    x, emb = _points(64, seed=3), _table(config, seed=4)
    grad_out = torch.randn(64, config.levels * config.features, generator=torch.Generator().manual_seed(5))

    # Table gradient only (x without grad).
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    (g1,) = torch.autograd.grad(tk.hash_encode_triton(x, e1, config), e1, grad_out)
    (g2,) = torch.autograd.grad(hash_encode_torch(x, e2, config), e2, grad_out)
    torch.testing.assert_close(g1, g2, **GRAD_TOL)

    # Table and position gradients (analytic normals path).
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    gx1, ge1 = torch.autograd.grad(tk.hash_encode_triton(x1, e1, config), (x1, e1), grad_out)
    gx2, ge2 = torch.autograd.grad(hash_encode_torch(x2, e2, config), (x2, e2), grad_out)
    torch.testing.assert_close(ge1, ge2, **GRAD_TOL)
    scale = gx2.abs().max()
    torch.testing.assert_close(gx1 / scale, gx2 / scale, **GRAD_TOL)
    assert torch.all(gx1[3, [0, 1]] == 0)  # clamped coordinates get no gradient


@interpreted
def test_hash_double_backward_is_exact():
    """create_graph through the x-gradient (a loss on analytic normals) reaches the table.

    The x-gradient is linear in the table, so its directional derivative equals a difference of
    two first-order (kernel) evaluations exactly, up to rounding.
    """
    config = HASH_CONFIGS[0]
    x0, emb = _points(40, seed=7), _table(config, seed=8)
    gen = torch.Generator().manual_seed(9)
    grad_out = torch.randn(40, config.levels * config.features, generator=gen)
    v = torch.randn(40, 3, generator=gen)
    u = torch.randn(emb.shape, generator=gen)

    def grad_x(table, create_graph):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(tk.hash_encode_triton(x, table, config), x, grad_out, create_graph=create_graph)
        return gx

    e = emb.clone().requires_grad_()
    (d_table,) = torch.autograd.grad((grad_x(e, True) * v).sum(), e)
    directional = ((grad_x(emb + u, False) - grad_x(emb, False)) * v).sum()
    torch.testing.assert_close((d_table * u).sum(), directional, rtol=1e-3, atol=1e-2)


@interpreted
def test_hash_module_layout_is_shared():
    """A HashEncoding's table gives the same features through either backend (checkpoints move)."""
    from distill3d.representations.nerf.hash_encoding import HashEncoding

    config = HASH_CONFIGS[0]
    module = HashEncoding(config, backend="torch")
    state = module.state_dict()
    x = _points(32, seed=11)
    torch.testing.assert_close(tk.hash_encode_triton(x, state["embeddings"], config), module(x), rtol=1e-5, atol=1e-6)


# ----- compositing -----------------------------------------------------------------------------


def _packed(counts: list[int], seed: int = 0, sigma_scale: float = 5.0):
    g = torch.Generator().manual_seed(seed)
    counts_t = torch.tensor(counts)
    n_rays, s = len(counts), int(counts_t.sum())
    idx = torch.repeat_interleave(torch.arange(n_rays), counts_t)
    deltas = 0.05 + 0.3 * torch.rand(s, generator=g)
    t_mid = torch.rand(s, generator=g) * 4
    samples = Samples(idx, t_mid, deltas, n_rays)
    sigmas = torch.rand(s, generator=g) * sigma_scale
    rgbs = torch.rand(s, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(s, 3, generator=g), dim=-1)
    return samples, sigmas, rgbs, normals


# Empty rays, single-sample rays, rays much longer than others in their block, several blocks.
COUNTS = [3, 0, 5, 1, 17, 0, 2, 9] + [4] * 30 + [24, 0, 1]

FIELDS = ("weights", "rgb", "opacity", "depth", "normal")


@interpreted
@pytest.mark.parametrize("with_normals", [True, False])
def test_composite_forward_matches_torch(with_normals):
    samples, sigmas, rgbs, normals = _packed(COUNTS)
    n = normals if with_normals else None
    out = tk.composite_triton(sigmas, rgbs, samples, n)
    ref = composite_torch(sigmas, rgbs, samples, n)
    for field in FIELDS:
        a, b = getattr(out, field), getattr(ref, field)
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, field
        torch.testing.assert_close(a, b, **VALUE_TOL)


@interpreted
def test_composite_saturated_rays_stay_finite():
    samples, sigmas, rgbs, normals = _packed(COUNTS, seed=2, sigma_scale=500.0)
    out = tk.composite_triton(sigmas, rgbs, samples, normals)
    ref = composite_torch(sigmas, rgbs, samples, normals)
    for field in FIELDS:
        assert torch.isfinite(getattr(out, field)).all()
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), **VALUE_TOL)


def _composite_grads(fn, samples, sigmas, rgbs, normals, upstream, used):
    leaves = [sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()]
    n = normals.clone().requires_grad_() if normals is not None else None
    deltas = samples.deltas.clone().requires_grad_()
    t_mid = samples.t_mid.clone().requires_grad_()
    s = Samples(samples.ray_indices, t_mid, deltas, samples.n_rays)
    out = fn(leaves[0], leaves[1], s, n)
    loss = sum((getattr(out, f) * upstream[f]).sum() for f in used)
    inputs = leaves + ([n] if n is not None else []) + [deltas, t_mid]
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@interpreted
@pytest.mark.parametrize(
    "used",
    [FIELDS, ("rgb",), ("weights",), ("normal",)],
    ids=lambda u: "+".join(u),
)
def test_composite_backward_matches_torch(used):
    samples, sigmas, rgbs, normals = _packed(COUNTS, seed=4)
    ref = composite_torch(sigmas, rgbs, samples, normals)
    gen = torch.Generator().manual_seed(6)
    upstream = {f: torch.randn(getattr(ref, f).shape, generator=gen) for f in FIELDS}
    got = _composite_grads(tk.composite_triton, samples, sigmas, rgbs, normals, upstream, used)
    want = _composite_grads(composite_torch, samples, sigmas, rgbs, normals, upstream, used)
    names = ("sigmas", "rgbs", "normals", "deltas", "t_mid")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


@interpreted
def test_composite_backward_without_normals():
    samples, sigmas, rgbs, _ = _packed([2, 7, 0, 12, 1], seed=8)
    gen = torch.Generator().manual_seed(9)
    ref = composite_torch(sigmas, rgbs, samples)
    upstream = {f: torch.randn(getattr(ref, f).shape, generator=gen) for f in FIELDS[:4]}
    got = _composite_grads(tk.composite_triton, samples, sigmas, rgbs, None, upstream, FIELDS[:4])
    want = _composite_grads(composite_torch, samples, sigmas, rgbs, None, upstream, FIELDS[:4])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@interpreted
def test_composite_no_samples():
    samples = Samples(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), 5)
    sig = torch.zeros(0, requires_grad=True)
    out = tk.composite_triton(sig, torch.zeros(0, 3), samples, None)
    assert out.rgb.shape == (5, 3) and torch.all(out.rgb == 0) and torch.all(out.opacity == 0)
    out.opacity.sum().backward()
    assert sig.grad.shape == (0,)


# ----- marching --------------------------------------------------------------------------------


def _rays(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 2.5])
    target = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.8
    dirs = torch.nn.functional.normalize(target - origins, dim=-1)
    near = (2.5 - 1.2 + 0.2 * torch.rand(n, generator=g)).clamp_min(0.05)
    far = near + 2.0 * torch.rand(n, generator=g)
    far[1] = near[1]  # empty interval
    far[2] = near[2] - 0.5  # inverted interval
    return origins, dirs, near, far


def _grid(resolution: int, fraction: float, radius: float = 1.0, seed: int = 0):
    from distill3d.representations.nerf.occupancy import OccupancyConfig, OccupancyGrid

    grid = OccupancyGrid(OccupancyConfig(resolution=resolution), radius=radius)
    g = torch.Generator().manual_seed(seed)
    grid.occupied.copy_(torch.rand(resolution, resolution, resolution, generator=g) < fraction)
    return grid


def _assert_same_samples(a: Samples, b: Samples):
    assert a.n_rays == b.n_rays
    assert a.ray_indices.dtype == b.ray_indices.dtype == torch.long
    assert torch.equal(a.ray_indices, b.ray_indices)
    assert torch.equal(a.t_mid, b.t_mid)
    assert torch.equal(a.deltas, b.deltas)


@interpreted
@pytest.mark.parametrize("jitter", [False, True])
@pytest.mark.parametrize("grid", [None, (8, 0.4, 1.0), (5, 0.7, 1.3)], ids=["no-grid", "G8", "G5-r1.3"])
def test_march_matches_torch(grid, jitter):
    origins, dirs, near, far = _rays(48, seed=1)
    occupied = _grid(*grid) if grid is not None else None
    torch.manual_seed(123)
    got = tk.march_triton(origins, dirs, near, far, 16, occupied, jitter)
    torch.manual_seed(123)
    want = march_torch(origins, dirs, near, far, 16, occupied, jitter)
    assert want.ray_indices.numel() > 0
    _assert_same_samples(got, want)
    assert not torch.any(got.ray_indices == 1) and not torch.any(got.ray_indices == 2)


@interpreted
def test_march_accepts_explicit_jitter():
    origins, dirs, near, far = _rays(16, seed=2)
    occupied = _grid(6, 0.5, seed=3)
    torch.manual_seed(7)
    want = march_torch(origins, dirs, near, far, 12, occupied, True)
    torch.manual_seed(7)
    valid = far > near  # march_torch draws one row per ray that enters its bounds
    jitter = torch.zeros(16, 12)
    jitter[valid] = torch.rand(int(valid.sum()), 12)
    _assert_same_samples(tk.march_triton(origins, dirs, near, far, 12, occupied, jitter), want)


@interpreted
def test_march_empty_grid_and_callable_fallback():
    origins, dirs, near, far = _rays(8, seed=4)
    empty = _grid(4, 0.0)
    out = tk.march_triton(origins, dirs, near, far, 8, empty, False)
    assert out.ray_indices.numel() == 0 and out.n_rays == 8

    def half_space(points):  # an arbitrary callable: handled by march_torch
        return points[:, 0] > 0

    _assert_same_samples(
        tk.march_triton(origins, dirs, near, far, 8, half_space, False),
        march_torch(origins, dirs, near, far, 8, half_space, False),
    )


@interpreted
def test_march_then_composite_end_to_end():
    """A small render through the three Triton ops matches the torch pipeline, values and grads."""
    config = HASH_CONFIGS[0]
    origins, dirs, near, far = _rays(24, seed=5)
    occupied = _grid(8, 0.6, seed=6)
    emb = _table(config, seed=7) * 0.5
    head = torch.randn(config.levels * config.features, 4, generator=torch.Generator().manual_seed(8))

    def render(encode, march, composite):
        table = emb.clone().requires_grad_()
        torch.manual_seed(9)
        s = march(origins, dirs, near, far, 16, occupied, True)
        points = origins[s.ray_indices] + dirs[s.ray_indices] * s.t_mid[:, None]
        feats = encode((points + 1) / 2, table, config) @ head
        out = composite(torch.nn.functional.softplus(feats[:, 0]) * 4, torch.sigmoid(feats[:, 1:]), s)
        loss = out.rgb.square().sum() + out.depth.sum()
        (grad,) = torch.autograd.grad(loss, table)
        return out.rgb, grad

    rgb_a, grad_a = render(tk.hash_encode_triton, tk.march_triton, tk.composite_triton)
    rgb_b, grad_b = render(hash_encode_torch, march_torch, composite_torch)
    torch.testing.assert_close(rgb_a, rgb_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-4)
