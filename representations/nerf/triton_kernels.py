"""Fused Triton kernels for the NeRF hot ops: hash encoding, packed compositing, grid marching.

Each op here is a drop-in for its torch reference (same signature, same semantics, same
parameter layout) and is registered as the "triton" backend in triton_backends.py:

- `hash_encode_triton(x, embeddings, config)`  ==  hash_encoding.hash_encode_torch
  Forward: one program per block of points, looping over levels; each level gathers the 8
  corner rows with the reference's exact index arithmetic (dense levels x + y(res+1) +
  z(res+1)^2, hashed levels (x*1 ^ y*2654435761 ^ z*805459861) in uint32, masked to the table
  size; cell clamped to res-1; corner k at offsets (k&1, k>>1&1, k>>2&1)); output level-major.
  Backward: atomic adds into the table, and the gradient into x when x requires grad (analytic
  normals). Double backward (create_graph=True, e.g. a loss on analytic normals) recomputes the
  x-gradient with differentiable torch ops: exact, but at torch speed.
- `composite_triton(sigmas, rgbs, samples, normals=None)`  ==  rendering.composite_torch
  One program per block of rays, a sequential loop over each ray's packed samples (ray offsets
  and counts come from the sorted `ray_indices`). Outputs weights (S,), rgb, opacity, depth,
  normal; the backward is analytic (see `_composite_bwd_kernel`) and gives gradients for
  sigmas, rgbs, normals, and also deltas and t_mid when those require grad.
- `march_triton(origins, dirs, near, far, n_samples, occupied, jitter)`  ==  rendering.march_torch
  for a grid occupancy: `occupied` is None or an object with `occupied` (a (G, G, G) bool tensor
  over the cube [-radius, radius]^3, indexed [ix, iy, iz]) and `radius` (occupancy.OccupancyGrid
  is one). Cell of point p: int32(p * (0.5 G / radius) + 0.5 G) clamped to [0, G-1], as in
  OccupancyGrid.__call__. `jitter` is a bool (True makes march_torch's draw, torch.rand(number of
  rays with far > near, n_samples), so the same seed gives the same samples) or an
  (R, n_samples) tensor of offsets in [0, 1). Two passes: count kept samples per ray, then write them at the exclusive-cumsum
  offsets, so the packed order (by ray, then by sample) is march_torch's. Floating-point ops are
  arranged to be bit-identical to the torch reference on the same device: how torch divides by a
  Python scalar (a reciprocal multiply on CUDA) and whether its addcmul fuses are measured once
  per device (`_scalar_division`, `_addcmul_is_fused`), and Triton's own FMA contraction is
  switched off for this kernel. A change to march_torch's arithmetic must be mirrored here (the
  tests compare bit for bit).
  Any other occupancy callable (or float64 rays) falls back to march_torch.

Triton is imported lazily: importing this module never fails where triton is missing. Kernels
are built with triton.jit on first use, so TRITON_INTERPRET=1 must be set before triton is first
imported for the interpreter (CPU tensors) to be used; see `interpreter_active()`.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from distill3d.representations.nerf.rendering import Composited, Samples

HASH_PRIMES = (1, 2654435761, 805459861)


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


def triton_import_error() -> str | None:
    """None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreter_active() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1 before import)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or triton_import_error() is not None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # triton decorates its own library (tl.max, tl.sum, ...) when it is imported: if the variable
    # was set only afterwards, those stay compiled functions and kernels cannot run on CPU.
    return isinstance(tl.standard.max, InterpretedFunction)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`, else a short reason."""
    reason = triton_import_error()
    if reason is not None:
        return reason
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton needs CUDA (set TRITON_INTERPRET=1 to run the interpreter on CPU, slow)"
    if device.type != "cpu":
        return f"Triton does not run on {device.type} tensors"
    if not interpreter_active():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before Python starts"
    return None


# ----------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by triton.jit on first use)
# ----------------------------------------------------------------------------------------------


def _kernel_sources():
    import triton.language as tl

    def _hash_fwd_kernel(
        x_ptr, emb_ptr, out_ptr, res_ptr, r1_ptr, N,
        LEVELS: tl.constexpr, F: tl.constexpr, BLOCK_F: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs < N
        x0 = tl.load(x_ptr + offs * 3 + 0, mask=m, other=0.0)
        x1 = tl.load(x_ptr + offs * 3 + 1, mask=m, other=0.0)
        x2 = tl.load(x_ptr + offs * 3 + 2, mask=m, other=0.0)
        x0 = tl.minimum(tl.maximum(x0, 0.0), 1.0)
        x1 = tl.minimum(tl.maximum(x1, 0.0), 1.0)
        x2 = tl.minimum(tl.maximum(x2, 0.0), 1.0)
        fo = tl.arange(0, BLOCK_F)
        mf = m[:, None] & (fo < F)[None, :]
        for level in range(LEVELS):
            res = tl.load(res_ptr + level)
            r1 = tl.load(r1_ptr + level)  # res + 1 for a dense level, 0 for a hashed one
            dense = r1 > 0
            p0 = x0 * res
            p1 = x1 * res
            p2 = x2 * res
            c0 = tl.minimum(tl.floor(p0), res - 1.0)
            c1 = tl.minimum(tl.floor(p1), res - 1.0)
            c2 = tl.minimum(tl.floor(p2), res - 1.0)
            f0 = p0 - c0
            f1 = p1 - c1
            f2 = p2 - c2
            i0 = c0.to(tl.int32)
            i1 = c1.to(tl.int32)
            i2 = c2.to(tl.int32)
            h0 = i0.to(tl.uint32)
            h1 = i1.to(tl.uint32) * 2654435761
            h2 = i2.to(tl.uint32) * 805459861
            d1 = i1 * r1
            d2 = i2 * r1 * r1
            base = level * T
            acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
            for k in tl.static_range(8):
                if (k & 1) != 0:
                    wx = f0
                    dx = i0 + 1
                    hx = h0 + 1
                else:
                    wx = 1.0 - f0
                    dx = i0
                    hx = h0
                if (k & 2) != 0:
                    wy = f1
                    dy = d1 + r1
                    hy = h1 + 2654435761
                else:
                    wy = 1.0 - f1
                    dy = d1
                    hy = h1
                if (k & 4) != 0:
                    wz = f2
                    dz = d2 + r1 * r1
                    hz = h2 + 805459861
                else:
                    wz = 1.0 - f2
                    dz = d2
                    hz = h2
                hashed = ((hx ^ hy ^ hz) & (T - 1)).to(tl.int32)
                row = (tl.where(dense, dx + dy + dz, hashed) + base).to(tl.int64)
                w = wx * wy * wz
                e = tl.load(emb_ptr + row[:, None] * F + fo[None, :], mask=mf, other=0.0)
                acc += w[:, None] * e
            tl.store(out_ptr + offs[:, None] * (LEVELS * F) + level * F + fo[None, :], acc, mask=mf)

    def _hash_bwd_kernel(
        x_ptr, emb_ptr, gout_ptr, gemb_ptr, gx_ptr, res_ptr, r1_ptr, N,
        LEVELS: tl.constexpr, F: tl.constexpr, BLOCK_F: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
        NEED_EMB: tl.constexpr, NEED_X: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs < N
        x0 = tl.load(x_ptr + offs * 3 + 0, mask=m, other=0.0)
        x1 = tl.load(x_ptr + offs * 3 + 1, mask=m, other=0.0)
        x2 = tl.load(x_ptr + offs * 3 + 2, mask=m, other=0.0)
        # clamp(0, 1) passes the gradient where 0 <= x <= 1 (both ends inclusive, like torch).
        in0 = ((x0 >= 0.0) & (x0 <= 1.0)).to(tl.float32)
        in1 = ((x1 >= 0.0) & (x1 <= 1.0)).to(tl.float32)
        in2 = ((x2 >= 0.0) & (x2 <= 1.0)).to(tl.float32)
        x0 = tl.minimum(tl.maximum(x0, 0.0), 1.0)
        x1 = tl.minimum(tl.maximum(x1, 0.0), 1.0)
        x2 = tl.minimum(tl.maximum(x2, 0.0), 1.0)
        fo = tl.arange(0, BLOCK_F)
        mf = m[:, None] & (fo < F)[None, :]
        gx0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        gx1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        gx2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for level in range(LEVELS):
            res = tl.load(res_ptr + level)
            r1 = tl.load(r1_ptr + level)
            dense = r1 > 0
            p0 = x0 * res
            p1 = x1 * res
            p2 = x2 * res
            c0 = tl.minimum(tl.floor(p0), res - 1.0)
            c1 = tl.minimum(tl.floor(p1), res - 1.0)
            c2 = tl.minimum(tl.floor(p2), res - 1.0)
            f0 = p0 - c0
            f1 = p1 - c1
            f2 = p2 - c2
            i0 = c0.to(tl.int32)
            i1 = c1.to(tl.int32)
            i2 = c2.to(tl.int32)
            h0 = i0.to(tl.uint32)
            h1 = i1.to(tl.uint32) * 2654435761
            h2 = i2.to(tl.uint32) * 805459861
            d1 = i1 * r1
            d2 = i2 * r1 * r1
            base = level * T
            g = tl.load(gout_ptr + offs[:, None] * (LEVELS * F) + level * F + fo[None, :], mask=mf, other=0.0)
            lx0 = tl.zeros([BLOCK_N], dtype=tl.float32)
            lx1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            lx2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k in tl.static_range(8):
                if (k & 1) != 0:
                    wx = f0
                    sx = 1.0
                    dx = i0 + 1
                    hx = h0 + 1
                else:
                    wx = 1.0 - f0
                    sx = -1.0
                    dx = i0
                    hx = h0
                if (k & 2) != 0:
                    wy = f1
                    sy = 1.0
                    dy = d1 + r1
                    hy = h1 + 2654435761
                else:
                    wy = 1.0 - f1
                    sy = -1.0
                    dy = d1
                    hy = h1
                if (k & 4) != 0:
                    wz = f2
                    sz = 1.0
                    dz = d2 + r1 * r1
                    hz = h2 + 805459861
                else:
                    wz = 1.0 - f2
                    sz = -1.0
                    dz = d2
                    hz = h2
                hashed = ((hx ^ hy ^ hz) & (T - 1)).to(tl.int32)
                row = (tl.where(dense, dx + dy + dz, hashed) + base).to(tl.int64)
                addr = row[:, None] * F + fo[None, :]
                if NEED_EMB:
                    w = wx * wy * wz
                    tl.atomic_add(gemb_ptr + addr, w[:, None] * g, mask=mf, sem="relaxed")
                if NEED_X:
                    e = tl.load(emb_ptr + addr, mask=mf, other=0.0)
                    s = tl.sum(g * e, axis=1)
                    lx0 += s * (sx * (wy * wz))
                    lx1 += s * (sy * (wx * wz))
                    lx2 += s * (sz * (wx * wy))
            if NEED_X:
                gx0 += lx0 * res
                gx1 += lx1 * res
                gx2 += lx2 * res
        if NEED_X:
            tl.store(gx_ptr + offs * 3 + 0, gx0 * in0, mask=m)
            tl.store(gx_ptr + offs * 3 + 1, gx1 * in1, mask=m)
            tl.store(gx_ptr + offs * 3 + 2, gx2 * in2, mask=m)

    def _composite_fwd_kernel(
        sig_ptr, rgb_ptr, nrm_ptr, dl_ptr, tm_ptr, start_ptr, count_ptr,
        w_ptr, trans_ptr, out_rgb_ptr, out_op_ptr, out_depth_ptr, out_nrm_ptr, R,
        HAS_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rays = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rays < R
        start = tl.load(start_ptr + rays, mask=rm, other=0)
        count = tl.load(count_ptr + rays, mask=rm, other=0)
        n_iter = tl.max(count, axis=0)
        tau_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_r = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_nx = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_ny = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_nz = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(0, n_iter):
            act = i < count
            s = start + i
            sigma = tl.load(sig_ptr + s, mask=act, other=0.0)
            delta = tl.load(dl_ptr + s, mask=act, other=0.0)
            t = tl.load(tm_ptr + s, mask=act, other=0.0)
            tau = sigma * delta
            alpha = 1.0 - tl.exp(-tau)
            trans = tl.exp(-tau_sum)
            w = alpha * trans
            tl.store(w_ptr + s, w, mask=act)
            tl.store(trans_ptr + s, trans, mask=act)
            acc_r += w * tl.load(rgb_ptr + s * 3 + 0, mask=act, other=0.0)
            acc_g += w * tl.load(rgb_ptr + s * 3 + 1, mask=act, other=0.0)
            acc_b += w * tl.load(rgb_ptr + s * 3 + 2, mask=act, other=0.0)
            acc_o += w
            acc_d += w * t
            if HAS_N:
                acc_nx += w * tl.load(nrm_ptr + s * 3 + 0, mask=act, other=0.0)
                acc_ny += w * tl.load(nrm_ptr + s * 3 + 1, mask=act, other=0.0)
                acc_nz += w * tl.load(nrm_ptr + s * 3 + 2, mask=act, other=0.0)
            tau_sum += tau
        tl.store(out_rgb_ptr + rays * 3 + 0, acc_r, mask=rm)
        tl.store(out_rgb_ptr + rays * 3 + 1, acc_g, mask=rm)
        tl.store(out_rgb_ptr + rays * 3 + 2, acc_b, mask=rm)
        tl.store(out_op_ptr + rays, acc_o, mask=rm)
        tl.store(out_depth_ptr + rays, acc_d, mask=rm)
        if HAS_N:
            tl.store(out_nrm_ptr + rays * 3 + 0, acc_nx, mask=rm)
            tl.store(out_nrm_ptr + rays * 3 + 1, acc_ny, mask=rm)
            tl.store(out_nrm_ptr + rays * 3 + 2, acc_nz, mask=rm)

    def _composite_bwd_kernel(
        sig_ptr, rgb_ptr, nrm_ptr, dl_ptr, tm_ptr, start_ptr, count_ptr, w_ptr, trans_ptr,
        gw_ptr, grgb_ptr, gop_ptr, gdepth_ptr, gnrm_ptr,
        out_gsig_ptr, out_grgb_ptr, out_gnrm_ptr, out_gdl_ptr, out_gtm_ptr, R,
        HAS_N: tl.constexpr, HAS_GW: tl.constexpr, NEED_RGB: tl.constexpr, NEED_N: tl.constexpr,
        NEED_DL: tl.constexpr, NEED_TM: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Per ray, with tau_i = sigma_i delta_i, T_i = exp(-sum_{j<i} tau_j), w_i = T_i (1 - e^-tau_i):
        #   dw_i/dtau_k = T_{k+1} (i = k),  -w_i (i > k),  0 (i < k).
        # With G_i = dL/dw_i in total (direct + through rgb, opacity, depth and normal),
        #   dL/dtau_k = G_k T_{k+1} - sum_{i>k} G_i w_i,
        # a suffix sum: loop over each ray's samples backwards (no cancellation).
        pid = tl.program_id(0)
        rays = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rays < R
        start = tl.load(start_ptr + rays, mask=rm, other=0)
        count = tl.load(count_ptr + rays, mask=rm, other=0)
        n_iter = tl.max(count, axis=0)
        g_r = tl.load(grgb_ptr + rays * 3 + 0, mask=rm, other=0.0)
        g_g = tl.load(grgb_ptr + rays * 3 + 1, mask=rm, other=0.0)
        g_b = tl.load(grgb_ptr + rays * 3 + 2, mask=rm, other=0.0)
        g_o = tl.load(gop_ptr + rays, mask=rm, other=0.0)
        g_d = tl.load(gdepth_ptr + rays, mask=rm, other=0.0)
        if HAS_N:
            g_nx = tl.load(gnrm_ptr + rays * 3 + 0, mask=rm, other=0.0)
            g_ny = tl.load(gnrm_ptr + rays * 3 + 1, mask=rm, other=0.0)
            g_nz = tl.load(gnrm_ptr + rays * 3 + 2, mask=rm, other=0.0)
        suffix = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(0, n_iter):
            j = count - 1 - i
            act = j >= 0
            s = start + j
            sigma = tl.load(sig_ptr + s, mask=act, other=0.0)
            delta = tl.load(dl_ptr + s, mask=act, other=0.0)
            t = tl.load(tm_ptr + s, mask=act, other=0.0)
            w = tl.load(w_ptr + s, mask=act, other=0.0)
            trans = tl.load(trans_ptr + s, mask=act, other=0.0)
            c_r = tl.load(rgb_ptr + s * 3 + 0, mask=act, other=0.0)
            c_g = tl.load(rgb_ptr + s * 3 + 1, mask=act, other=0.0)
            c_b = tl.load(rgb_ptr + s * 3 + 2, mask=act, other=0.0)
            gw = g_r * c_r + g_g * c_g + g_b * c_b + g_o + g_d * t
            if HAS_GW:
                gw += tl.load(gw_ptr + s, mask=act, other=0.0)
            if HAS_N:
                n_x = tl.load(nrm_ptr + s * 3 + 0, mask=act, other=0.0)
                n_y = tl.load(nrm_ptr + s * 3 + 1, mask=act, other=0.0)
                n_z = tl.load(nrm_ptr + s * 3 + 2, mask=act, other=0.0)
                gw += g_nx * n_x + g_ny * n_y + g_nz * n_z
                if NEED_N:
                    tl.store(out_gnrm_ptr + s * 3 + 0, w * g_nx, mask=act)
                    tl.store(out_gnrm_ptr + s * 3 + 1, w * g_ny, mask=act)
                    tl.store(out_gnrm_ptr + s * 3 + 2, w * g_nz, mask=act)
            if NEED_RGB:
                tl.store(out_grgb_ptr + s * 3 + 0, w * g_r, mask=act)
                tl.store(out_grgb_ptr + s * 3 + 1, w * g_g, mask=act)
                tl.store(out_grgb_ptr + s * 3 + 2, w * g_b, mask=act)
            tau = sigma * delta
            gtau = gw * (trans * tl.exp(-tau)) - suffix
            suffix += gw * w
            tl.store(out_gsig_ptr + s, gtau * delta, mask=act)
            if NEED_DL:
                tl.store(out_gdl_ptr + s, gtau * sigma, mask=act)
            if NEED_TM:
                tl.store(out_gtm_ptr + s, g_d * w, mask=act)

    def _march_kernel(
        o_ptr, d_ptr, near_ptr, far_ptr, jit_ptr, grid_ptr, off_ptr, cnt_ptr, ray_out_ptr, t_out_ptr, dt_out_ptr,
        R, n_samples, n_f, inv_n, scale, offset, G,
        HAS_JIT: tl.constexpr, HAS_GRID: tl.constexpr, RECIP_N: tl.constexpr, FMA: tl.constexpr,
        WRITE: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Mirrors march_torch and OccupancyGrid.__call__ op by op:
        #   step = (far - near) / n;  u = s + jitter;  t = addcmul(near, step, u);
        #   p = addcmul(o, d, t);  cell = clamp(int32(p * (0.5 G / radius) + 0.5 G), 0, G - 1).
        # How torch rounds on the device is measured by the caller: division by a Python scalar
        # is a multiply by a reciprocal on CUDA (RECIP_N), and addcmul is one fused multiply-add
        # (FMA) or a multiply then an add. FMA contraction is off for this kernel, so the rest of
        # the arithmetic rounds exactly like torch's separate ops.
        pid = tl.program_id(0)
        rays = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rays < R
        ox = tl.load(o_ptr + rays * 3 + 0, mask=rm, other=0.0)
        oy = tl.load(o_ptr + rays * 3 + 1, mask=rm, other=0.0)
        oz = tl.load(o_ptr + rays * 3 + 2, mask=rm, other=0.0)
        dx = tl.load(d_ptr + rays * 3 + 0, mask=rm, other=0.0)
        dy = tl.load(d_ptr + rays * 3 + 1, mask=rm, other=0.0)
        dz = tl.load(d_ptr + rays * 3 + 2, mask=rm, other=0.0)
        near = tl.load(near_ptr + rays, mask=rm, other=0.0)
        far = tl.load(far_ptr + rays, mask=rm, other=0.0)
        span = far - near
        if RECIP_N:
            step = span * inv_n
        else:
            step = tl.math.div_rn(span, tl.zeros([BLOCK_R], dtype=tl.float32) + n_f)
        valid = rm & (far > near)
        count = tl.zeros([BLOCK_R], dtype=tl.int32)
        if WRITE:
            base = tl.load(off_ptr + rays, mask=rm, other=0)
        for s in range(0, n_samples):
            if HAS_JIT:
                u = s + tl.load(jit_ptr + rays * n_samples + s, mask=rm, other=0.0)
            else:
                u = tl.zeros([BLOCK_R], dtype=tl.float32) + (s + 0.5)
            if FMA:
                t = tl.fma(step, u, near)
            else:
                t = near + step * u
            keep = valid
            if HAS_GRID:
                if FMA:
                    px = tl.fma(dx, t, ox)
                    py = tl.fma(dy, t, oy)
                    pz = tl.fma(dz, t, oz)
                else:
                    px = ox + dx * t
                    py = oy + dy * t
                    pz = oz + dz * t
                ix = tl.minimum(tl.maximum((px * scale + offset).to(tl.int32), 0), G - 1)
                iy = tl.minimum(tl.maximum((py * scale + offset).to(tl.int32), 0), G - 1)
                iz = tl.minimum(tl.maximum((pz * scale + offset).to(tl.int32), 0), G - 1)
                occ = tl.load(grid_ptr + (ix * G + iy) * G + iz, mask=keep, other=0)
                keep = keep & (occ != 0)
            if WRITE:
                pos = base + count
                tl.store(ray_out_ptr + pos, rays, mask=keep)
                tl.store(t_out_ptr + pos, t, mask=keep)
                tl.store(dt_out_ptr + pos, step, mask=keep)
            count += keep.to(tl.int32)
        if not WRITE:
            tl.store(cnt_ptr + rays, count, mask=rm)

    return {
        "hash_fwd": _hash_fwd_kernel,
        "hash_bwd": _hash_bwd_kernel,
        "composite_fwd": _composite_fwd_kernel,
        "composite_bwd": _composite_bwd_kernel,
        "march": _march_kernel,
    }


@lru_cache(maxsize=None)
def _kernels() -> dict:
    import triton

    return {name: triton.jit(fn) for name, fn in _kernel_sources().items()}


def _launch_options(device: torch.device, exact: bool = False, num_warps: int = 4) -> dict:
    """Launch options: exact=True turns FMA contraction off (bit-identical to torch's ops)."""
    if device.type == "cuda" and not interpreter_active():
        return {"num_warps": num_warps, "enable_fp_fusion": not exact}
    return {}


# ----------------------------------------------------------------------------------------------
# Hash encoding
# ----------------------------------------------------------------------------------------------


def _level_params(config, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-level resolution (float32) and dense stride res+1 (int32; 0 for hashed levels)."""
    return _level_params_cached(config.levels, config.base_resolution, float(config.per_level_scale), config.log2_table_size, str(device))


@lru_cache(maxsize=64)
def _level_params_cached(levels: int, base: int, scale: float, log2_t: int, device: str) -> tuple[Tensor, Tensor]:
    table_size = 1 << log2_t
    res = [int(math.floor(base * scale**level)) for level in range(levels)]
    r1 = [r + 1 if (r + 1) ** 3 <= table_size else 0 for r in res]
    return (
        torch.tensor(res, dtype=torch.float32, device=device),
        torch.tensor(r1, dtype=torch.int32, device=device),
    )


def _hash_meta(config) -> tuple[int, int, int, int]:
    features = config.features
    return config.levels, features, 1 << config.log2_table_size, max(1, 1 << (features - 1).bit_length())


HASH_BLOCK_N = 128


def _hash_forward(x: Tensor, emb: Tensor, res: Tensor, r1: Tensor, config) -> Tensor:
    levels, features, table, block_f = _hash_meta(config)
    n = x.shape[0]
    out = torch.empty(n, levels * features, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    grid = (triton_cdiv(n, HASH_BLOCK_N),)
    _kernels()["hash_fwd"][grid](
        x, emb, out, res, r1, n,
        LEVELS=levels, F=features, BLOCK_F=block_f, T=table, BLOCK_N=HASH_BLOCK_N, **_launch_options(x.device),
    )
    return out


def _hash_backward(x: Tensor, emb: Tensor, grad_out: Tensor, res: Tensor, r1: Tensor, config, need_emb: bool, need_x: bool):
    levels, features, table, block_f = _hash_meta(config)
    n = x.shape[0]
    grad_emb = torch.zeros_like(emb) if need_emb else None
    grad_x = torch.zeros(n, 3, dtype=torch.float32, device=x.device) if need_x else None
    if n == 0 or not (need_emb or need_x):
        return grad_x, grad_emb
    grid = (triton_cdiv(n, HASH_BLOCK_N),)
    _kernels()["hash_bwd"][grid](
        x, emb, grad_out, grad_emb if need_emb else emb, grad_x if need_x else x, res, r1, n,
        LEVELS=levels, F=features, BLOCK_F=block_f, T=table, BLOCK_N=HASH_BLOCK_N,
        NEED_EMB=need_emb, NEED_X=need_x, **_launch_options(x.device),
    )
    return grad_x, grad_emb


def hash_corners_torch(x: Tensor, config) -> tuple[Tensor, Tensor]:
    """Rows (L, N, 8) and trilinear weights (L, N, 8, differentiable in x) by the reference rules.

    Plain torch ops, used for the double-backward path and as an independent statement of the
    index semantics in the tests.
    """
    table = 1 << config.log2_table_size
    res_t, r1_t = _level_params(config, x.device)
    xc = x.clamp(0.0, 1.0)
    rows, weights = [], []
    bits = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], device=x.device)  # (8, 3)
    primes = torch.tensor(HASH_PRIMES, dtype=torch.int64, device=x.device)
    for level in range(config.levels):
        res = res_t[level]
        r1 = int(r1_t[level])
        pos = xc * res
        cell = torch.minimum(pos.floor(), res - 1)
        frac = pos - cell
        corner = cell.detach().long()[:, None, :] + bits[None]  # (N, 8, 3)
        if r1 > 0:
            row = corner[..., 0] + corner[..., 1] * r1 + corner[..., 2] * (r1 * r1)
        else:
            term = (corner * primes) & 0xFFFFFFFF
            row = (term[..., 0] ^ term[..., 1] ^ term[..., 2]) & (table - 1)
        per_axis = torch.where(bits[None].bool(), frac[:, None, :], 1 - frac[:, None, :])  # (N, 8, 3)
        rows.append(row + level * table)
        weights.append(per_axis[..., 0] * per_axis[..., 1] * per_axis[..., 2])
    return torch.stack(rows), torch.stack(weights)


def hash_encode_gather_torch(x: Tensor, embeddings: Tensor, config) -> Tensor:
    """The encoding by gather + weighted sum: differentiable to any order (slow; double backward)."""
    rows, w = hash_corners_torch(x, config)
    out = (embeddings[rows] * w[..., None]).sum(2)  # (L, N, F)
    return out.permute(1, 0, 2).reshape(x.shape[0], config.levels * config.features)


class _HashEncodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, emb: Tensor, config):
        res, r1 = _level_params(config, x.device)
        out = _hash_forward(x, emb, res, r1, config)
        ctx.save_for_backward(x, emb)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, emb = ctx.saved_tensors
        config = ctx.config
        need_x, need_emb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled() and need_x:
            # create_graph=True with an x-gradient (loss on analytic normals): recompute with
            # differentiable torch ops so the gradient itself can be differentiated.
            inputs = [t for t, need in ((x, need_x), (emb, need_emb)) if need]
            with torch.enable_grad():
                out = hash_encode_gather_torch(x, emb, config)
                grads = list(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
            gx = grads.pop(0) if need_x else None
            gemb = grads.pop(0) if need_emb else None
            return gx, gemb, None
        res, r1 = _level_params(config, x.device)
        gx, gemb = _hash_backward(x, emb, grad_out.contiguous().float(), res, r1, config, need_emb, need_x)
        return gx, gemb, None


def hash_encode_triton(x: Tensor, embeddings: Tensor, config) -> Tensor:
    """Triton hash encoding: (N, 3) in [0, 1] -> (N, levels * features), level-major.

    Same parameter layout and semantics as hash_encode_torch; differentiable in the table and,
    when x requires grad, in x.
    """
    if embeddings.shape != ((1 << config.log2_table_size) * config.levels, config.features):
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match the config")
    if x.dtype == torch.float64 or embeddings.dtype == torch.float64:
        from distill3d.representations.nerf.hash_encoding import hash_encode_torch

        return hash_encode_torch(x, embeddings, config)  # the kernels compute in float32
    return _HashEncodeFn.apply(x.float().contiguous(), embeddings.float().contiguous(), config)


# ----------------------------------------------------------------------------------------------
# Compositing
# ----------------------------------------------------------------------------------------------


# One ray per lane, one warp per program: rays of a block loop to their longest ray's count.
COMPOSITE_BLOCK_R = 32
COMPOSITE_WARPS = 1


def ray_starts_counts(ray_indices: Tensor, n_rays: int) -> tuple[Tensor, Tensor]:
    """First sample (int64) and sample count (int32) of every ray, from sorted ray indices.

    A binary search of the sorted indices: no host sync (bincount on CUDA syncs for its max).
    """
    rays = torch.arange(n_rays + 1, dtype=ray_indices.dtype, device=ray_indices.device)
    bounds = torch.searchsorted(ray_indices.contiguous(), rays)
    return bounds[:-1].contiguous(), (bounds[1:] - bounds[:-1]).to(torch.int32)


class _CompositeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigmas, rgbs, normals, deltas, t_mid, starts, counts, n_rays: int):
        device = sigmas.device
        s = sigmas.shape[0]
        has_n = normals is not None
        weights = torch.empty(s, dtype=torch.float32, device=device)
        trans = torch.empty(s, dtype=torch.float32, device=device)
        rgb = torch.empty(n_rays, 3, dtype=torch.float32, device=device)
        opacity = torch.empty(n_rays, 1, dtype=torch.float32, device=device)
        depth = torch.empty(n_rays, 1, dtype=torch.float32, device=device)
        normal = torch.empty(n_rays, 3, dtype=torch.float32, device=device) if has_n else rgb
        if n_rays > 0:
            grid = (triton_cdiv(n_rays, COMPOSITE_BLOCK_R),)
            _kernels()["composite_fwd"][grid](
                sigmas, rgbs, normals if has_n else rgbs, deltas, t_mid, starts, counts,
                weights, trans, rgb, opacity, depth, normal, n_rays,
                HAS_N=has_n, BLOCK_R=COMPOSITE_BLOCK_R, **_launch_options(device, num_warps=COMPOSITE_WARPS),
            )
        ctx.save_for_backward(sigmas, rgbs, normals if has_n else None, deltas, t_mid, starts, counts, weights, trans)
        ctx.has_n = has_n
        ctx.n_rays = n_rays
        ctx.set_materialize_grads(False)
        if has_n:
            return weights, rgb, opacity, depth, normal
        return weights, rgb, opacity, depth

    @staticmethod
    def backward(ctx, *grads):
        sigmas, rgbs, normals, deltas, t_mid, starts, counts, weights, trans = ctx.saved_tensors
        has_n, n_rays = ctx.has_n, ctx.n_rays
        g_w, g_rgb, g_op, g_depth = grads[:4]
        g_n = grads[4] if has_n else None
        need_sig, need_rgb, need_n, need_dl, need_tm = (ctx.needs_input_grad[i] for i in range(5))
        device = sigmas.device
        s = sigmas.shape[0]

        def per_ray(g, width):
            if g is None:
                return torch.zeros(n_rays, width, dtype=torch.float32, device=device)
            return g.float().contiguous()

        g_rgb, g_op, g_depth = per_ray(g_rgb, 3), per_ray(g_op, 1), per_ray(g_depth, 1)
        g_n = per_ray(g_n, 3) if has_n else g_rgb
        has_gw = g_w is not None
        g_w = g_w.float().contiguous() if has_gw else weights
        need_n = need_n and has_n
        out_sig = torch.empty(s, dtype=torch.float32, device=device)
        out_rgb = torch.empty(s, 3, dtype=torch.float32, device=device) if need_rgb else None
        out_n = torch.empty(s, 3, dtype=torch.float32, device=device) if need_n else None
        out_dl = torch.empty(s, dtype=torch.float32, device=device) if need_dl else None
        out_tm = torch.empty(s, dtype=torch.float32, device=device) if need_tm else None
        if n_rays > 0 and s > 0:
            grid = (triton_cdiv(n_rays, COMPOSITE_BLOCK_R),)
            _kernels()["composite_bwd"][grid](
                sigmas, rgbs, normals if has_n else rgbs, deltas, t_mid, starts, counts, weights, trans,
                g_w, g_rgb, g_op, g_depth, g_n,
                out_sig, out_rgb if need_rgb else out_sig, out_n if need_n else out_sig,
                out_dl if need_dl else out_sig, out_tm if need_tm else out_sig, n_rays,
                HAS_N=has_n, HAS_GW=has_gw, NEED_RGB=need_rgb, NEED_N=need_n, NEED_DL=need_dl, NEED_TM=need_tm,
                BLOCK_R=COMPOSITE_BLOCK_R, **_launch_options(device, num_warps=COMPOSITE_WARPS),
            )
        return (out_sig if need_sig else None), out_rgb, out_n, out_dl, out_tm, None, None, None


def composite_triton(sigmas: Tensor, rgbs: Tensor, samples: Samples, normals: Tensor | None = None) -> Composited:
    """Triton compositing of packed samples; same results and gradients as composite_torch.

    The kernels handle float32 (or lower) inputs with 3-channel colours and normals; anything else
    (float64, other widths) goes to composite_torch.
    """
    tensors = [sigmas, rgbs, samples.deltas, samples.t_mid] + ([normals] if normals is not None else [])
    if any(t.dtype == torch.float64 for t in tensors) or rgbs.shape[-1] != 3 or (normals is not None and normals.shape[-1] != 3):
        from distill3d.representations.nerf.rendering import composite_torch

        return composite_torch(sigmas, rgbs, samples, normals)
    n_rays = samples.n_rays
    starts, counts = ray_starts_counts(samples.ray_indices, n_rays)
    args = [
        sigmas.float().contiguous().view(-1),
        rgbs.float().contiguous(),
        normals.float().contiguous() if normals is not None else None,
        samples.deltas.float().contiguous(),
        samples.t_mid.float().contiguous(),
        starts,
        counts,
        n_rays,
    ]
    outs = _CompositeFn.apply(*args)
    if normals is not None:
        weights, rgb, opacity, depth, normal = outs
    else:
        (weights, rgb, opacity, depth), normal = outs, None
    return Composited(weights, rgb, opacity, depth, normal)


# ----------------------------------------------------------------------------------------------
# Marching
# ----------------------------------------------------------------------------------------------


MARCH_BLOCK_R = 32
MARCH_WARPS = 1


def occupancy_grid_of(occupied) -> tuple[Tensor, float] | None:
    """(bool grid (G, G, G), radius) when `occupied` is a grid occupancy the kernels can read."""
    grid = getattr(occupied, "occupied", None)
    radius = getattr(occupied, "radius", None)
    if isinstance(grid, Tensor) and grid.dim() == 3 and len(set(grid.shape)) == 1 and radius is not None:
        return grid, float(radius)
    return None


def _f32(value: float) -> float:
    return float(np.float32(value))


@lru_cache(maxsize=8)
def _addcmul_is_fused(device: str) -> bool:
    """Whether torch.addcmul(a, b, c) on `device` rounds once (a fused multiply-add) or twice.

    Compared on random float32 probes against a + b * c (two roundings) and the float64
    evaluation (one rounding, as an FMA, up to rare double-rounding ties).
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a, b, c = (torch.rand(1 << 14, device=dev, generator=g) * k for k in (3.0, 0.1, 64.0))
    result = torch.addcmul(a, b, c)
    fused = (a.double() + b.double() * c.double()).float()
    separate = a + b * c
    return int((result != fused).sum()) <= int((result != separate).sum())


@lru_cache(maxsize=64)
def _scalar_division(value: float, device: str) -> tuple[bool, float]:
    """How torch divides a float32 tensor by the Python scalar `value` on `device`.

    (True, inv) when it multiplies by a float32 reciprocal inv (CUDA does, and how it rounds inv
    has changed between torch versions), (False, 0.0) when it divides (CPU). Measured once per
    value and device, so the marcher reproduces march_torch bit for bit whatever the version.
    """
    dev = torch.device(device)
    probe = torch.cat([torch.linspace(-4.0, 4.0, 4099, device=dev), torch.linspace(1.0, 4096.0, 8191, device=dev)])
    inv = float((torch.ones(1, device=dev) / value).item())  # a * inv_b with a = 1 is inv_b itself
    if torch.equal(probe / value, probe * inv):
        return True, inv
    return False, 0.0


def march_triton(
    origins: Tensor,
    dirs: Tensor,
    near: Tensor,
    far: Tensor,
    n_samples: int,
    occupied,
    jitter: bool | Tensor,
) -> Samples:
    """Triton version of march_torch for a grid occupancy (or none); same samples, same order."""
    grid_info = occupancy_grid_of(occupied) if occupied is not None else None
    if (occupied is not None and grid_info is None) or origins.dtype == torch.float64:
        from distill3d.representations.nerf.rendering import march_torch

        return march_torch(origins, dirs, near, far, n_samples, occupied, jitter)
    device = origins.device
    n_rays = origins.shape[0]
    if isinstance(jitter, Tensor):
        jit = jitter.to(device=device, dtype=torch.float32).contiguous()
        if jit.shape != (n_rays, n_samples):
            raise ValueError(f"jitter of shape {tuple(jit.shape)}, expected {(n_rays, n_samples)}")
    elif jitter:
        # The draw march_torch makes: one row per ray that enters its bounds (far > near).
        rays_in = torch.nonzero(far > near).squeeze(1)
        draw = torch.rand(rays_in.numel(), n_samples, device=device, dtype=origins.dtype)
        jit = torch.zeros(n_rays, n_samples, device=device, dtype=torch.float32)
        jit[rays_in] = draw.float()
    else:
        jit = None
    empty = Samples(
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
        n_rays,
    )
    if n_rays == 0 or n_samples <= 0:
        return empty
    o = origins.float().contiguous()
    d = dirs.float().contiguous()
    nr = near.float().contiguous()
    fr = far.float().contiguous()
    if grid_info is not None:
        occ, radius = grid_info
        g = occ.shape[0]
        occ = occ.to(device=device, dtype=torch.bool).contiguous().view(torch.uint8)
    else:
        occ, radius, g = o, 1.0, 1
    recip_n, inv_n = _scalar_division(n_samples, str(device))
    scalars = dict(
        R=n_rays,
        n_samples=n_samples,
        n_f=float(n_samples),
        inv_n=inv_n,
        scale=_f32(0.5 * g / radius),  # OccupancyGrid.__call__: points * (0.5 g / radius) + 0.5 g
        offset=_f32(0.5 * g),
        G=g,
    )
    flags = dict(
        HAS_JIT=jit is not None,
        HAS_GRID=grid_info is not None,
        RECIP_N=recip_n,
        FMA=_addcmul_is_fused(str(device)),
        BLOCK_R=MARCH_BLOCK_R,
    )
    kernel = _kernels()["march"]
    launch = (triton_cdiv(n_rays, MARCH_BLOCK_R),)
    counts = torch.empty(n_rays, dtype=torch.int32, device=device)
    jit_arg = jit if jit is not None else o
    options = _launch_options(device, exact=True, num_warps=MARCH_WARPS)
    kernel[launch](o, d, nr, fr, jit_arg, occ, counts, counts, counts, o, o, **scalars, WRITE=False, **flags, **options)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    total = int(ends[-1])
    if total == 0:
        return empty
    offsets = ends - counts
    ray_out = torch.empty(total, dtype=torch.long, device=device)
    t_out = torch.empty(total, dtype=torch.float32, device=device)
    dt_out = torch.empty(total, dtype=torch.float32, device=device)
    kernel[launch](o, d, nr, fr, jit_arg, occ, offsets, counts, ray_out, t_out, dt_out, **scalars, WRITE=True, **flags, **options)
    return Samples(ray_out, t_out, dt_out, n_rays)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
