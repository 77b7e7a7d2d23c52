"""Tetrahedral grid of the cube [-r, r]^3: every cube cell split into 6 tetrahedra around its main
diagonal (Kuhn / Freudenthal triangulation).

With the same diagonal direction in every cell the split is conforming (neighbouring cells agree on
the triangulation of their shared square), so marching tetrahedra on it gives watertight surfaces.
All tetrahedra are positively oriented: det(v1 - v0, v2 - v0, v3 - v0) > 0.

Sizes: (N + 1)^3 vertices and 6 N^3 tetrahedra (N = cells per side): 2.1 M vertices and 12.6 M
tetrahedra at N = 128 (about 200 MB of int32 indices), 17 M and 101 M at N = 256 (about 1.6 GB).
Indices are int32 (every index fits up to N = 512), half the memory of int64; marching_tets
widens only the few straddling tetrahedra it works on.
Grids are generated with vectorised torch, cached in memory, and cached on disk (int32 indices,
written atomically) under `cache_dir/tet_grids/tets_{N}.pt`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["tet_grid", "unit_tet_grid", "tet_volumes", "default_cache_dir", "clear_memory_cache"]

MIN_RESOLUTION, MAX_RESOLUTION = 1, 512
_MEMORY: dict[int, tuple[Tensor, Tensor]] = {}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILL3D_CACHE", Path.home() / ".cache" / "distill3d"))


def clear_memory_cache() -> None:
    _MEMORY.clear()


def _template() -> Tensor:
    """(6, 4, 3) corner offsets of the 6 tetrahedra of the unit cube, each positively oriented."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = [0, 0, 0]
        verts = [tuple(corner)]
        for axis in perm:
            corner[axis] = 1
            verts.append(tuple(corner))
        t = torch.tensor(verts, dtype=torch.float64)
        if torch.linalg.det(t[1:] - t[0]) < 0:
            verts[1], verts[2] = verts[2], verts[1]
        tets.append(verts)
    return torch.tensor(tets, dtype=torch.int64)


def _generate(n: int) -> tuple[Tensor, Tensor]:
    m = n + 1
    lin = torch.linspace(-1.0, 1.0, m, dtype=torch.float64)
    gx, gy, gz = torch.meshgrid(lin, lin, lin, indexing="ij")
    vertices = torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3).float()
    # Vertex index of corner (i, j, k) is (i m + j) m + k.
    tpl = _template()  # (6, 4, 3)
    corner_offset = (tpl[..., 0] * m + tpl[..., 1]) * m + tpl[..., 2]  # (6, 4)
    c = torch.arange(n, dtype=torch.int64)
    base = ((c.view(-1, 1, 1) * m + c.view(1, -1, 1)) * m + c.view(1, 1, -1)).reshape(-1).to(torch.int32)  # (n^3,)
    tets = (base.view(-1, 1, 1) + corner_offset.view(1, 6, 4).to(torch.int32)).reshape(-1, 4)
    return vertices, tets


def unit_tet_grid(resolution: int, cache_dir: str | os.PathLike | None = None, use_disk: bool = True) -> tuple[Tensor, Tensor]:
    """Grid of [-1, 1]^3: vertices (V, 3) float32, tets (T, 4) int32. Cached; treat as read-only."""
    n = int(resolution)
    if not MIN_RESOLUTION <= n <= MAX_RESOLUTION:
        raise ValueError(f"tet grid resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
    if n in _MEMORY:
        return _MEMORY[n]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "tet_grids" / f"tets_{n}.pt"
    grid = None
    if use_disk and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            v, t = data["vertices"], data["tets"].to(torch.int32)
            if data.get("resolution") == n and v.shape == ((n + 1) ** 3, 3) and t.shape == (6 * n**3, 4):
                grid = (v, t)
        except Exception:  # a corrupt or foreign file: regenerate and overwrite
            grid = None
    if grid is None:
        grid = _generate(n)
        if use_disk:
            _atomic_save(path, {"resolution": n, "vertices": grid[0], "tets": grid[1]})
    _MEMORY[n] = grid
    return grid


def _atomic_save(path: Path, obj) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # the disk cache is an optimisation; an unwritable folder is not an error


def tet_grid(resolution: int, radius: float = 1.0, cache_dir: str | os.PathLike | None = None, use_disk: bool = True) -> tuple[Tensor, Tensor]:
    """Tetrahedral grid of [-radius, radius]^3 with `resolution` cells per side.

    Returns (vertices (V, 3) float32, tets (T, 4) int32) with V = (N + 1)^3, T = 6 N^3. For
    radius 1 the cached tensors themselves are returned (do not modify them in place).
    """
    v, t = unit_tet_grid(resolution, cache_dir, use_disk)
    return (v, t) if float(radius) == 1.0 else (v * float(radius), t)


def tet_volumes(vertices: Tensor, tets: Tensor) -> Tensor:
    """Signed volumes (T,): positive for positively oriented tetrahedra."""
    p = vertices[tets]
    a, b, c = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]
    return (torch.cross(a, b, dim=-1) * c).sum(-1) / 6.0
