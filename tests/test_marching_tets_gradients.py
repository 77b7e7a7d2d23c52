"""Marching tetrahedra: edge interpolation values and its gradients, and the DMTet deformation.

A surface vertex sits where the linear interpolation of the SDF along a sign-changing edge is zero:
p = (p_a (-s_b) + p_b s_a) / (s_a - s_b). Away from sign flips the topology is fixed and the
vertices are smooth in the grid positions and the SDF, so float64 central differences must match
autograd there (gradcheck). DMTet moves grid vertices by tanh(delta) * deformation_scale * spacing.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distill3d.engine.config import from_dict
from distill3d.engine.interfaces import BuildContext
from distill3d.representations.dmtet.marching_tets import marching_tets
from distill3d.representations.dmtet.model import DMTet, DMTetConfig
from distill3d.representations.dmtet.tet_grid import tet_grid

ONE_TET = torch.tensor([[0, 1, 2, 3]])
CORNERS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _zero_crossings(positions, sdf, tets):
    """Every sign-changing edge's zero of the linearly interpolated SDF, written out."""
    points = set()
    for tet in tets.tolist():
        for a, b in itertools.combinations(tet, 2):
            sa, sb = float(sdf[a]), float(sdf[b])
            if (sa > 0) != (sb > 0):
                t = sa / (sa - sb)
                p = positions[a] + t * (positions[b] - positions[a])
                points.add(tuple(round(float(x), 9) for x in p))
    return points


@pytest.mark.parametrize("sdf", [[0.25, -0.75, -0.5, -0.1], [0.3, 0.6, -0.2, -0.9]], ids=["one-inside", "two-inside"])
def test_one_tet_vertices_are_the_edge_zero_crossings(sdf):
    sdf = torch.tensor(sdf, dtype=torch.float64)
    verts, faces = marching_tets(CORNERS, sdf, ONE_TET)
    assert {tuple(round(float(x), 9) for x in v) for v in verts} == _zero_crossings(CORNERS, sdf, ONE_TET)
    inside = int((sdf > 0).sum())
    assert faces.shape == ((1, 3) if inside in (1, 3) else (2, 3))
    # First case by hand: on edge 0-1 at a quarter of the way (0.25 / (0.25 + 0.75)).
    if inside == 1:
        assert any(torch.allclose(v, torch.tensor([0.25, 0.0, 0.0], dtype=torch.float64)) for v in verts)


def _grid(resolution=3, seed=0):
    positions, tets = tet_grid(resolution, 1.0, use_disk=False)
    g = torch.Generator().manual_seed(seed)
    positions = positions.double() + (torch.rand(positions.shape, generator=g, dtype=torch.float64) - 0.5) * 0.1
    sdf = 0.55 - positions.norm(dim=-1)
    sdf = sdf + (torch.rand(sdf.shape, generator=g, dtype=torch.float64) - 0.5) * 0.2
    sdf = torch.where(sdf.abs() < 0.02, sdf.sign() * 0.02 + (sdf == 0) * 0.02, sdf)  # no vertex on the surface
    return positions, sdf, tets


def test_grid_vertices_are_the_edge_zero_crossings():
    positions, sdf, tets = _grid()
    verts, faces = marching_tets(positions, sdf, tets)
    assert len(verts) > 20 and faces.max() < len(verts)
    assert {tuple(round(float(x), 9) for x in v) for v in verts} == _zero_crossings(positions, sdf, tets)


def test_interpolation_gradients_match_finite_differences():
    positions, sdf, tets = _grid()
    faces0 = marching_tets(positions, sdf, tets)[1]

    def vertices(p, s):
        verts, faces = marching_tets(p, s, tets)
        assert torch.equal(faces, faces0)  # the topology stays put under the small perturbations
        return verts

    assert torch.autograd.gradcheck(vertices, (positions.clone().requires_grad_(True), sdf.clone().requires_grad_(True)), eps=1e-6, atol=1e-6, rtol=1e-4)


class _Surface(torch.nn.Module):
    def __init__(self, dmtet):
        super().__init__()
        self.dmtet = dmtet

    def forward(self):
        return self.dmtet.surface()


def _dmtet(resolution=4, scale=0.5):
    config = from_dict(DMTetConfig, {"grid_resolution": resolution, "deformation_scale": scale, "levels": 2, "log2_table_size": 8, "hidden_layers": 1, "tet_cache": False})
    return DMTet(config, BuildContext(total_steps=1)).double()


def test_deformation_moves_vertices_by_tanh_times_scale_times_spacing():
    dmtet = _dmtet(resolution=4, scale=0.5)
    spacing = 2.0 / 4
    assert dmtet.spacing == pytest.approx(spacing)
    with torch.no_grad():
        dmtet.deformation.zero_()
        dmtet.deformation[:, 0] = torch.atanh(torch.tensor(0.5, dtype=torch.float64))
        dmtet.deformation[:, 2] = 50.0  # saturates at the bound
    moved = dmtet.vertex_positions() - dmtet.grid_vertices
    torch.testing.assert_close(moved[:, 0], torch.full_like(moved[:, 0], 0.5 * 0.5 * spacing))
    torch.testing.assert_close(moved[:, 1], torch.zeros_like(moved[:, 1]))
    torch.testing.assert_close(moved[:, 2], torch.full_like(moved[:, 2], 0.5 * spacing))


def test_surface_gradients_through_the_deformation_match_finite_differences():
    dmtet = _dmtet(resolution=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sdf = 0.6 - dmtet.grid_vertices.norm(dim=-1) + (torch.rand(dmtet.sdf.shape, generator=g, dtype=torch.float64) - 0.5) * 0.2
        dmtet.sdf.copy_(torch.where(sdf.abs() < 0.02, torch.full_like(sdf, 0.02), sdf))
        dmtet.deformation.copy_(torch.randn(dmtet.deformation.shape, generator=g, dtype=torch.float64))
    module = _Surface(dmtet)
    faces0 = module()[1]

    def vertices(sdf, deformation):
        verts, faces = torch.func.functional_call(module, {"dmtet.sdf": sdf, "dmtet.deformation": deformation}, ())
        assert torch.equal(faces, faces0)
        return verts

    inputs = (dmtet.sdf.detach().clone().requires_grad_(True), dmtet.deformation.detach().clone().requires_grad_(True))
    assert len(faces0) > 10
    assert torch.autograd.gradcheck(vertices, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
