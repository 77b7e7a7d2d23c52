"""UV unwrap + albedo baking, seam filling, clean-up/decimation and the field -> files export."""

from __future__ import annotations

import os

import pytest
import torch

from distill3d.engine.cameras import orbit_cameras
from distill3d.representations.mesh.cleanup import connected_components, decimate, remove_small_components
from distill3d.representations.mesh.marching_cubes import EmptySurfaceError, extract_surface
from distill3d.representations.mesh.mesh_io import Mesh, load_mesh, save_mesh
from distill3d.representations.mesh.rasterizer import interpolate
from distill3d.representations.mesh.render import render_mesh
from distill3d.representations.mesh.texture_bake import bake_texture, fill_seams, mesh_from_fields, push_pull_fill, rasterize_uv, unwrap_uv


def _ball_density(p, r=0.6):
    return 10.0 * (r - p.norm(dim=-1)).clamp_min(0.0)


def _color_field(p):
    return (0.5 + 0.4 * torch.sin(3.0 * p)).clamp(0, 1)


def _sphere_mesh(res=40):
    v, f, _ = extract_surface(_ball_density, resolution=res, threshold=1.0)
    return Mesh(v, f)


def test_bake_reproduces_the_colour_field_in_renders():
    mesh, _ = unwrap_uv(_sphere_mesh(), texture_size=256)
    assert mesh.uv.min() >= 0 and mesh.uv.max() <= 1
    texture, covered = bake_texture(mesh, _color_field, texture_size=256)
    assert texture.shape == (256, 256, 3) and torch.isfinite(texture).all()
    assert 0.3 < covered.float().mean() < 0.95
    # Texels inside charts hold the field at their surface point (UV rasterization, row 0 = v 1).
    frags = rasterize_uv(mesh.uv, mesh.faces, 256, 256)
    pos = interpolate(mesh.vertices, frags, mesh.faces)[0]
    assert torch.allclose(texture[covered], _color_field(pos[covered]), atol=1e-5)
    mesh.texture = texture
    cams = orbit_cameras(3, elevation=20.0, distance=2.4)
    out = render_mesh(mesh, cams, 48, 48, antialias=False)
    frags = out.extras["fragments"]
    ref = _color_field(interpolate(mesh.vertices, frags, mesh.faces))
    m = frags.mask
    err = (out.rgb - ref)[m].abs()
    assert err.mean() < 2e-3 and err.max() < 0.05


def test_seam_filling_covers_everything_and_keeps_covered_texels():
    img = torch.zeros(37, 50, 3)
    mask = torch.zeros(37, 50, dtype=torch.bool)
    mask[5:12, 7:20] = True
    mask[25:30, 40:48] = True
    img[mask] = torch.tensor([0.2, 0.4, 0.6])
    img[25:30, 40:48] = torch.tensor([1.0, 0.0, 0.5])
    out = fill_seams(img, mask, dilation=2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[mask], img[mask])
    assert (out[~mask].sum(-1) > 0).all()  # every empty texel got a colour from the charts
    assert torch.allclose(out[13, 10], torch.tensor([0.2, 0.4, 0.6]))  # dilated ring: nearest chart
    pp = push_pull_fill(img, mask)
    assert torch.equal(pp[mask], img[mask]) and (pp[~mask].sum(-1) > 0).all()


def test_small_components_are_removed_and_decimation_keeps_the_shape():
    def density(p):
        return _ball_density(p) + 10.0 * (0.08 - (p - 0.8).norm(dim=-1)).clamp_min(0)  # ball + floater

    v, f, _ = extract_surface(density, resolution=48, threshold=0.1)
    mesh = Mesh(v, f)
    labels = connected_components(mesh.faces, mesh.num_vertices)
    assert int(labels.max()) + 1 == 2
    clean = remove_small_components(mesh, min_fraction=0.05)
    assert int(connected_components(clean.faces, clean.num_vertices).max()) + 1 == 1
    assert clean.vertices.norm(dim=-1).max() < 0.7  # the floater near (0.8, 0.8, 0.8) is gone
    small = decimate(clean, 1000, method="cluster")
    assert 500 < small.num_faces <= 1000
    r = small.vertices.norm(dim=-1)
    assert (r - 0.6).abs().max() < 0.05
    assert small.faces.max() < small.num_vertices


def test_quadric_decimation_when_fast_simplification_is_installed():
    pytest.importorskip("fast_simplification")
    clean = _sphere_mesh(48)
    small = decimate(clean, 800, method="quadric")
    assert 600 < small.num_faces <= 800
    assert (small.vertices.norm(dim=-1) - 0.5).abs().max() < 0.03  # density 10 (0.6 - r) = 1 at r = 0.5


def test_mesh_from_fields_exports_all_formats(tmp_path):
    mesh, info = mesh_from_fields(_ball_density, _color_field, resolution=40, texture_size=128, target_faces=2000)
    assert info.threshold > 0 and info.faces_final <= 2000 and info.decimation in ("cluster", "quadric")
    assert mesh.has_texture and mesh.vertex_colors is not None and mesh.normals is not None
    # Normals point outward on a ball.
    assert ((mesh.normals * mesh.vertices).sum(-1) > 0).all()
    for name in ("ball.obj", "ball.glb", "ball.ply"):
        save_mesh(mesh, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["ball.glb", "ball.mtl", "ball.obj", "ball.ply", "ball.png"]
    glb = load_mesh(tmp_path / "ball.glb")
    assert glb.has_texture and glb.texture.shape == (128, 128, 3)
    ply = load_mesh(tmp_path / "ball.ply")
    assert ply.vertex_colors is not None and ply.num_faces == mesh.num_faces


def test_empty_field_says_so_and_writes_nothing(tmp_path):
    def export(density):
        mesh, _ = mesh_from_fields(density, _color_field, resolution=16, texture_size=32)
        save_mesh(mesh, tmp_path / "out.glb")

    with pytest.raises(EmptySurfaceError, match="nothing to export|no density above"):
        export(lambda p: torch.full((p.shape[0],), 0.01))  # nothing above an auto threshold
    with pytest.raises(EmptySurfaceError):
        export(lambda p: torch.zeros(p.shape[0]))
    assert os.listdir(tmp_path) == []
