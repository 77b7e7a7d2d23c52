"""A DMTet SDF that puts the surface where a density field's isosurface is, off the lattice.

Seeding DMTet with sdf = density - threshold (Magic3D) keeps the sign right but not the position:
a NeRF's density jumps from ~0 to many times the threshold within a fraction of a grid cell, so
the clamped values are about +-1 at both ends of every crossing edge and marching tetrahedra puts
every surface vertex near an edge midpoint: a stair-stepped surface on the tet lattice that the
refine stage then has to undo.

Here each crossing edge of the grid (the 7 lattice directions of the Kuhn triangulation) is
bisected on the density itself to find where it crosses the threshold, the density's gradient
there gives the surface normal, and every vertex at the end of a crossing edge gets minus its
distance to that tangent plane (averaged over its crossing edges), in grid spacings. Linear
interpolation along an edge then lands on the true crossing to second order, so the seeded
surface is as smooth as the density's isosurface. Vertices away from the surface get +-band.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["redistanced_sdf", "lattice_edges"]

_OFFSETS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


def lattice_edges(m: int, inside: Tensor) -> tuple[Tensor, Tensor]:
    """Edges (a, b) of the (m^3-vertex) Kuhn tet grid whose endpoints disagree on `inside`,
    a inside and b outside. Vertex (i, j, k) has index (i m + j) m + k, as tet_grid.py."""
    idx = torch.arange(m**3, device=inside.device).view(m, m, m)
    ins = inside.view(m, m, m)
    heads, tails = [], []
    for dx, dy, dz in _OFFSETS:
        a = idx[: m - dx, : m - dy, : m - dz].reshape(-1)
        b = idx[dx:, dy:, dz:].reshape(-1)
        cross = ins.view(-1)[a] != ins.view(-1)[b]
        a, b = a[cross], b[cross]
        a_in = inside[a]
        heads.append(torch.where(a_in, a, b))
        tails.append(torch.where(a_in, b, a))
    return torch.cat(heads), torch.cat(tails)


def _chunked(fn: Callable[[Tensor], Tensor], points: Tensor, chunk: int) -> Tensor:
    return torch.cat([fn(points[i : i + chunk]).reshape(-1).float() for i in range(0, points.shape[0], chunk)]) if points.shape[0] else points.new_zeros(0)


@torch.no_grad()
def redistanced_sdf(
    positions: Tensor,
    m: int,
    inside: Tensor,
    density_fn: Callable[[Tensor], Tensor],
    threshold: float,
    spacing: float,
    band: float = 1.5,
    bisections: int = 10,
    chunk_size: int = 1 << 17,
) -> Tensor:
    """SDF (V,) in grid spacings, positive inside, for grid positions (V, 3) with m vertices a side.

    inside (V,) bool: which vertices are inside (density > threshold, cavities filled); it sets the
    sign everywhere. Values are clamped to [-band, band] and never smaller than 0.02 in magnitude.
    """
    sign = torch.where(inside, 1.0, -1.0).to(positions.dtype)
    sdf = sign * band
    a, b = lattice_edges(m, inside)
    if a.numel() == 0:
        return sdf
    lo, hi = positions[a].clone(), positions[b].clone()
    # Edges whose "inside" end is not above the threshold (filled cavities): no crossing to find.
    real = _chunked(density_fn, lo, chunk_size) > threshold
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        up = (_chunked(density_fn, mid, chunk_size) > threshold)[:, None]
        lo = torch.where(up, mid, lo)
        hi = torch.where(up, hi, mid)
    p = 0.5 * (lo + hi)
    eps = 0.25 * spacing
    offsets = torch.eye(3, device=p.device, dtype=p.dtype) * eps
    shifted = torch.cat([p[:, None] + offsets, p[:, None] - offsets], 1).reshape(-1, 3)
    d = _chunked(density_fn, shifted, chunk_size).view(-1, 2, 3)
    normal = -torch.nn.functional.normalize(d[:, 0] - d[:, 1], dim=-1, eps=1e-12)  # outward
    ends = torch.cat([a, b])
    # Signed distance (positive inside) of each endpoint to the tangent plane at the crossing.
    plane = -((positions[ends] - p.repeat(2, 1)) * normal.repeat(2, 1)).sum(-1) / spacing
    fallback = 0.5 * sign[ends]
    ok = real.repeat(2) & (plane * sign[ends] > 0)  # a plane on the wrong side of its own vertex: unreliable
    value = torch.where(ok, plane, fallback)
    total = torch.zeros_like(sdf).index_add_(0, ends, value)
    count = torch.zeros_like(sdf).index_add_(0, ends, torch.ones_like(value))
    touched = count > 0
    mean = total[touched] / count[touched]
    sdf[touched] = sign[touched] * (mean.abs().clamp(0.02, band))
    return sdf
