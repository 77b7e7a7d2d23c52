"""Marching cubes: watertight, consistently oriented (outward) surfaces in world coordinates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill3d.representations.mesh.marching_cubes import (
    EmptySurfaceError,
    auto_threshold,
    extract_surface,
    marching_cubes,
    sample_grid,
)

BOUNDS = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


def _grid(res):
    ax = torch.linspace(-1, 1, res)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)


def _edge_use(faces):
    f = faces.numpy()
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    directed = {tuple(x) for x in e.tolist()}
    undirected, counts = np.unique(np.sort(e, axis=1), axis=0, return_counts=True)
    return directed, undirected, counts, len(e)


def _assert_closed_and_oriented(faces):
    directed, undirected, counts, n = _edge_use(faces)
    assert (counts == 2).all(), "every edge must be shared by exactly two faces"
    # Consistent orientation: each undirected edge is used once in each direction.
    assert len(directed) == n


def _signed_volume(v, f):
    a, b, c = v[f[:, 0]].double(), v[f[:, 1]].double(), v[f[:, 2]].double()
    return float((a * torch.cross(b, c, dim=-1)).sum() / 6)


def test_sphere_is_closed_outward_and_accurate():
    r = 0.6
    g = _grid(48)
    verts, faces = marching_cubes(r - g.norm(dim=-1), 0.0, BOUNDS)
    assert verts.dtype == torch.float32 and faces.dtype == torch.int64
    _assert_closed_and_oriented(faces)
    radius = verts.norm(dim=-1)
    assert (radius - r).abs().max() < 2e-3
    vol = _signed_volume(verts, faces)
    assert vol > 0 and abs(vol - 4 / 3 * math.pi * r**3) < 0.02 * vol
    n = torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]], dim=-1)
    centroid = verts[faces].mean(1)
    assert ((n * centroid).sum(-1) > 0).float().mean() > 0.999  # outward normals


def test_matches_reference_implementation_counts():
    measure = pytest.importorskip("skimage.measure")
    g = _grid(40)
    field = 0.55 - g.norm(dim=-1) + 0.05 * torch.sin(6 * g[..., 0])
    v, f = marching_cubes(field, 0.0)
    rv, rf, _, _ = measure.marching_cubes(field.numpy(), 0.0)
    assert len(f) == len(rf)
    assert abs(_signed_volume(v, f) - abs(_signed_volume(torch.tensor(rv.copy()), torch.tensor(rf.astype(np.int64))))) < 1e-3 * len(f)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_fields_are_watertight_with_ambiguous_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    field = torch.randn(18, 17, 16, generator=gen)
    verts, faces, thr = extract_surface(field, BOUNDS, threshold=0.2, pad=True)
    assert thr == pytest.approx(0.2)
    _assert_closed_and_oriented(faces)
    assert _signed_volume(verts, faces) > 0
    # Vertices stay inside the padded bounds.
    assert verts.abs().max() <= 1.0 + 2.0 / 15 + 1e-5


def test_torus_has_genus_one():
    g = _grid(40)
    q = torch.stack([torch.sqrt(g[..., 0] ** 2 + g[..., 2] ** 2) - 0.55, g[..., 1]], -1)
    verts, faces = marching_cubes(0.2 - q.norm(dim=-1), 0.0, BOUNDS)
    _assert_closed_and_oriented(faces)
    _, undirected, _, _ = _edge_use(faces)
    assert len(verts) - len(undirected) + len(faces) == 0  # Euler characteristic of a torus


def test_world_coordinates_and_axis_order():
    # f = x - 0.3 crossing along the first axis only: every vertex at x = 0.3 (up to the grid's
    # linear interpolation, exact for a linear field), inside (f > 0) toward +x.
    bounds = ((-1.0, -2.0, 0.0), (1.0, 2.0, 3.0))
    res = (21, 11, 7)
    axes = [torch.linspace(bounds[0][i], bounds[1][i], res[i]) for i in range(3)]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    verts, faces = marching_cubes(g[..., 0] - 0.3, 0.0, bounds)
    assert torch.allclose(verts[:, 0], torch.full_like(verts[:, 0], 0.3), atol=1e-5)
    assert verts[:, 1].min() == pytest.approx(-2.0) and verts[:, 2].max() == pytest.approx(3.0)
    n = torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]], dim=-1)
    assert (n[:, 0] < 0).all()  # normals point to the low side (outside), here -x


def test_sample_grid_order_and_auto_threshold():
    def fn(p):
        return p[:, 0] * 100 + p[:, 1] * 10 + p[:, 2]

    grid = sample_grid(fn, BOUNDS, 5, chunk_size=7)
    ax = torch.linspace(-1, 1, 5)
    assert torch.allclose(grid[2, 4, 1], ax[2] * 100 + ax[4] * 10 + ax[1])
    assert torch.allclose(grid, fn(_grid(5).reshape(-1, 3)).reshape(5, 5, 5))
    vals = torch.tensor([-1.0, 0.0, 2.0, 4.0])
    assert auto_threshold(vals) == pytest.approx(3.0)


def test_empty_surface_is_reported():
    with pytest.raises(EmptySurfaceError, match="threshold"):
        extract_surface(torch.zeros(8, 8, 8), BOUNDS, threshold="auto")
    with pytest.raises(EmptySurfaceError, match="no density above the threshold"):
        extract_surface(lambda p: torch.full((p.shape[0],), 0.5), BOUNDS, resolution=8, threshold=1.0)
    v, f = marching_cubes(torch.zeros(4, 4, 4), 1.0)
    assert v.shape == (0, 3) and f.shape == (0, 3)
