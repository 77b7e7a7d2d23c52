"""DMTet: tetrahedral grid, marching tetrahedra, the representation (render, gradients, fitting,
regularisers, NeRF-style initialisation, export)."""

import pytest
import torch

from distill3d.engine.cameras import make_cameras, orbit_cameras, pixel_rays
from distill3d.engine.config import from_dict
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.representations.dmtet import tet_grid as tg
from distill3d.representations.dmtet.marching_tets import NUM_TRIANGLES, TRIANGLE_TABLE, marching_tets
from distill3d.representations.dmtet.model import DMTet, DMTetConfig, normal_consistency, uniform_laplacian

SMALL = dict(grid_resolution=16, levels=4, log2_table_size=12, max_resolution=64, hidden_dim=16, hidden_layers=1, tet_cache=False)


def make(**overrides) -> DMTet:
    torch.manual_seed(0)
    return DMTet(from_dict(DMTetConfig, {**SMALL, **overrides}), BuildContext(total_steps=100))


def face_normals(v, f):
    return torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)


# ----- tet grid ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 8])
def test_tet_grid_counts_orientation_and_cover(n):
    v, t = tg.tet_grid(n, radius=0.7, use_disk=False)
    assert v.shape == ((n + 1) ** 3, 3) and v.dtype == torch.float32
    assert t.shape == (6 * n**3, 4) and t.dtype == torch.int32
    assert v.min() == pytest.approx(-0.7) and v.max() == pytest.approx(0.7)
    vol = tg.tet_volumes(v.double(), t)
    assert (vol > 0).all()  # consistently (positively) oriented
    assert float(vol.sum()) == pytest.approx(1.4**3, rel=1e-6)  # the cube is covered exactly
    assert torch.unique(t, dim=0).shape[0] == t.shape[0]
    assert int(t.max()) == v.shape[0] - 1 and int(t.min()) == 0


def test_tet_grid_is_conforming():
    """Every interior triangle is shared by exactly two tets, every boundary one by a single tet."""
    n = 3
    v, t = tg.tet_grid(n, use_disk=False)
    tri = torch.cat([t[:, [0, 1, 2]], t[:, [0, 1, 3]], t[:, [0, 2, 3]], t[:, [1, 2, 3]]])
    _, counts = torch.unique(torch.sort(tri, dim=1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert int((counts == 1).sum()) == 6 * 2 * n * n  # two triangles per boundary square


def test_tet_grid_cache_memory_and_disk(tmp_path):
    tg.clear_memory_cache()
    v1, t1 = tg.tet_grid(5, cache_dir=tmp_path)
    path = tmp_path / "tet_grids" / "tets_5.pt"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    v2, t2 = tg.tet_grid(5, cache_dir=tmp_path)
    assert v2 is v1 and t2 is t1  # memory cache hit
    tg.clear_memory_cache()
    v3, t3 = tg.tet_grid(5, cache_dir=tmp_path)  # from disk
    assert torch.equal(v3, v1) and torch.equal(t3, t1) and t3.dtype == torch.int32
    tg.clear_memory_cache()
    path.write_bytes(b"garbage")  # a corrupt file is regenerated, not an error
    v4, t4 = tg.tet_grid(5, cache_dir=tmp_path)
    assert torch.equal(t4, t1)
    with pytest.raises(ValueError):
        tg.tet_grid(0, use_disk=False)


# ----- marching tetrahedra -----------------------------------------------------------------
def test_triangle_table_counts():
    assert NUM_TRIANGLES.tolist() == [0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0]
    assert TRIANGLE_TABLE.shape == (16, 2, 3)


def test_marching_tets_sphere_is_closed_outward_and_accurate():
    n, r = 16, 0.6
    v, t = tg.tet_grid(n, use_disk=False)
    sdf = (r - v.norm(dim=-1)).requires_grad_()  # sdf > 0 inside
    pos = v.clone().requires_grad_()
    verts, faces = marching_tets(pos, sdf, t)
    assert faces.shape[0] > 100 and faces.dtype == torch.int64
    assert int(faces.max()) == verts.shape[0] - 1  # every vertex used
    # watertight and consistently oriented: every directed edge appears once and its reverse once
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected, counts = torch.unique(torch.sort(directed, dim=1).values, dim=0, return_counts=True)
    assert (counts == 2).all()
    assert torch.unique(directed, dim=0).shape[0] == directed.shape[0]
    # Euler characteristic of a sphere
    assert verts.shape[0] - undirected.shape[0] + faces.shape[0] == 2
    # vertices near the sphere (within a grid spacing) and face normals outward
    spacing = 2.0 / n
    assert (verts.norm(dim=-1) - r).abs().max() < spacing
    fn = face_normals(verts.detach(), faces)
    assert ((fn * verts.detach()[faces].mean(1)).sum(-1) > 0).all()
    # gradients reach the SDF and the positions
    (verts.norm(dim=-1) ** 2).sum().backward()
    assert sdf.grad.abs().sum() > 0 and pos.grad.abs().sum() > 0
    assert torch.isfinite(sdf.grad).all()


def test_marching_tets_gradient_moves_the_surface_correctly():
    v, t = tg.tet_grid(8, use_disk=False)
    sdf = (0.5 - v.norm(dim=-1)).requires_grad_()
    verts, _ = marching_tets(v, sdf, t)
    verts.norm(dim=-1).sum().backward()
    # raising the sdf (more inside) grows the sphere: d(radius)/d(sdf) >= 0 everywhere
    assert (sdf.grad >= -1e-6).all() and sdf.grad.sum() > 0


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_marching_tets_empty(value):
    v, t = tg.tet_grid(4, use_disk=False)
    sdf = torch.full((v.shape[0],), value, requires_grad=True)
    verts, faces = marching_tets(v, sdf, t)
    assert verts.shape == (0, 3) and faces.shape == (0, 3)


# ----- the representation --------------------------------------------------------------------
def test_render_shapes_ranges_and_gradients():
    m = make()
    cams = orbit_cameras(2, distance=3.0)
    out = m.render(cams, RenderSettings(32, 24, shading="lambertian", background="solid", need_normals=True))
    assert out.rgb.shape == (2, 32, 24, 3) and out.opacity.shape == (2, 32, 24, 1)
    assert out.depth.shape == (2, 32, 24, 1) and out.normal.shape == (2, 32, 24, 3)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1 + 1e-5
    assert out.opacity.min() >= 0 and out.opacity.max() <= 1
    # default sphere of radius 0.5 at distance 3: opaque centre, white background at the corners
    assert out.opacity[0, 16, 12] == 1 and out.opacity[0, 0, 0] == 0
    assert torch.allclose(out.rgb[0, 0, 0], torch.ones(3))
    assert 2.4 < out.depth[0, 16, 12].item() < 2.6
    assert out.normal[0, 16, 12, 2].item() > 0.9  # faces the camera on +z
    # silhouette loss reaches the SDF (and the deformation); colour loss reaches the colour field
    out.opacity.mean().backward(retain_graph=True)
    assert m.sdf.grad.abs().sum() > 0 and m.deformation.grad.abs().sum() > 0
    m.zero_grad()
    out.rgb.mean().backward()
    assert m.encoding.embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.color_net.parameters())


@pytest.mark.parametrize("mode", ["albedo", "textureless", "normal"])
def test_shading_modes(mode):
    m = make()
    out = m.render(make_cameras(0.0, 0.0, 3.0, 40.0), RenderSettings(16, 16, shading=mode, background="solid", training=False))
    assert torch.isfinite(out.rgb).all() and out.rgb.shape == (1, 16, 16, 3)
    if mode == "normal":
        assert out.rgb[0, 8, 8, 2].item() > 0.9


def test_empty_surface_renders_background():
    m = make()
    with torch.no_grad():
        m.sdf.fill_(-1.0)
    out = m.render(orbit_cameras(1), RenderSettings(8, 8, background="solid"))
    assert out.opacity.abs().sum() == 0 and torch.allclose(out.rgb, torch.ones_like(out.rgb))
    out.rgb.sum().backward()  # does not fail


def sphere_mask(cams, radius, h, w):
    o, d = pixel_rays(cams, h, w)
    t = -(o * d).sum(-1, keepdim=True)
    closest = (o + t * d).norm(dim=-1, keepdim=True)
    return (closest < radius).float()


def test_fitting_a_silhouette_reduces_the_loss():
    m = make()  # sphere of radius 0.5
    cams = orbit_cameras(4, elevation=20.0, distance=2.5)
    target = sphere_mask(cams, 0.7, 32, 32)
    opt = torch.optim.Adam([{"params": [m.sdf], "lr": 0.05}, {"params": [m.deformation], "lr": 0.05}])
    losses = []
    for _ in range(12):
        out = m.render(cams, RenderSettings(32, 32, background="solid"))
        loss = ((out.opacity - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        verts, _ = m.surface()
    assert float(verts.norm(dim=-1).mean()) > 0.55  # the sphere grew toward the target radius 0.7


def test_regularisers_respond_to_weights():
    cams = orbit_cameras(1)
    settings = RenderSettings(8, 8, background="solid")
    m0 = make()
    assert m0.regularizers(m0.render(cams, settings), 0) == {}
    m1 = make(normal_consistency_weight=1.0, laplacian_weight=1.0)
    m2 = make(normal_consistency_weight=2.0, laplacian_weight={"linear": [[0, 0.0], [100, 4.0]]})
    t1 = m1.regularizers(m1.render(cams, settings), 50)
    t2 = m2.regularizers(m2.render(cams, settings), 50)
    assert set(t1) == {"normal_consistency", "laplacian"}
    assert t1["normal_consistency"].item() > 0 and t1["laplacian"].item() > 0
    assert t2["normal_consistency"].item() == pytest.approx(2 * t1["normal_consistency"].item(), rel=1e-5)
    assert t2["laplacian"].item() == pytest.approx(2 * t1["laplacian"].item(), rel=1e-5)
    (t1["normal_consistency"] + t1["laplacian"]).backward()
    assert m1.sdf.grad.abs().sum() > 0


def test_regulariser_functions():
    # a flat grid of triangles: no normal variation, zero Laplacian for interior vertices only
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    f = torch.tensor([[0, 1, 2], [1, 3, 2]])
    assert float(normal_consistency(v, f)) == pytest.approx(0.0, abs=1e-7)
    bent = v.clone()
    bent[3, 2] = 1.0
    assert float(normal_consistency(bent, f)) > 0.1


def test_uniform_laplacian_by_hand():
    # a fan of four triangles around a centre vertex moved by dx off the centre of its ring
    dx = 0.2
    v = torch.tensor([[dx, 0.0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1]])
    # mean of neighbours minus the vertex, squared: centre (-dx, 0, 0); ring vertices see the centre
    # and their two ring neighbours
    expected = [dx**2, (dx / 3 - 1) ** 2, (dx / 3) ** 2 + 1, (dx / 3 + 1) ** 2, (dx / 3) ** 2 + 1]
    assert float(uniform_laplacian(v, f)) == pytest.approx(sum(expected) / 5, rel=1e-6)


def test_param_groups():
    m = make(background={"kind": "learned"})
    groups = {g["name"]: g for g in m.param_groups()}
    assert set(groups) == {"sdf", "deformation", "encoding", "network", "background"}
    assert groups["sdf"]["params"][0] is m.sdf and groups["deformation"]["params"][0] is m.deformation
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(m.parameters()))


def test_init_from_density():
    m = make()

    def density(x):  # Magic3D blob: 10 (1 - |x| / 0.5), above 5 inside |x| < 0.25
        return 10 * (1 - x.norm(dim=-1) / 0.5)

    thr = m.init_from_density(density, threshold=5.0, clamp=3.0)
    assert thr == 5.0 and m.sdf.max() <= 3.0 and m.sdf.min() >= -3.0
    verts, faces = m.surface()
    assert faces.shape[0] > 0
    assert (verts.norm(dim=-1) - 0.25).abs().max() < m.spacing
    assert float(m.init_from_density(lambda x: torch.relu(density(x)), threshold="auto")) > 0


def test_redistanced_seed_puts_the_surface_on_a_sharp_isosurface_off_the_lattice():
    """A NeRF-like density (a near step at the surface) seeds a stair-stepped surface through
    sdf = density / threshold - 1; the redistanced seed lands on the isosurface itself."""
    from distill3d.engine.reference_scene import DEFAULT_SCENE, load_scene
    from distill3d.engine.surface_metrics import scene_sdf, surface_metrics

    scene = load_scene(DEFAULT_SCENE)

    def density(x):  # ~0 outside, ~2000 |sdf| inside: the surface lies at density 10
        return torch.nn.functional.softplus(-scene_sdf(scene, x).float() * 2000.0)

    m = make(grid_resolution=32)
    m.init_from_density(lambda p: density(p) / 10.0, 1.0, clamp=1.0)
    stepped = surface_metrics(*m.surface(), scene, samples=3000)
    m.init_from_surface(density, 10.0)
    assert m.sdf.abs().max() <= 1.5 and (m.deformation == 0).all()
    verts, faces = m.surface()
    seeded = surface_metrics(verts, faces, scene, samples=3000)
    assert stepped["normal_error_median_deg"] > 15.0
    assert seeded["normal_error_median_deg"] < 0.4 * stepped["normal_error_median_deg"]
    assert seeded["chamfer_l1"] < stepped["chamfer_l1"]
    assert scene_sdf(scene, verts).abs().median() < 0.1 * m.spacing  # on the surface, not on the lattice


def test_export_mesh(tmp_path):
    from distill3d.representations.mesh.mesh_io import save_mesh

    m = make()
    mesh, info = m.export_mesh(texture_size=64)
    assert mesh.num_faces > 0 and mesh.uv is not None and mesh.texture.shape == (64, 64, 3)
    assert mesh.vertex_colors is not None and info.faces_final == mesh.num_faces and info.faces_marching_cubes > 0
    assert 0 < info.texel_coverage <= 1
    assert save_mesh(mesh, tmp_path / "dmtet.obj")


def test_seed_drops_small_solid_pieces_but_keeps_touching_ones():
    from distill3d.representations.dmtet.model import drop_small_solids

    g = torch.zeros(20, 20, 20, dtype=torch.bool)
    g[2:12, 2:12, 2:12] = True  # 1000 cells
    g[12, 12, 12] = True  # touches the cube at a corner: the same piece (26-connectivity)
    g[15, 15, 15] = True  # a one-cell floater
    g[16:18, 2:4, 2:4] = True  # 8 cells, 0.8% of the largest
    out = drop_small_solids(g, 0.02)
    assert int(out.sum()) == 1001 and out[12, 12, 12] and not out[15, 15, 15] and not out[16:18, 2:4, 2:4].any()
    assert torch.equal(drop_small_solids(g, 0.0), g) and torch.equal(drop_small_solids(g, 0.0005), g)
