"""Mesh files: load/save round trips (OBJ+MTL+PNG, GLB, PLY), clear errors, atomic writes, and exact
rendering of mesh references."""

from __future__ import annotations

import os

import pytest
import torch

from distill3d.engine.cameras import make_cameras, pixel_rays
from distill3d.representations.mesh import mesh_io
from distill3d.representations.mesh.mesh_io import Mesh, MeshLoadError, load_mesh, normalize, sample_texture, save_mesh
from distill3d.representations.mesh.render import render_mesh
from tests.mesh_fixtures import SKIP_NO_VALIDATOR, gltf_validator, validate_gltf


def _quantized(t):
    return torch.round(t * 255) / 255


def _sphere(textured=True, colored=False, subdivisions=2):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.8)
    v = torch.tensor(m.vertices, dtype=torch.float32)
    f = torch.tensor(m.faces)
    g = torch.Generator().manual_seed(0)
    kw = {}
    if textured:
        kw["uv"] = (v[:, :2] * 0.5 + 0.5) * 0.9 + 0.05
        kw["texture"] = _quantized(torch.rand(16, 24, 3, generator=g))
    if colored:
        kw["vertex_colors"] = _quantized(torch.rand(len(v), 3, generator=g))
    return Mesh(v, f, **kw)


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_obj_round_trip_with_material_and_texture(tmp_path):
    mesh = _sphere().with_normals()
    written = save_mesh(mesh, tmp_path / "asset.obj")
    assert sorted(p.name for p in written) == ["asset.mtl", "asset.obj", "asset.png"]
    assert "map_Kd asset.png" in (tmp_path / "asset.mtl").read_text()
    assert not _leftovers(tmp_path)
    back = load_mesh(tmp_path / "asset.obj")
    assert back.has_texture and back.num_faces == mesh.num_faces and back.num_vertices == mesh.num_vertices
    assert torch.allclose(back.vertices, mesh.vertices, atol=1e-6)
    assert torch.equal(back.faces, mesh.faces)
    assert torch.allclose(back.uv, mesh.uv, atol=1e-6)
    assert torch.allclose(back.texture, mesh.texture, atol=1e-6)


def test_glb_round_trip_embeds_the_texture(tmp_path):
    import trimesh

    mesh = _sphere().with_normals()
    save_mesh(mesh, tmp_path / "asset.glb")
    assert os.listdir(tmp_path) == ["asset.glb"]  # one self-contained file
    scene = trimesh.load(tmp_path / "asset.glb")
    geom = list(scene.geometry.values())[0]
    assert geom.visual.kind == "texture"
    assert geom.visual.material.baseColorTexture.size == (24, 16)
    back = load_mesh(tmp_path / "asset.glb")
    assert back.has_texture
    assert torch.allclose(back.vertices, mesh.vertices, atol=1e-6) and torch.equal(back.faces, mesh.faces)
    assert torch.allclose(back.uv, mesh.uv, atol=1e-6)
    assert torch.allclose(back.texture, mesh.texture, atol=1e-6)


def test_ply_round_trip_with_vertex_colours(tmp_path):
    mesh = _sphere(textured=False, colored=True)
    save_mesh(mesh, tmp_path / "asset.ply")
    back = load_mesh(tmp_path / "asset.ply")
    assert back.vertex_colors is not None and not back.has_texture
    assert torch.allclose(back.vertices, mesh.vertices) and torch.equal(back.faces, mesh.faces)
    assert torch.allclose(back.vertex_colors, mesh.vertex_colors, atol=1e-6)
    # A textured mesh exports its texture sampled at the vertices; colour-only GLB/OBJ work too.
    textured = _sphere()
    save_mesh(textured, tmp_path / "tex.ply")
    expected = _quantized(sample_texture(textured.texture, textured.uv))
    assert torch.allclose(load_mesh(tmp_path / "tex.ply").vertex_colors, expected, atol=1e-6)
    for ext in ("glb", "obj"):
        save_mesh(mesh, tmp_path / f"vc.{ext}")
        assert torch.allclose(load_mesh(tmp_path / f"vc.{ext}").vertex_colors, mesh.vertex_colors, atol=2e-3)


def test_glb_passes_the_gltf_validator(tmp_path):
    if gltf_validator() is None:
        pytest.skip(SKIP_NO_VALIDATOR)
    for name, mesh in (("tex.glb", _sphere().with_normals()), ("vc.glb", _sphere(textured=False, colored=True))):
        save_mesh(mesh, tmp_path / name)
        report = validate_gltf(tmp_path / name)
        assert report["errors"] == 0 and report["warnings"] == 0, report["messages"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(MeshLoadError, match="not found"):
        load_mesh(tmp_path / "missing.obj")
    (tmp_path / "model.stl").write_text("solid x\nendsolid x\n")
    with pytest.raises(MeshLoadError, match="unsupported mesh format"):
        load_mesh(tmp_path / "model.stl")
    (tmp_path / "garbage.glb").write_bytes(b"\x00\x01not a gltf at all" * 10)
    with pytest.raises(MeshLoadError, match="cannot read mesh file"):
        load_mesh(tmp_path / "garbage.glb")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(MeshLoadError, match="no faces|no triangle mesh"):
        load_mesh(tmp_path / "points.obj")
    (tmp_path / "empty.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\nend_header\n")
    with pytest.raises(MeshLoadError):
        load_mesh(tmp_path / "empty.ply")


def test_normalize_into_the_unit_sphere_and_degenerate_input():
    mesh = _sphere(textured=False)
    moved = Mesh(mesh.vertices * 3.0 + torch.tensor([5.0, -2.0, 1.0]), mesh.faces)
    norm, centre, scale = normalize(moved)
    assert norm.vertices.norm(dim=-1).max() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(norm.vertices.mean(0), torch.zeros(3), atol=0.05)
    assert torch.allclose((moved.vertices - centre) * scale, norm.vertices)
    with pytest.raises(MeshLoadError, match="coincide"):
        normalize(Mesh(torch.ones(3, 3), torch.tensor([[0, 1, 2]])))
    with pytest.raises(MeshLoadError, match="no faces"):
        normalize(Mesh(torch.rand(3, 3), torch.zeros(0, 3, dtype=torch.int64)))
    bad = torch.rand(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(MeshLoadError, match="non-finite"):
        normalize(Mesh(bad, torch.tensor([[0, 1, 2]])))


def test_interrupted_writes_leave_no_partial_file(tmp_path, monkeypatch):
    mesh = _sphere()
    save_mesh(mesh, tmp_path / "keep.glb")
    before = (tmp_path / "keep.glb").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mesh_io.os, "fsync", boom)
    for name in ("new.glb", "new.ply", "new.obj", "keep.glb"):
        with pytest.raises(KeyboardInterrupt):
            save_mesh(mesh, tmp_path / name)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["keep.glb"]  # no new file, no temporaries
    assert (tmp_path / "keep.glb").read_bytes() == before  # the old file is intact
    # Interrupted while moving the OBJ set into place: the OBJ (moved last) is not there.
    real_replace = os.replace

    def replace_then_fail(src, dst):
        if str(dst).endswith(".obj"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(mesh_io.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_mesh(mesh, tmp_path / "set.obj")
    assert not (tmp_path / "set.obj").exists() and not _leftovers(tmp_path)
    with pytest.raises(ValueError, match="without faces"):
        save_mesh(Mesh(torch.rand(3, 3), torch.zeros(0, 3, dtype=torch.int64)), tmp_path / "x.glb")


def test_textured_quad_renders_exactly():
    # A quad in the plane z = 0 facing +z, UV (0,0) at the bottom-left; the render must equal an
    # analytic ray cast with a bilinear texture lookup at the hit point.
    s = 0.9
    verts = torch.tensor([[-s, -s, 0.0], [s, -s, 0.0], [s, s, 0.0], [-s, s, 0.0]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tex = torch.rand(8, 6, 3, generator=torch.Generator().manual_seed(1))
    mesh = Mesh(verts, torch.tensor([[0, 1, 2], [0, 2, 3]]), uv=uv, texture=tex)
    cams = make_cameras([10.0, -20.0], [15.0, -30.0], [2.5, 3.0], [45.0, 50.0])
    h, w = 40, 36
    out = render_mesh(mesh, cams, h, w, background=0.25, antialias=False)
    origins, dirs = pixel_rays(cams, h, w)
    t = -origins[..., 2] / dirs[..., 2]
    hit = origins + t[..., None] * dirs
    inside = (hit[..., 0].abs() < s - 0.02) & (hit[..., 1].abs() < s - 0.02)
    outside = (hit[..., 0].abs() > s + 0.02) | (hit[..., 1].abs() > s + 0.02)
    expected = sample_texture(tex, (hit[..., :2] + s) / (2 * s))
    assert inside.sum() > 500 and outside.sum() > 100
    assert torch.allclose(out.rgb[inside], expected[inside], atol=1e-4)
    assert torch.allclose(out.rgb[outside], torch.full_like(out.rgb[outside], 0.25))
    assert torch.allclose(out.depth[..., 0][inside], t[inside], rtol=1e-4)
    assert torch.allclose(out.normal[inside], torch.tensor([0.0, 0.0, 1.0]).expand_as(out.normal[inside]), atol=1e-5)
    assert (out.opacity[..., 0][inside] == 1).all() and (out.opacity[..., 0][outside] == 0).all()


@pytest.mark.parametrize("ext", ["obj", "glb", "ply"])
def test_mesh_reference_files_render_like_the_mesh(tmp_path, ext):
    mesh = _sphere(textured=ext != "ply", colored=ext == "ply")
    save_mesh(mesh, tmp_path / f"ref.{ext}")
    back = load_mesh(tmp_path / f"ref.{ext}")
    cams = make_cameras([15.0, 40.0], [0.0, 120.0], [2.5, 2.5], [45.0, 45.0])
    a = render_mesh(mesh, cams, 32, 32)
    b = render_mesh(back, cams, 32, 32)
    assert torch.allclose(a.rgb, b.rgb, atol=1e-5)
    assert torch.allclose(a.opacity, b.opacity, atol=1e-5)


def test_mesh_reference_for_the_oracle(tmp_path):
    from distill3d.representations.mesh.render import MeshReference

    mesh = _sphere()
    shifted = Mesh(mesh.vertices * 2.0 + 1.0, mesh.faces, uv=mesh.uv, texture=mesh.texture)
    save_mesh(shifted, tmp_path / "ref.glb")
    ref = MeshReference.from_file(tmp_path / "ref.glb")
    assert ref.name == "ref" and ref.bounding_radius == pytest.approx(0.8, abs=1e-5)
    cams = make_cameras([15.0, 40.0], [0.0, 120.0], [2.5, 2.5], [45.0, 45.0])
    out = ref.render(cams, 24, 24)
    assert out.rgb.shape == (2, 24, 24, 3) and out.normal.shape == (2, 24, 24, 3)
    assert set(out.opacity.unique().tolist()) == {0.0, 1.0}  # exact, hard-edged like the scenes
    empty = out.opacity[..., 0] == 0
    assert torch.allclose(out.rgb[empty], torch.ones_like(out.rgb[empty]))
    black = ref.render(cams, 24, 24, background=torch.zeros(3))
    assert torch.allclose(black.rgb[empty], torch.zeros_like(black.rgb[empty]))
    assert torch.allclose(black.rgb[~empty], out.rgb[~empty])
    with pytest.raises(MeshLoadError):
        MeshReference.from_file(tmp_path / "nope.glb")
