"""Surface-quality metric (normal angular error, Chamfer) and Taubin smoothing."""

from __future__ import annotations

import math

import torch

from distill3d.engine.cameras import make_cameras, pixel_rays
from distill3d.engine.reference_scene import DEFAULT_SCENE, load_scene
from distill3d.engine.surface_metrics import (
    closest_points_on_triangles,
    face_normals,
    point_to_mesh_distance,
    reference_normals,
    scene_sdf,
    surface_metrics,
)
from distill3d.representations.mesh.marching_cubes import extract_surface
from distill3d.representations.mesh.mesh_io import Mesh
from distill3d.representations.mesh.render import MeshReference
from distill3d.representations.mesh.smoothing import taubin_smooth


def _scene_mesh(scene, resolution: int):
    verts, faces, _ = extract_surface(lambda p: -scene_sdf(scene, p).float(), resolution=resolution, threshold=0.0)
    return verts, faces


def _volume(v: torch.Tensor, f: torch.Tensor) -> float:
    t = v.double()[f.long()]
    return float((torch.linalg.cross(t[:, 0], t[:, 1]) * t[:, 2]).sum() / 6)


def test_scene_sdf_is_zero_on_the_surface_and_its_gradient_is_the_ray_cast_normal():
    scene = load_scene(DEFAULT_SCENE)
    cams = make_cameras(torch.tensor([20.0, -35.0]), torch.tensor([30.0, 160.0]), 3.2, 42.5)
    o, d = pixel_rays(cams, 32, 32)
    hit, depth, normal, _ = scene.intersect(o.reshape(-1, 3), d.reshape(-1, 3))
    pts = (o.reshape(-1, 3) + d.reshape(-1, 3) * depth[:, None])[hit]
    assert pts.shape[0] > 200
    assert scene_sdf(scene, pts).abs().max() < 1e-4
    cos = (reference_normals(scene, pts) * normal[hit]).sum(-1)
    # Exact except at box edges / cylinder rims, where the closest-point normal is ambiguous.
    assert float((cos > 0.999).float().mean()) > 0.97
    # Outside is positive, deep inside negative.
    assert float(scene_sdf(scene, torch.tensor([[0.0, 0.0, 0.99]]))) > 0


def test_normal_error_separates_a_fine_mesh_from_a_stair_stepped_one_that_chamfer_cannot():
    scene = load_scene(DEFAULT_SCENE)
    fine = surface_metrics(*_scene_mesh(scene, 96), scene, samples=4000)
    # A voxelised surface (binary occupancy): within half a voxel of the truth, facets on the lattice.
    steps = extract_surface(lambda p: (scene_sdf(scene, p) < 0).float(), resolution=48, threshold=0.5)[:2]
    stepped = surface_metrics(*steps, scene, samples=4000)
    assert fine["normal_error_median_deg"] < 3.0
    assert stepped["normal_error_median_deg"] > 15.0
    assert stepped["chamfer_l1_over_diagonal"] < 0.01  # Chamfer alone calls both fine
    # Flipping every face is the worst possible error.
    v, f = _scene_mesh(scene, 48)
    flipped = surface_metrics(v, f[:, [0, 2, 1]], scene, samples=2000)
    assert flipped["normal_error_median_deg"] > 170


def test_closest_points_on_triangles_match_dense_sampling():
    g = torch.Generator().manual_seed(0)
    a, b, c, p = (torch.randn(300, 3, generator=g, dtype=torch.float64) for _ in range(4))
    closest = closest_points_on_triangles(p, a, b, c)
    uv = torch.rand(300, 20000, 2, generator=g, dtype=torch.float64)
    uv = torch.where(uv.sum(-1, keepdim=True) > 1, 1 - uv, uv)
    dense = a[:, None] + (b - a)[:, None] * uv[..., :1] + (c - a)[:, None] * uv[..., 1:]
    brute = (dense - p[:, None]).norm(dim=-1).min(dim=1).values
    exact = (closest - p).norm(dim=-1)
    # never farther than the best of 20k samples, and those come within a hair of it
    assert float((exact - brute).max()) < 1e-9
    assert float((brute - exact).max()) < 0.05
    # points inside the triangles' planes and interiors are their own closest points
    inner = a + (b - a) * 0.2 + (c - a) * 0.3
    assert torch.allclose(closest_points_on_triangles(inner, a, b, c), inner, atol=1e-12)


def test_chamfer_measures_surfaces_not_samples():
    scene = load_scene(DEFAULT_SCENE)
    v, f = _scene_mesh(scene, 128)
    exact = surface_metrics(v, f, scene, samples=4000)
    # The point-cloud form has a floor set by sampling alone; distances to the surfaces do not.
    assert exact["chamfer_l1_over_diagonal"] < 0.1 * exact["chamfer_l1_sampled_over_diagonal"]
    shifted = surface_metrics(v + torch.tensor([0.0, 0.01, 0.0]), f, scene, samples=4000)
    # a mesh moved 0.01 along y: every distance is at most 0.01, and most of the surface is not parallel to y
    assert 0.002 < shifted["chamfer_l1"] < 0.0105
    # Points at a known height above a flat square.
    square_v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    square_f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    pts = torch.tensor([[0.5, 0.5, 0.25], [0.1, 0.9, -0.5], [2.0, 0.5, 0.0]])
    assert torch.allclose(point_to_mesh_distance(pts, square_v, square_f, probes=1000), torch.tensor([0.25, 0.5, 1.0]), atol=1e-6)


def test_mesh_reference_normals_are_its_face_normals():
    box = Mesh(*_box())
    ref = MeshReference(box, radius=0.8)
    exact = surface_metrics(ref.mesh.vertices, ref.mesh.faces, ref, samples=2000)
    assert exact["normal_error_median_deg"] < 1e-3 and exact["chamfer_l1_over_diagonal"] < 1e-5
    lo, hi = ref.mesh.vertices.min(0).values, ref.mesh.vertices.max(0).values
    above_top = torch.stack([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2] + 0.01])[None]
    assert torch.allclose(reference_normals(ref, above_top), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-5)


def _box():
    import trimesh

    b = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
    b = b.subdivide().subdivide().subdivide()
    return torch.tensor(b.vertices, dtype=torch.float32), torch.tensor(b.faces, dtype=torch.int64)


def test_taubin_smoothing_removes_noise_and_keeps_the_volume():
    scene = load_scene(DEFAULT_SCENE)
    v, f = _scene_mesh(scene, 64)
    g = torch.Generator().manual_seed(0)
    noisy = v + face_normals(v, f).new_zeros(v.shape).normal_(0, 0.004, generator=g)
    before = surface_metrics(noisy, f, scene, samples=4000)
    smoothed = taubin_smooth(noisy, f, iterations=10)
    after = surface_metrics(smoothed, f, scene, samples=4000)
    assert after["normal_error_median_deg"] < 0.5 * before["normal_error_median_deg"]
    assert after["chamfer_l1_over_diagonal"] <= before["chamfer_l1_over_diagonal"] * 1.05
    assert math.isclose(_volume(smoothed, f), _volume(v, f), rel_tol=0.01)
    assert torch.equal(taubin_smooth(v, f, iterations=0), v)


def test_add_mesh_evaluation_writes_mesh_metrics_into_eval_json(tmp_path):
    import json

    from distill3d.engine.cameras import CameraSampler, CameraSamplerConfig
    from distill3d.engine.evaluation import add_mesh_evaluation

    scene = load_scene(DEFAULT_SCENE)
    v, f = _scene_mesh(scene, 48)
    mesh = Mesh(v, f, vertex_colors=torch.full_like(v, 0.5))
    (tmp_path / "eval.json").write_text(json.dumps({"psnr": 30.0}))
    add_mesh_evaluation(tmp_path, mesh, DEFAULT_SCENE, CameraSampler(CameraSamplerConfig()), 2, 32)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["psnr"] == 30.0  # the representation's own figures are kept
    m = data["mesh"]
    assert m["faces"] == f.shape[0] and m["mask_iou"] > 0.8
    assert 0 < m["normal_error_median_deg"] < 10 and m["chamfer_l1_over_diagonal"] < 0.02
