"""Differentiable triangle rasterizer: a pure-torch reference that runs everywhere, nvdiffrast on CUDA.

Small functional API (nvdiffrast/gsplat style):

    verts_clip = project(vertices, cameras.mvp(aspect=W / H))     # (B, V, 4) clip space
    frags = rasterize(verts_clip, faces, H, W)                    # visibility + barycentrics
    color = interpolate(vertex_colors, frags, faces)              # (B, H, W, C)
    color = antialias(color, frags, verts_clip, faces)            # silhouette gradients

Conventions (the same as engine/cameras.py `pixel_rays`):
- Clip space is OpenGL's (x right, y up, visible where -w <= x, y, z <= w).
- Pixel (row i, column j) has its centre at NDC x = 2 (j + 0.5) / W - 1, y = 1 - 2 (i + 0.5) / H:
  image row 0 is at the top.
- `Fragments.bary[..., k]` is the perspective-correct barycentric weight of vertex k of the face, i.e.
  the weight that interpolates any attribute linear in world space (positions, UVs, colours).
- No face culling; the depth test keeps the smallest z/w; exact depth ties go to the lower face index.

Gradients. The visibility decision (which face covers a pixel) is piecewise constant. Inside faces,
barycentrics are recomputed differentiably from the clip-space vertices, so interpolated attributes
carry gradients to vertex positions (and to the attributes). Gradients at silhouettes come from
`antialias`, an nvdiffrast-style *analytic* antialiasing: for every pair of neighbouring pixels whose
faces differ across a silhouette edge, the colour of one pixel is blended with the other's by the
fraction of the pixel the front surface covers, computed from where the edge crosses the segment
between the two pixel centres. Only the direction (horizontal or vertical) more perpendicular to the
edge is used, so the blended coverage changes to first order like the true covered area when the
edge moves. An edge is a silhouette when it is a boundary edge or its neighbouring face faces the
other way on screen (or is clipped by the near plane).

Backends: op "rasterize" in distill3d.engine.backends ("torch" always, "nvdiffrast" on CUDA when
`nvdiffrast.torch` imports). `rasterize(..., backend="auto")` picks; `interpolate` is shared and
`antialias` uses the kernel of whichever backend produced the fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Fragments",
    "project",
    "rasterize",
    "rasterize_torch",
    "interpolate",
    "antialias",
    "antialias_torch",
    "face_adjacency",
]

_INT64_MAX = torch.iinfo(torch.int64).max
_W_EPS = 1e-8
# Number of (face, candidate pixel) pairs tested at once; bounds peak memory (about 120 bytes/pair).
_MAX_PAIRS = 1 << 21


@dataclass
class Fragments:
    """What the rasterizer found at every pixel."""

    triangle_id: Tensor  # (B, H, W) int64 index into faces, -1 where no face covers the pixel
    bary: Tensor  # (B, H, W, 3) perspective-correct barycentrics, 0 where empty; differentiable
    depth: Tensor  # (B, H, W) NDC depth z/w in [-1, 1] of the visible surface, 0 where empty
    backend: str = "torch"
    extras: dict[str, Any] = field(default_factory=dict)  # backend-specific (nvdiffrast rast output)

    @property
    def mask(self) -> Tensor:
        """(B, H, W) bool: pixel covered by a face."""
        return self.triangle_id >= 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.triangle_id.shape)


def project(vertices: Tensor, mvp: Tensor) -> Tensor:
    """World-space vertices (V, 3) or (B, V, 3) to clip space (B, V, 4) with mvp (B, 4, 4)."""
    if vertices.dim() == 2:
        vertices = vertices.unsqueeze(0).expand(mvp.shape[0], -1, -1)
    homo = torch.cat([vertices, torch.ones_like(vertices[..., :1])], dim=-1)
    return torch.einsum("bij,bvj->bvi", mvp.to(vertices.dtype), homo)


def _check(verts_clip: Tensor, faces: Tensor) -> None:
    if verts_clip.dim() != 3 or verts_clip.shape[-1] != 4:
        raise ValueError(f"verts_clip must be (B, V, 4) clip-space positions, got {tuple(verts_clip.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3) vertex indices, got {tuple(faces.shape)}")
    if faces.dtype.is_floating_point:
        raise ValueError("faces must be an integer tensor")


def _pixel_ndc(height: int, width: int, device) -> tuple[Tensor, Tensor]:
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    y = 1.0 - (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height)
    return x, y


def _edge_coefficients(X: Tensor, Y: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Homogeneous 2D edge functions (Olano & Greer): c_k(x, y) = A_k + Bx_k x + By_k y.

    For a pixel at NDC (x, y), c = (X - x W) x (Y - y W) over the three vertices; bary = c / sum(c) are
    the perspective-correct barycentrics of the point of the face's plane seen through the pixel. No
    clipping is needed: faces crossing w = 0 are handled by testing that the point has w > 0.
    """
    X1, X2 = X.roll(-1, -1), X.roll(-2, -1)  # vertex k+1, k+2 for component k
    Y1, Y2 = Y.roll(-1, -1), Y.roll(-2, -1)
    W1, W2 = W.roll(-1, -1), W.roll(-2, -1)
    A = X1 * Y2 - X2 * Y1
    Bx = Y1 * W2 - Y2 * W1
    By = X2 * W1 - X1 * W2
    return A, Bx, By


@torch.no_grad()
def _visibility(verts_clip: Tensor, faces: Tensor, height: int, width: int) -> Tensor:
    """Z-buffer: (B*H*W,) int64 keys (depth bits << 32 | face index), INT64_MAX where empty."""
    B = verts_clip.shape[0]
    F = faces.shape[0]
    device = verts_clip.device
    zbuf = torch.full((B * height * width,), _INT64_MAX, dtype=torch.int64, device=device)
    if F == 0:
        return zbuf
    tri = verts_clip.detach().float()[:, faces]  # (B, F, 3, 4)
    X, Y, Z, W = tri.unbind(-1)  # (B, F, 3)
    front = W > _W_EPS
    all_front = front.all(-1)
    any_front = front.any(-1)
    # Trivial frustum rejection against each clip plane (all three vertices outside one plane).
    outside = ((X > W).all(-1) | (X < -W).all(-1) | (Y > W).all(-1) | (Y < -W).all(-1) | (Z > W).all(-1) | (Z < -W).all(-1))
    keep = any_front & ~outside
    # Screen bounding boxes in pixel units; faces crossing w = 0 test the whole screen.
    Wc = W.clamp_min(_W_EPS)
    px = (X / Wc + 1.0) * (0.5 * width)
    py = (1.0 - Y / Wc) * (0.5 * height)
    x0 = torch.ceil(px.amin(-1) - 0.5).clamp(0, width).long()
    x1 = torch.floor(px.amax(-1) - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(py.amin(-1) - 0.5).clamp(0, height).long()
    y1 = torch.floor(py.amax(-1) - 0.5).clamp(-1, height - 1).long()
    partial = ~all_front
    x0 = torch.where(partial, torch.zeros_like(x0), x0)
    y0 = torch.where(partial, torch.zeros_like(y0), y0)
    x1 = torch.where(partial, torch.full_like(x1, width - 1), x1)
    y1 = torch.where(partial, torch.full_like(y1, height - 1), y1)
    bw = (x1 - x0 + 1).clamp_min(0)
    bh = (y1 - y0 + 1).clamp_min(0)
    count = torch.where(keep, bw * bh, torch.zeros_like(bw)).reshape(-1)  # (B*F,)

    sel = torch.nonzero(count > 0).squeeze(1)
    if sel.numel() == 0:
        return zbuf
    A, Bx, By = _edge_coefficients(X, Y, W)
    table = torch.cat([A, Bx, By, Z, W], dim=-1).reshape(B * F, 15)[sel]  # per selected face
    count = count[sel]
    csum = torch.cumsum(count, 0)
    start = csum - count
    # Per-face integer data, expanded to pairs with repeat_interleave (sequential copies, cheaper
    # than gathers): start of the face's pairs, bbox origin and width, pixel-index base, face id.
    itab = torch.stack(
        [start, x0.reshape(-1)[sel], y0.reshape(-1)[sel], bw.reshape(-1)[sel], torch.div(sel, F, rounding_mode="floor") * (height * width), sel % F], dim=1
    )

    # Chunks of whole faces whose pair counts add up to at most _MAX_PAIRS (a face alone may exceed it).
    n_sel = sel.numel()
    lo = 0
    while lo < n_sel:
        base = int(start[lo])
        hi = int(torch.searchsorted(csum, torch.tensor(base + _MAX_PAIRS, device=device), right=True))
        hi = max(hi, lo + 1)
        cnt = count[lo:hi]
        total = int(csum[hi - 1]) - base
        it = itab[lo:hi].repeat_interleave(cnt, dim=0, output_size=total)
        t = table[lo:hi].repeat_interleave(cnt, dim=0, output_size=total)
        local = torch.arange(base, base + total, device=device) - it[:, 0]
        pyl = torch.div(local, it[:, 3], rounding_mode="floor")
        pxi = it[:, 1] + local - pyl * it[:, 3]
        pyi = it[:, 2] + pyl
        xs = pxi.float().mul_(2.0 / width).add_(1.0 / width - 1.0)
        ys = pyi.float().mul_(-2.0 / height).add_(1.0 - 1.0 / height)
        c0 = t[:, 0] + t[:, 3] * xs + t[:, 6] * ys
        c1 = t[:, 1] + t[:, 4] * xs + t[:, 7] * ys
        c2 = t[:, 2] + t[:, 5] * xs + t[:, 8] * ys
        s = c0 + c1 + c2
        wn = c0 * t[:, 12] + c1 * t[:, 13] + c2 * t[:, 14]  # s * (w of the point)
        zn = c0 * t[:, 9] + c1 * t[:, 10] + c2 * t[:, 11]  # s * (z of the point)
        inside = (c0 * s >= 0) & (c1 * s >= 0) & (c2 * s >= 0) & (s != 0) & (wn * s > 0)
        idx = torch.nonzero(inside).squeeze(1)
        if idx.numel():
            depth = zn[idx] / wn[idx]
            ok = (depth >= -1.0) & (depth <= 1.0)
            idx, depth = idx[ok], depth[ok]
            iti = it[idx]
            pix = iti[:, 4] + pyi[idx] * width + pxi[idx]
            d01 = ((depth + 1.0) * 0.5).clamp(0.0, 1.0).contiguous()
            key = (d01.view(torch.int32).to(torch.int64) << 32) | iti[:, 5]
            zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        lo = hi
    return zbuf


def _barycentrics(verts_clip: Tensor, faces: Tensor, triangle_id: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Differentiable perspective-correct barycentrics and z/w at covered pixels (zeros elsewhere)."""
    B = verts_clip.shape[0]
    flat_tid = triangle_id.reshape(-1)
    pix = torch.nonzero(flat_tid >= 0).squeeze(1)
    n = B * height * width
    bary = verts_clip.new_zeros(n, 3)
    depth = verts_clip.new_zeros(n)
    if pix.numel() == 0:
        return bary.reshape(B, height, width, 3), depth.reshape(B, height, width)
    b = torch.div(pix, height * width, rounding_mode="floor")
    rem = pix - b * (height * width)
    row = torch.div(rem, width, rounding_mode="floor")
    col = rem - row * width
    xs = (col.to(verts_clip.dtype) + 0.5) * (2.0 / width) - 1.0
    ys = 1.0 - (row.to(verts_clip.dtype) + 0.5) * (2.0 / height)
    fv = faces[flat_tid[pix]]  # (P, 3)
    tri = verts_clip[b[:, None], fv]  # (P, 3, 4)
    X, Y, Z, W = tri.unbind(-1)
    A, Bx, By = _edge_coefficients(X, Y, W)
    c = A + Bx * xs[:, None] + By * ys[:, None]
    s = c.sum(-1, keepdim=True)
    s = torch.where(s == 0, torch.ones_like(s), s)
    bc = c / s
    zw = (bc * Z).sum(-1) / (bc * W).sum(-1).clamp_min(_W_EPS)
    bary = bary.index_put((pix,), bc)
    depth = depth.index_put((pix,), zw)
    return bary.reshape(B, height, width, 3), depth.reshape(B, height, width)


def rasterize_torch(verts_clip: Tensor, faces: Tensor, height: int, width: int) -> Fragments:
    """Pure-torch rasterizer (the reference backend). verts_clip (B, V, 4), faces (F, 3)."""
    _check(verts_clip, faces)
    faces = faces.to(device=verts_clip.device, dtype=torch.int64)
    zbuf = _visibility(verts_clip, faces, height, width)
    empty = zbuf == _INT64_MAX
    tid = torch.where(empty, torch.full_like(zbuf, -1), zbuf & 0xFFFFFFFF)
    tid = tid.reshape(verts_clip.shape[0], height, width)
    bary, depth = _barycentrics(verts_clip, faces, tid, height, width)
    return Fragments(tid, bary, depth, backend="torch")


def rasterize(verts_clip: Tensor, faces: Tensor, height: int, width: int, backend: str = "auto") -> Fragments:
    """Rasterize faces (F, 3) of clip-space vertices (B, V, 4) into (B, height, width) fragments.

    backend: "auto" (nvdiffrast on CUDA when installed, else torch), "torch" or "nvdiffrast".
    """
    from distill3d.engine.backends import resolve_op

    _check(verts_clip, faces)
    return resolve_op("rasterize", backend, verts_clip.device)(verts_clip, faces, height, width)


def interpolate(attr: Tensor, fragments: Fragments, faces: Tensor) -> Tensor:
    """Interpolate vertex attributes (V, C) or (B, V, C) at every pixel: (B, H, W, C), 0 where empty.

    Differentiable w.r.t. the attributes and (through the barycentrics) the vertex positions.
    """
    tid = fragments.triangle_id
    B, H, W = tid.shape
    faces = faces.to(device=tid.device, dtype=torch.int64)
    fv = faces[tid.clamp_min(0).reshape(-1)]  # (B*H*W, 3)
    if attr.dim() == 2:
        vals = attr[fv]  # (N, 3, C)
    elif attr.dim() == 3:
        if attr.shape[0] not in (1, B):
            raise ValueError(f"attr batch {attr.shape[0]} does not match fragments batch {B}")
        if attr.shape[0] == 1:
            vals = attr[0][fv]
        else:
            bidx = torch.arange(B, device=tid.device).repeat_interleave(H * W)
            vals = attr[bidx[:, None], fv]
    else:
        raise ValueError(f"attr must be (V, C) or (B, V, C), got {tuple(attr.shape)}")
    bary = fragments.bary.reshape(-1, 3, 1).to(vals.dtype)
    return (vals * bary).sum(1).reshape(B, H, W, -1)


# ----------------------------------------------------------------------------------------------
# Antialiasing (silhouette gradients)

_ADJ_CACHE: list[tuple[Tensor, Tensor]] = []  # (faces copy, adjacency), most recent last


def face_adjacency(faces: Tensor) -> Tensor:
    """(F, 3) index of the face across edge k = (v_k, v_{k+1}) of each face, -1 on boundary edges.

    Non-manifold edges (more than two faces) pair faces arbitrarily. The last few results are
    cached by content (a changing topology, as in DMTet, is recomputed).
    """
    for cached_faces, cached_adj in _ADJ_CACHE:
        if cached_faces.shape == faces.shape and cached_faces.device == faces.device and torch.equal(cached_faces, faces):
            return cached_adj
    f = faces.to(torch.int64)
    F = f.shape[0]
    a = f
    b = f.roll(-1, dims=1)
    lo, hi = torch.minimum(a, b).reshape(-1), torch.maximum(a, b).reshape(-1)
    nv = int(f.max()) + 1 if F else 1
    ekey = lo * nv + hi
    order = torch.argsort(ekey, stable=True)
    sk = ekey[order]
    adj = torch.full((F * 3,), -1, dtype=torch.int64, device=faces.device)
    if F:
        same = sk[1:] == sk[:-1]
        i = torch.nonzero(same).squeeze(1)
        e0, e1 = order[i], order[i + 1]
        # e1 is written first so that in runs of 3+ the middle edge points at its predecessor.
        adj[e1] = torch.div(e0, 3, rounding_mode="floor")
        adj[e0] = torch.div(e1, 3, rounding_mode="floor")
    adj = adj.reshape(F, 3)
    _ADJ_CACHE.append((faces.detach().clone(), adj))
    del _ADJ_CACHE[:-4]
    return adj


def _cross2(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def antialias_torch(color: Tensor, fragments: Fragments, verts_clip: Tensor, faces: Tensor, adjacency: Tensor | None = None) -> Tensor:
    """Analytic silhouette antialiasing of color (B, H, W, C); see the module docstring."""
    tid = fragments.triangle_id
    B, H, W = tid.shape
    faces = faces.to(device=tid.device, dtype=torch.int64)
    adj = face_adjacency(faces) if adjacency is None else adjacency
    depth = fragments.depth.detach()
    # Screen positions in pixel units (differentiable) and w, per batch and vertex.
    w = verts_clip[..., 3]
    wc = torch.where(w.abs() > _W_EPS, w, torch.full_like(w, _W_EPS))
    sx = (verts_clip[..., 0] / wc + 1.0) * (0.5 * W)
    sy = (1.0 - verts_clip[..., 1] / wc) * (0.5 * H)
    screen = torch.stack([sx, sy], dim=-1)  # (B, V, 2)
    front_ok = (w.detach() > _W_EPS)  # (B, V)

    idx_all, delta_all = [], []
    for horizontal in (True, False):
        if horizontal:
            tp, tq = tid[:, :, :-1], tid[:, :, 1:]
            dp, dq = depth[:, :, :-1], depth[:, :, 1:]
        else:
            tp, tq = tid[:, :-1, :], tid[:, 1:, :]
            dp, dq = depth[:, :-1, :], depth[:, 1:, :]
        cand = torch.nonzero((tp != tq).reshape(-1)).squeeze(1)
        if cand.numel() == 0:
            continue
        inner_w = W - 1 if horizontal else W
        inner_h = H if horizontal else H - 1
        bb = torch.div(cand, inner_h * inner_w, rounding_mode="floor")
        rem = cand - bb * inner_h * inner_w
        yy = torch.div(rem, inner_w, rounding_mode="floor")
        xx = rem - yy * inner_w
        ty = yy + (0 if horizontal else 1)
        tx = xx + (1 if horizontal else 0)
        t_p, t_q = tp.reshape(-1)[cand], tq.reshape(-1)[cand]
        d_p, d_q = dp.reshape(-1)[cand], dq.reshape(-1)[cand]
        p_front = (t_q < 0) | ((t_p >= 0) & (d_p <= d_q))
        T = torch.where(p_front, t_p, t_q)
        fy = torch.where(p_front, yy, ty)
        fx = torch.where(p_front, xx, tx)
        oy = torch.where(p_front, ty, yy)
        ox = torch.where(p_front, tx, xx)
        fv = faces[T]  # (n, 3)
        S = screen[bb[:, None], fv]  # (n, 3, 2) differentiable
        Sd = S.detach()
        pf = torch.stack([fx, fy], -1).to(S.dtype) + 0.5
        po = torch.stack([ox, oy], -1).to(S.dtype) + 0.5
        area = _cross2(Sd[:, 1] - Sd[:, 0], Sd[:, 2] - Sd[:, 0])
        sgn = torch.where(area >= 0, 1.0, -1.0).to(S.dtype)
        a = S
        e = S.roll(-1, dims=1) - S  # edge k: vertex k -> k+1
        Ef = _cross2(e, pf[:, None] - a) * sgn[:, None]  # (n, 3)
        Eo = _cross2(e, po[:, None] - a) * sgn[:, None]
        Efd, Eod = Ef.detach(), Eo.detach()
        crossing = (Eod < 0) & (Efd >= 0)
        t_all = torch.where(crossing, Efd / (Efd - Eod).clamp_min(1e-20), torch.full_like(Efd, float("inf")))
        k = t_all.argmin(-1)
        valid = crossing.any(-1)
        # Silhouette test on the crossed edge.
        nb = adj[T, k]
        nb_c = nb.clamp_min(0)
        Sn = screen.detach()[bb[:, None], faces[nb_c]]
        area_n = _cross2(Sn[:, 1] - Sn[:, 0], Sn[:, 2] - Sn[:, 0])
        nb_front = front_ok[bb[:, None], faces[nb_c]].all(-1)
        silhouette = (nb < 0) | ((area_n >= 0) != (area >= 0)) | ~nb_front
        ek = e.detach()[torch.arange(k.numel(), device=k.device), k]
        steep = ek[:, 1].abs() >= ek[:, 0].abs()  # edge more vertical than horizontal
        direction_ok = steep if horizontal else ~steep
        tri_front = front_ok[bb[:, None], fv].all(-1)
        keep = valid & silhouette & direction_ok & tri_front
        sel = torch.nonzero(keep).squeeze(1)
        if sel.numel() == 0:
            continue
        ks = k[sel]
        Efk = Ef[sel, ks]
        Eok = Eo[sel, ks]
        t = Efk / (Efk - Eok)  # crossing position from the front pixel (0) to the other (1)
        bsel = bb[sel]
        cf = color[bsel, fy[sel], fx[sel]]
        co = color[bsel, oy[sel], ox[sel]]
        beyond = (t.detach() > 0.5)[:, None]
        # Front surface reaches into the other pixel: it gains (t - 0.5) of the front colour;
        # else the front pixel loses (0.5 - t) of its coverage to the other pixel's colour.
        delta = torch.where(beyond, (t - 0.5)[:, None] * (cf - co), (0.5 - t)[:, None] * (co - cf))
        ty_ = torch.where(beyond[:, 0], oy[sel], fy[sel])
        tx_ = torch.where(beyond[:, 0], ox[sel], fx[sel])
        idx_all.append((bsel * H + ty_) * W + tx_)
        delta_all.append(delta)
    if not idx_all:
        return color
    idx = torch.cat(idx_all)
    delta = torch.cat(delta_all).to(color.dtype)
    flat = color.reshape(B * H * W, -1)
    flat = flat.index_put((idx,), delta, accumulate=True)
    return flat.reshape(color.shape)


def antialias(color: Tensor, fragments: Fragments, verts_clip: Tensor, faces: Tensor) -> Tensor:
    """Silhouette antialiasing with gradients to vertex positions, by the fragments' backend."""
    if fragments.backend == "nvdiffrast":
        from distill3d.representations.mesh.backends import nvdiffrast_antialias

        return nvdiffrast_antialias(color, fragments, verts_clip, faces)
    return antialias_torch(color, fragments, verts_clip, faces)
