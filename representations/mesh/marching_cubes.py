"""Vectorised marching cubes (torch) with face-consistent triangulation, plus density-field helpers.

The case tables are not typed in: they are generated here from first principles, which also lets
ambiguous cube faces be resolved by the asymptotic decider (Nielson & Hamann 1991):

- For each cube, the inside corners (value > threshold) are marked on the cube's surface. On every
  face, the iso-line is a segment between the crossing points of the face's edges; on a face with
  two diagonally opposite inside corners (the ambiguous case), the bilinear interpolant's saddle
  value decides whether the inside corners are joined through the face or separated.
- Segments are oriented with the inside on their left seen from outside the cube, chained into
  closed loops around the cube, and each loop is fanned into triangles.
- Since both cubes sharing a face see the same four values, they make the same decision, so the
  result is watertight (every edge shared by exactly two triangles) wherever the surface does not
  leave the grid. Pad the volume with an "outside" value (`pad=True` in `extract_surface`) to
  close surfaces that touch the grid's border.

Faces come out counter-clockwise seen from outside, i.e. normals point from high values (inside)
toward low values (outside): outward for a density, use `-sdf` for a signed distance.
Vertices lie on grid edges (linear interpolation of the crossing), in world coordinates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from distill3d.engine.errors import UserError
from distill3d.representations.mesh.cavities import DEFAULT_CLOSE_GAPS, fill_cavities

__all__ = [
    "EmptySurfaceError",
    "marching_cubes",
    "auto_threshold",
    "sample_grid",
    "extract_surface",
]


class EmptySurfaceError(UserError, ValueError):
    """Nothing to mesh: no value above the threshold (or no crossing)."""


# ---------------------------------------------------------------------------------------------
# Tables. Corner c of a cell sits at offset (c & 1, c >> 1 & 1, c >> 2 & 1) along the grid axes.

_CORNER_OFFSETS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)
_EDGES: list[tuple[int, int, int]] = []  # (corner a, corner b, axis) with b = a | 1 << axis
_EDGE_OF: dict[tuple[int, int], int] = {}
for _axis in range(3):
    for _c in range(8):
        if not (_c >> _axis) & 1:
            _EDGE_OF[(_c, _c | (1 << _axis))] = len(_EDGES)
            _EDGES.append((_c, _c | (1 << _axis), _axis))
_FACES: list[tuple[int, int, list[int]]] = []  # (axis, side, four corners in cyclic order)
for _axis in range(3):
    _u, _v = (_axis + 1) % 3, (_axis + 2) % 3
    for _side in (0, 1):
        _FACES.append((_axis, _side, [(_side << _axis) | (bu << _u) | (bv << _v) for bu, bv in ((0, 0), (1, 0), (1, 1), (0, 1))]))
_FACE_CORNERS = torch.tensor([f[2] for f in _FACES], dtype=torch.int64)  # (6, 4)
_EDGE_BASE = torch.tensor([[*_CORNER_OFFSETS[a], axis] for a, _, axis in _EDGES], dtype=torch.int64)  # (12, 4)
_MAX_TRIS = 12


def _edge(a: int, b: int) -> int:
    return _EDGE_OF[(min(a, b), max(a, b))]


def _triangulate(key: int) -> list[tuple[int, int, int]]:
    """Triangles (cell edge indices) for an 8-bit inside mask plus 6 face-join bits."""
    case, join_bits = key & 255, key >> 8
    inside = [(case >> c) & 1 for c in range(8)]
    corner = _CORNER_OFFSETS.astype(np.float64)
    mid = {e: 0.5 * (corner[a] + corner[b]) for e, (a, b, _) in enumerate(_EDGES)}
    nxt: dict[int, int] = {}
    for f, (axis, side, cs) in enumerate(_FACES):
        normal = np.zeros(3)
        normal[axis] = 2 * side - 1
        ins = [inside[c] for c in cs]
        crossings = [i for i in range(4) if ins[i] != ins[(i + 1) % 4]]
        segments = []  # (edge p, edge q, reference corner, reference corner lies on the inside side)
        if len(crossings) == 2:
            i, j = crossings
            ref = next(c for c in cs if inside[c])
            segments.append((_edge(cs[i], cs[(i + 1) % 4]), _edge(cs[j], cs[(j + 1) % 4]), ref, True))
        elif len(crossings) == 4:
            join = (join_bits >> f) & 1
            for i in range(4):
                if (ins[i] == 0) if join else (ins[i] == 1):  # cut off this corner
                    segments.append((_edge(cs[i - 1], cs[i]), _edge(cs[i], cs[(i + 1) % 4]), cs[i], bool(ins[i])))
        for p, q, ref, ref_inside in segments:
            side_sign = np.dot(normal, np.cross(mid[q] - mid[p], corner[ref] - mid[p]))
            if (side_sign > 0) != ref_inside:
                p, q = q, p
            assert p not in nxt, "inconsistent marching cubes segment chain"
            nxt[p] = q
    tris = []
    while nxt:
        start = next(iter(nxt))
        loop = [start]
        e = nxt.pop(start)
        while e != start:
            loop.append(e)
            e = nxt.pop(e)
        # The loop runs counter-clockwise around the inside region seen from outside the cube, so
        # its right-hand normal points into the inside: reverse for outward-facing triangles.
        for i in range(1, len(loop) - 1):
            tris.append((loop[0], loop[i + 1], loop[i]))
    return tris


_TABLE_CACHE: dict[int, Tensor] = {}


def _table_rows(keys: Tensor) -> Tensor:
    """(K, _MAX_TRIS, 3) edge indices (-1 padded) for unique keys, generated on first use."""
    rows = []
    for k in keys.tolist():
        row = _TABLE_CACHE.get(k)
        if row is None:
            tris = _triangulate(k)
            assert len(tris) <= _MAX_TRIS
            row = torch.full((_MAX_TRIS, 3), -1, dtype=torch.int64)
            if tris:
                row[: len(tris)] = torch.tensor(tris, dtype=torch.int64)
            _TABLE_CACHE[k] = row
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, _MAX_TRIS, 3, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------


def _bounds_tensor(bounds, device) -> Tensor:
    b = torch.as_tensor(bounds, dtype=torch.float64, device=device).reshape(2, 3)
    if not (b[1] > b[0]).all():
        raise ValueError(f"bounds must be (min xyz, max xyz) with max > min, got {b.tolist()}")
    return b


def marching_cubes(volume: Tensor | np.ndarray, threshold: float, bounds: Sequence | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Iso-surface {volume = threshold} of a (X, Y, Z) grid; inside is where volume > threshold.

    The grid point [i, j, k] sits at bounds_min + (i, j, k) / (shape - 1) * (bounds_max - bounds_min)
    (x along the first axis); bounds default to the index space [0, shape - 1].
    Returns vertices (V, 3) float32 and faces (F, 3) int64, counter-clockwise from outside (normals
    toward lower values). Empty tensors when the surface does not cross the grid.
    """
    vol = torch.as_tensor(volume)
    if vol.dim() != 3 or min(vol.shape) < 2:
        raise ValueError(f"volume must be a 3D grid of at least 2^3 values, got shape {tuple(vol.shape)}")
    vol = vol.to(torch.float32)
    if not torch.isfinite(vol).all():
        vol = torch.nan_to_num(vol, nan=float("-inf")).clamp(-3.0e38, 3.0e38)
    device = vol.device
    X, Y, Z = vol.shape
    thr = float(threshold)
    ins = (vol > thr).to(torch.uint8)
    # Case index of every cell from its 8 corners (uint8 keeps the passes over the grid cheap).
    case = torch.zeros(X - 1, Y - 1, Z - 1, dtype=torch.uint8, device=device)
    for c, (dx, dy, dz) in enumerate(_CORNER_OFFSETS.tolist()):
        case.add_(ins[dx : X - 1 + dx, dy : Y - 1 + dy, dz : Z - 1 + dz], alpha=1 << c) if c < 7 else case.add_(ins[dx:, dy:, dz:].mul(128))
    active = torch.nonzero((case != 0) & (case != 255))
    empty = (torch.zeros(0, 3, dtype=torch.float32, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device))
    if active.numel() == 0:
        return empty
    ci, cj, ck = active.unbind(1)
    cell_case = case[ci, cj, ck].to(torch.int64)
    offs = torch.as_tensor(_CORNER_OFFSETS, device=device)
    corner_vals = vol[ci[:, None] + offs[:, 0], cj[:, None] + offs[:, 1], ck[:, None] + offs[:, 2]] - thr  # (K, 8)
    # Asymptotic decider on the ambiguous faces: join the inside corners if the saddle is inside.
    g = corner_vals[:, _FACE_CORNERS.to(device)].double()  # (K, 6, 4) cyclic order
    gin = g > 0
    ambiguous = (gin[..., 0] == gin[..., 2]) & (gin[..., 1] == gin[..., 3]) & (gin[..., 0] != gin[..., 1])
    denom = g[..., 0] + g[..., 2] - g[..., 1] - g[..., 3]
    saddle = (g[..., 0] * g[..., 2] - g[..., 1] * g[..., 3]) / torch.where(denom == 0, torch.ones_like(denom), denom)
    join = ambiguous & (saddle > 0)
    key = cell_case | (join.to(torch.int64) << torch.arange(6, device=device) + 8).sum(-1)
    ukeys, inv = torch.unique(key, return_inverse=True)
    tris = _table_rows(ukeys.cpu()).to(device)[inv]  # (K, T, 3) cell edge indices
    valid = tris[..., 0] >= 0
    cell_of = torch.arange(len(active), device=device)[:, None].expand_as(valid)[valid]
    tri_edges = tris[valid]  # (Ft, 3)
    # Global id of every used grid edge: axis * X*Y*Z + linear index of its lower grid point.
    eb = _EDGE_BASE.to(device)[tri_edges]  # (Ft, 3, 4)
    gi = ci[cell_of][:, None] + eb[..., 0]
    gj = cj[cell_of][:, None] + eb[..., 1]
    gk = ck[cell_of][:, None] + eb[..., 2]
    gid = eb[..., 3] * (X * Y * Z) + (gi * Y + gj) * Z + gk
    uid, faces = torch.unique(gid.reshape(-1), return_inverse=True)
    faces = faces.reshape(-1, 3)
    axis = torch.div(uid, X * Y * Z, rounding_mode="floor")
    lin = uid - axis * (X * Y * Z)
    pi = torch.div(lin, Y * Z, rounding_mode="floor")
    pj = torch.div(lin - pi * Y * Z, Z, rounding_mode="floor")
    pk = lin - pi * Y * Z - pj * Z
    p0 = torch.stack([pi, pj, pk], -1)
    p1 = p0 + torch.nn.functional.one_hot(axis, 3)
    f0 = vol[p0[:, 0], p0[:, 1], p0[:, 2]].double()
    f1 = vol[p1[:, 0], p1[:, 1], p1[:, 2]].double()
    t = ((thr - f0) / (f1 - f0)).clamp(0.0, 1.0)
    pos = p0.double() + t[:, None] * (p1 - p0).double()
    if bounds is not None:
        b = _bounds_tensor(bounds, device)
        scale = (b[1] - b[0]) / torch.tensor([X - 1, Y - 1, Z - 1], dtype=torch.float64, device=device)
        pos = b[0] + pos * scale
    return pos.to(torch.float32), faces


def auto_threshold(values: Tensor) -> float:
    """The references' "auto" iso-level: the mean of the positive densities."""
    pos = values[values > 0]
    if pos.numel() == 0:
        raise EmptySurfaceError("cannot choose a threshold automatically: the density is nowhere positive (empty scene)")
    return float(pos.double().mean())


@torch.no_grad()
def sample_grid(fn: Callable[[Tensor], Tensor], bounds, resolution: int, chunk_size: int = 1 << 18, device=None) -> Tensor:
    """Evaluate fn(points (N, 3)) -> (N,) on a resolution^3 grid spanning bounds, chunk by chunk."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    b = _bounds_tensor(bounds, device).float()
    axes = [torch.linspace(float(b[0, i]), float(b[1, i]), resolution, device=device) for i in range(3)]
    out = torch.empty(resolution**3, dtype=torch.float32, device=device)
    n_yz = resolution * resolution
    gy, gz = torch.meshgrid(axes[1], axes[2], indexing="ij")
    plane = torch.stack([gy.reshape(-1), gz.reshape(-1)], -1)  # (R^2, 2)
    rows = max(1, chunk_size // n_yz)
    for i0 in range(0, resolution, rows):
        xs = axes[0][i0 : i0 + rows]
        pts = torch.cat([xs.repeat_interleave(n_yz)[:, None], plane.repeat(len(xs), 1)], -1)
        vals = fn(pts)
        out[i0 * n_yz : (i0 + len(xs)) * n_yz] = vals.reshape(-1).float()
    return out.reshape(resolution, resolution, resolution)


def extract_surface(
    density: Tensor | Callable[[Tensor], Tensor],
    bounds=((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)),
    resolution: int = 128,
    threshold: float | str = "auto",
    pad: bool = True,
    chunk_size: int = 1 << 18,
    solid: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Mesh the region where a density exceeds a threshold.

    density: a (R, R, R) grid over bounds, or a function points (N, 3) -> (N,) sampled on a
    resolution^3 grid. threshold: a number or "auto" (mean positive density). pad: surround the grid
    with an outside layer so surfaces touching the border come out closed. solid: fill enclosed
    cavities first (see cavities.py), so only the outer surface is meshed.
    Returns (vertices, faces, threshold used). Raises EmptySurfaceError when nothing is above it.
    """
    grid = density if isinstance(density, Tensor) else sample_grid(density, bounds, resolution, chunk_size)
    grid = grid.float()
    if grid.dim() != 3:
        raise ValueError(f"density grid must be 3D, got shape {tuple(grid.shape)}")
    finite = grid[torch.isfinite(grid)]
    if finite.numel() == 0:
        raise EmptySurfaceError("the density is not finite anywhere")
    thr = auto_threshold(finite) if threshold == "auto" else float(threshold)
    vmax = float(finite.max())
    if not vmax > thr:
        raise EmptySurfaceError(f"empty surface: no density above the threshold {thr:.4g} (max density {vmax:.4g}); nothing to export")
    if solid:
        above = grid > thr
        cavity = fill_cavities(above, DEFAULT_CLOSE_GAPS) & ~above
        grid = grid.masked_fill(cavity, vmax)
    b = _bounds_tensor(bounds, grid.device)
    if pad:
        step = (b[1] - b[0]) / torch.tensor(list(grid.shape), dtype=torch.float64, device=grid.device).sub(1)
        low = min(float(finite.min()), thr) - 1.0
        grid = torch.nn.functional.pad(grid[None, None], (1, 1, 1, 1, 1, 1), value=low)[0, 0]
        b = torch.stack([b[0] - step, b[1] + step])
    verts, faces = marching_cubes(grid, thr, b)
    if faces.shape[0] == 0:
        raise EmptySurfaceError(f"empty surface: the density never crosses the threshold {thr:.4g}")
    return verts, faces, thr
