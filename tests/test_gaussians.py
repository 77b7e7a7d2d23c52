"""The `gaussians` representation: initialisation, rendering outputs, densification with optimiser
moments, resizable checkpoints, 3DGS .ply round trip, point-cloud input errors, mesh export and
seeding from a density field."""

import math

import numpy as np
import pytest
import torch

from distill3d.engine.cameras import orbit_cameras
from distill3d.engine.config import ConfigError
from distill3d.engine.interfaces import BuildContext, ExportOptions, RenderSettings
from distill3d.engine.optim import OptimizerHooks
from distill3d.engine.recipe import resolve_recipe
from distill3d.representations.gaussians.densify import AllGaussiansPrunedError, DensifyConfig
from distill3d.representations.gaussians.model import Gaussians, GaussiansConfig, knn_scales
from distill3d.representations.mesh.mesh_io import load_mesh
from distill3d.representations.gaussians.ply import PointCloudError, read_point_cloud, read_splat_ply, write_splat_ply


def make(n=200, **kw):
    densify = kw.pop("densify", {})
    cfg = GaussiansConfig(num_points=n, densify=DensifyConfig(**densify), **kw)
    return Gaussians(cfg, BuildContext(total_steps=1000))


def optimizer_for(g):
    groups = [{"params": grp["params"], "lr": 0.01} for grp in g.param_groups()]
    return torch.optim.Adam(groups)


def test_random_init_matches_dreamgaussian_numbers():
    g = make(800)
    assert g.count == 800
    assert float(g.means.norm(dim=-1).max()) <= 0.5 + 1e-6
    torch.testing.assert_close(g.opacities, torch.full((800,), 0.1))
    torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0, 0, 0]]).expand(800, 4))
    rgb = g.colors()
    assert float((rgb - 0.5).abs().max()) < 0.01  # near grey
    # scales: root mean squared distance to the 3 nearest neighbours
    d = torch.cdist(g.means[:5], g.means.detach()).sort(1).values[:, 1:4]
    torch.testing.assert_close(g.scales[:5, 0], d.square().mean(1).sqrt(), rtol=1e-4, atol=1e-6)


def test_render_outputs_and_gradients():
    g = make(300, init_scale=0.08, init_opacity=0.6)
    with torch.no_grad():
        g.log_scales[:, 2] = math.log(0.01)  # flat discs facing +z: their normal is the z axis
    cams = orbit_cameras(2, elevation=15.0, distance=2.5, fovy=40.0)
    out = g.render(cams, RenderSettings(24, 20, shading="lambertian", background="solid"))
    assert out.rgb.shape == (2, 24, 20, 3) and out.opacity.shape == (2, 24, 20, 1) and out.normal.shape == (2, 24, 20, 3)
    assert float(out.opacity.max()) > 0.9 and float(out.opacity.min()) < 0.05
    centre = out.depth[0, 12, 10, 0] / out.opacity[0, 12, 10, 0]
    assert 1.9 < float(centre) < 3.1  # ray distance of the blob seen from 2.5 away
    # normals (the shortest axis, turned to the camera) of opaque pixels: +z seen from the front
    n = out.normal[0][out.opacity[0, ..., 0] > 0.9] / out.opacity[0][out.opacity[0, ..., 0] > 0.9]
    torch.testing.assert_close(n, torch.tensor([[0.0, 0.0, 1.0]]).expand_as(n), atol=0.02, rtol=0)
    # white background where empty
    torch.testing.assert_close(out.rgb[out.opacity[..., 0] < 1e-6], torch.ones_like(out.rgb[out.opacity[..., 0] < 1e-6]))
    out.rgb.sum().backward()
    for p in (g.means, g.log_scales, g.quats, g.opacity_logits, g.sh_dc):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    assert out.extras["num_gaussians"] == 300 and len(out.extras["gaussian_views"]) == 2


def test_sh_degree_3_is_view_dependent():
    g = make(50, sh_degree=3)
    assert g.sh_rest.shape == (50, 15, 3)
    with torch.no_grad():
        g.sh_rest[:, 1, 0] = 1.0  # coefficient 2 (after the DC term): the z-linear one, red
    dirs = torch.tensor([[0.0, 0.0, 1.0]]).expand(50, 3)
    assert float((g.colors(dirs) - g.colors(-dirs))[:, 0].min()) > 0.5


def densify_fixture():
    g = make(6, init_scale=0.01, densify={"grad_threshold": 0.5, "percent_dense": 0.01, "scene_extent": 4.0, "min_opacity": 0.005, "max_count": 100})
    with torch.no_grad():
        g.log_scales[3:] = math.log(0.2)  # large: split; rows 0..2 small: clone
        g.opacity_logits[5] = -10.0  # transparent: pruned
    opt = optimizer_for(g)
    out = g.render(orbit_cameras(1, 0.0, 2.5, 40.0), RenderSettings(16, 16))
    out.rgb.sum().backward()
    opt.step()
    g.grad_sum.copy_(torch.tensor([1.0, 0.1, 1.0, 1.0, 0.1, 0.1]))
    g.grad_count.fill_(1.0)
    return g, opt


def test_densify_clones_splits_prunes_and_keeps_moments():
    torch.manual_seed(0)
    g, opt = densify_fixture()
    means_before = g.means.detach().clone()
    scales_before = g.scales.detach().clone()
    moments_before = opt.state[g.means]["exp_avg"].clone()
    done = g.densify_and_prune(OptimizerHooks(opt))
    # rows 0, 2 cloned; row 3 split into 2; row 5 pruned (opacity); rows 1, 4 kept
    assert done == {"cloned": 2, "split": 1, "pruned": 1, "count": 4 + 2 + 2}
    kept = [0, 1, 2, 4]
    torch.testing.assert_close(g.means[:4].detach(), means_before[kept])
    torch.testing.assert_close(g.means[4:6].detach(), means_before[[0, 2]])  # clones are copies
    state = opt.state[g.means]["exp_avg"]
    torch.testing.assert_close(state[:4], moments_before[kept])
    assert float(state[4:].abs().max()) == 0.0  # new rows start with zero moments
    torch.testing.assert_close(g.scales[6:].detach(), (scales_before[3] / 1.6).expand(2, 3))  # split: scale / (0.8 N)
    assert float((g.means[6:] - means_before[3]).norm(dim=-1).max()) < 1.0
    assert opt.param_groups[0]["params"][0] is g.means
    assert g.grad_sum.shape == (8,) and float(g.grad_sum.abs().sum()) == 0


def test_densify_respects_the_cap_and_all_pruned_is_an_error():
    g, opt = densify_fixture()
    g.config.densify.max_count = 7  # room for one more Gaussian: the strongest small one is cloned
    done = g.densify_and_prune(OptimizerHooks(opt))
    assert done["count"] <= 7 and done["split"] == 0 and done["cloned"] == 1
    with torch.no_grad():
        g.opacity_logits.fill_(-10.0)
    before = g.count
    with pytest.raises(AllGaussiansPrunedError, match="prune all"):
        g.densify_and_prune(OptimizerHooks(opt))
    assert g.count == before  # nothing changed


def test_opacity_reset_schedule_and_moments():
    g = make(10, init_opacity=0.5, densify={"opacity_reset_interval": 3, "start": 100, "opacity_reset_value": 0.01})
    opt = optimizer_for(g)
    g.render(orbit_cameras(1, 0.0, 2.5, 40.0), RenderSettings(8, 8)).rgb.sum().backward()
    opt.step()
    hooks = OptimizerHooks(opt)
    g.after_step(1, hooks)  # 2 steps done: nothing
    assert float(g.opacities.min()) > 0.4
    g.after_step(2, hooks)  # 3 steps done: reset
    torch.testing.assert_close(g.opacities.detach(), torch.full((10,), 0.01))
    assert float(opt.state[g.opacity_logits]["exp_avg"].abs().max()) == 0.0


def test_checkpoint_with_another_count_loads():
    g, opt = densify_fixture()
    g.densify_and_prune(OptimizerHooks(opt))
    fresh = make(6)
    fresh.load_state_dict(g.state_dict())
    assert fresh.count == g.count
    torch.testing.assert_close(fresh.means, g.means)
    assert set(fresh.resizable_parameters()) == {"means", "log_scales", "quats", "opacity_logits", "sh_dc"}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"densify": {"max_count": 0}}, "max_count"),
        ({"densify": {"grad_threshold": -1}}, "grad_threshold"),
        ({"densify": {"percent_dense": 2}}, "percent_dense"),
        ({"densify": {"stop": "150%"}}, "stop"),
        ({"densify": {"split_count": 1}}, "split_count"),
        ({"sh_degree": 4}, "sh_degree"),
        ({"densify": {"opacity_reset_interval": 100, "opacity_reset_value": 0.01, "min_opacity": 0.02}}, "must exceed"),
        ({"init": "points"}, "init_points"),
    ],
)
def test_bad_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_recipe({"representation": {"name": "gaussians", **override}, "guidance": [{"name": "sds"}]})


def test_splat_ply_round_trip_and_layout(tmp_path):
    g = make(40, sh_degree=2)
    with torch.no_grad():
        g.sh_rest.normal_()
        g.quats.copy_(torch.nn.functional.normalize(torch.randn(40, 4), dim=-1))
        g.opacity_logits.normal_()
    path = g.export("ply", tmp_path / "splats.ply")[0]
    header = path.read_bytes().split(b"end_header")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:33] == [f"f_rest_{i}" for i in range(24)]
    assert names[33:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert "binary_little_endian" in header and all(f"property float {n}" in header for n in names)
    # raw float32 layout: f_rest channel-major, opacity pre-sigmoid, log scales, w first
    table = np.frombuffer(path.read_bytes(), dtype="<f4", offset=len(header) + len("end_header\n")).reshape(40, -1)
    np.testing.assert_allclose(table[:, 9], g.sh_rest[:, 0, 0].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(table[:, 9 + 8], g.sh_rest[:, 0, 1].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(table[:, 33], g.opacity_logits.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(table[:, 34:37], g.log_scales.detach().numpy(), rtol=1e-6)
    # an independent PLY reader (trimesh's) sees the same vertex table
    import trimesh

    raw = trimesh.load(path).metadata["_ply_raw"]["vertex"]["data"]
    assert list(raw.dtype.names) == names and all(raw.dtype[n] == np.dtype("<f4") for n in names)
    np.testing.assert_allclose(np.stack([raw["rot_0"], raw["rot_1"], raw["rot_2"], raw["rot_3"]], -1), g.quats.detach().numpy(), rtol=1e-6, atol=1e-7)
    back = read_splat_ply(path)
    assert back.sh_degree == 2
    torch.testing.assert_close(back.sh, g.sh().detach())
    torch.testing.assert_close(back.means, g.means.detach())
    torch.testing.assert_close(back.quats, g.quats.detach())
    # and as the initial Gaussians of another run
    again = make(1, sh_degree=2, init="points", init_points=str(path))
    torch.testing.assert_close(again.sh().detach(), g.sh().detach())
    torch.testing.assert_close(again.opacity_logits.detach(), g.opacity_logits.detach())


def test_reading_a_non_3dgs_ply_as_splats_is_a_clear_error(tmp_path):
    p = tmp_path / "cloud.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\nend_header\n0 0 0\n1 1 1\n")
    with pytest.raises(PointCloudError, match="not a 3D Gaussian Splatting .ply.*f_dc_0"):
        read_splat_ply(p)
    pts, cols = read_point_cloud(p)
    assert pts.shape == (2, 3) and cols is None


def test_point_cloud_files(tmp_path):
    xyz = tmp_path / "pts.xyz"
    xyz.write_text("# x y z r g b\n0 0 0 255 0 0\n0.1 0 0 0 255 0\n0 0.1 0 0 0 255\n")
    g = make(1, init="points", init_points=str(xyz))
    assert g.count == 3
    torch.testing.assert_close(g.colors().detach(), torch.eye(3), atol=1e-5, rtol=0)
    obj = tmp_path / "pts.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nvt 0 0\nv 0 1 0\nf 1 2 3\n")
    assert read_point_cloud(obj)[0].shape == (3, 3)
    binary = tmp_path / "bin.ply"
    data = np.array([(0.0, 1.0, 2.0, 10, 20, 30)], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    binary.write_bytes(header.encode() + data.tobytes())
    pts, cols = read_point_cloud(binary)
    torch.testing.assert_close(pts, torch.tensor([[0.0, 1.0, 2.0]]))
    torch.testing.assert_close(cols, torch.tensor([[10, 20, 30]]) / 255.0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.xyz", "", "holds no points"),
        ("bad.xyz", "1 2 three\n", "not a point"),
        ("short.xyz", "1 2\n", "3 \\(x y z\\) or 6"),
        ("empty.ply", "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\nend_header\n", "holds no points"),
        ("junk.ply", "this is not a ply", "not a PLY file"),
        ("cut.ply", "ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\nend_header\n1234", "truncated"),
        ("pts.las", "1 2 3", "unknown point cloud format"),
    ],
)
def test_unreadable_or_empty_point_clouds_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PointCloudError, match=message):
        make(1, init="points", init_points=str(path))


def test_missing_point_cloud_file():
    with pytest.raises(PointCloudError, match="does not exist"):
        make(1, init="points", init_points="/nonexistent/points.ply")


def test_knn_scales_of_a_grid():
    xs = torch.arange(5, dtype=torch.float32) * 0.1
    grid = torch.stack(torch.meshgrid(xs, xs, xs, indexing="ij"), -1).reshape(-1, 3)
    s = knn_scales(grid)
    torch.testing.assert_close(s[62], torch.tensor(0.1))  # interior point: 6 neighbours at 0.1


class SphereField:
    """A density field source (what a NeRF run provides): a red ball of radius 0.4."""

    surface_threshold = 1.0

    def density(self, p):
        return 2.0 * (0.4 - p.norm(dim=-1)).clamp_min(0) / 0.4 * 2

    def albedo(self, p):
        return torch.tensor([0.9, 0.1, 0.1]).expand(p.shape[0], 3)

    def bounds(self):
        return (-0.6, -0.6, -0.6), (0.6, 0.6, 0.6)


def test_initialize_from_a_density_field():
    g = make(500)
    done = g.initialize_from(SphereField())
    assert done["points"] == 500 and g.count == 500
    r = g.means.detach().norm(dim=-1)
    assert float((r - 0.3).abs().max()) < 0.03  # density 1 at |x| = 0.3
    torch.testing.assert_close(g.colors().detach(), torch.tensor([[0.9, 0.1, 0.1]]).expand(500, 3), atol=1e-4, rtol=0)


def test_density_field_and_mesh_export(tmp_path):
    g = make(400)
    g.initialize_from(SphereField())
    with torch.no_grad():
        g.log_scales.fill_(math.log(0.05))
        g.opacity_logits.fill_(3.0)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.9, 0.9, 0.9]])
    d = g.density(pts)
    assert float(d[1]) > 1.0 and float(d[2]) == 0.0
    # the block-wise field equals a brute-force sum over every Gaussian
    q = torch.rand(300, 3) * 0.8 - 0.4
    rot = __import__("distill3d.representations.gaussians.rasterize", fromlist=["x"]).quat_to_rotmat(g.quats)
    local = torch.einsum("gji,pgj->pgi", rot, q[:, None] - g.means[None]) / g.scales[None]
    brute = (g.opacities[None] * torch.exp(-0.5 * local.square().sum(-1))).sum(1)
    # each Gaussian counts inside its alpha >= 1/255 footprint only (as in the renderer)
    torch.testing.assert_close(g.density(q), brute.detach(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(g.albedo(pts[:2]), torch.tensor([[0.9, 0.1, 0.1]]).expand(2, 3), atol=1e-3, rtol=0)
    g.config.surface_threshold = 0.5  # dense, opaque Gaussians here: the mid level sits on the ball
    options = ExportOptions(resolution=40, decimate=400, texture_size=64, quiet=True)
    files = g.export("obj", tmp_path / "mesh.obj", options)
    assert (tmp_path / "mesh.obj") in files
    mesh = load_mesh(tmp_path / "mesh.obj")
    radius = mesh.vertices.norm(dim=-1)
    assert 0.25 < float(radius.mean()) < 0.45 and 100 < mesh.num_faces <= 400
    assert mesh.texture is not None and float(mesh.texture[..., 0].mean()) > 0.7  # red baked texture


def test_backend_registered_for_doctor_and_gsplat_refused_on_cpu():
    from distill3d.engine.backends import BackendUnavailable, backends_for, choose, describe

    assert backends_for("gaussian_rasterize") == ["gsplat", "torch"]
    assert choose("gaussian_rasterize", "auto", torch.device("cpu")) == "torch"
    row = next(r for r in describe(torch.device("cpu")) if r[0] == "gaussian_rasterize")
    assert row[1] == "torch" and dict(row[2])["gsplat"] == "gsplat needs a CUDA device"
    with pytest.raises(BackendUnavailable, match="CUDA"):
        make(10, rasterize_backend="gsplat")


class MeshRun:
    """A surface mesh source (what a DMTet run provides): the same ball as a mesh, green."""

    def export_mesh(self, resolution, target_faces, texture_size):
        from distill3d.representations.mesh.marching_cubes import extract_surface
        from distill3d.representations.mesh.mesh_io import Mesh

        verts, faces, _ = extract_surface(SphereField().density, SphereField().bounds(), 32, 1.0, pad=True)
        return Mesh(verts, faces), None

    def albedo(self, p):
        return torch.tensor([0.1, 0.8, 0.2]).expand(p.shape[0], 3)


def test_initialize_from_a_surface_mesh():
    g = make(300)
    done = g.initialize_from(MeshRun())
    assert done["points"] == 300 and done["mesh_faces"] > 100
    assert float((g.means.detach().norm(dim=-1) - 0.3).abs().max()) < 0.03
    torch.testing.assert_close(g.colors().detach(), torch.tensor([[0.1, 0.8, 0.2]]).expand(300, 3), atol=1e-4, rtol=0)


def test_export_density_widens_by_the_training_footprint_dilation():
    """The renderer widens every footprint by eps2d px^2: the export density widens every Gaussian
    by sqrt(eps2d) times the world size of a pixel at the scene centre in the last training render
    (kept in checkpoints), or by export_dilation when set."""
    from distill3d.engine.cameras import make_cameras

    torch.manual_seed(0)
    g = make(50)
    assert g.export_dilation() == 0.0 and torch.equal(g.field_scales(), g.scales)  # never trained: no widening
    cams = make_cameras(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([3.2]), torch.tensor([42.5]))
    with torch.no_grad():
        g.render(cams, RenderSettings(64, 64, training=False))
        assert g.export_dilation() == 0.0  # evaluation renders do not count
        g.render(cams, RenderSettings(64, 64, training=True))
    pixel = 3.2 / float(cams.focal(64)[0])
    assert g.export_dilation() == pytest.approx(math.sqrt(0.3) * pixel) and 0.015 < g.export_dilation() < 0.03
    torch.testing.assert_close(g.field_scales(), (g.scales.square() + g.export_dilation() ** 2).sqrt())
    far = g.means.detach()[:1] + torch.tensor([[0.0, 0.0, 0.3]])
    widened = float(g.density(far))
    fresh = make(50)
    fresh.load_state_dict(g.state_dict())
    fresh.load_extra_state(g.extra_state())
    assert fresh.export_dilation() == g.export_dilation()
    fresh.config.export_dilation = 0.0
    assert float(fresh.density(far)) < widened
