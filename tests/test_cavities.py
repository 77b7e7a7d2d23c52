"""Solid interiors: enclosed and pore-connected cavities are filled before meshing, real concavities
are kept, and both exports (NeRF marching cubes, DMTet) give only the outer surface."""

from __future__ import annotations

import math

import torch

from distill3d.representations.mesh.cavities import fill_cavities, outside_region
from distill3d.representations.mesh.marching_cubes import extract_surface
from tests.test_dmtet import make as make_dmtet


def _radius(res: int) -> torch.Tensor:
    ax = torch.linspace(-1, 1, res)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).norm(dim=-1)


def _area(verts, faces):
    tri = verts[faces]
    return float(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1).sum() / 2)


def test_enclosed_core_is_filled_and_the_outside_is_untouched():
    r = _radius(33)
    shell = (r > 0.4) & (r < 0.7)
    filled = fill_cavities(shell)
    assert filled[16, 16, 16] and not shell[16, 16, 16]
    assert torch.equal(filled, r < 0.7)
    assert torch.equal(outside_region(shell), r >= 0.7)


def test_a_one_cell_pore_is_closed_only_when_asked():
    r = _radius(33)
    shell = (r > 0.4) & (r < 0.7)
    shell[16, 16, 16:] = False  # a tunnel one cell wide from the core to the outside along +z
    assert not fill_cavities(shell)[16, 16, 16]  # a real opening at close_gaps=0
    closed = fill_cavities(shell, close_gaps=1)
    assert closed[16, 16, 16] and closed[(r < 0.4)].all()
    assert not closed[r >= 0.75].any()  # nothing outside the object is added


def test_concavities_wider_than_the_gap_are_kept():
    cup = torch.zeros(24, 24, 24, dtype=torch.bool)
    cup[4:20, 4:20, 4:20] = True
    cup[8:16, 8:16, 8:20] = False  # an 8-cell-wide well open at the top
    filled = fill_cavities(cup, close_gaps=1)
    assert torch.equal(filled, cup)  # the well is outside, all of it


def test_marching_cubes_export_meshes_only_the_outer_surface():
    r = _radius(48)
    density = torch.clamp(1 - (r - 0.55).abs() / 0.15, min=0)  # a thick hollow shell, 0.4 < r < 0.7
    v, f, _ = extract_surface(density, resolution=48, threshold=0.5)
    v_both, f_both, _ = extract_surface(density, resolution=48, threshold=0.5, solid=False)
    outer = 4 * math.pi * 0.625**2  # the threshold crosses at |r - 0.55| = 0.075
    assert abs(_area(v, f) - outer) / outer < 0.05
    assert _area(v_both, f_both) > 1.3 * outer  # the inner shell too, when not filled
    assert (v.norm(dim=-1) > 0.55).all()


def test_dmtet_seed_and_export_have_no_inner_shell():
    m = make_dmtet(grid_resolution=20)

    def hollow(x):
        return 10 * (1 - (x.norm(dim=-1) - 0.5).abs() / 0.2)  # above 5 for 0.4 < |x| < 0.6

    m.init_from_density(hollow, threshold=5.0, clamp=3.0)
    verts, faces = m.surface()
    assert (verts.norm(dim=-1) > 0.5).all()  # the seed is solid: no surface near |x| = 0.4
    with torch.no_grad():  # a cavity that appears during training is filled at export
        m.sdf.copy_(torch.where(m.grid_vertices.norm(dim=-1) < 0.3, -1.0, m.sdf.detach()))
    assert (m.surface()[0].norm(dim=-1) < 0.4).any()
    mesh, _ = m.export_mesh(texture_size=32)
    assert (mesh.vertices.norm(dim=-1) > 0.5).all()
