"""Hash-grid NeRF: rendering outputs, shading, backgrounds, normals, occupancy, regularisers."""

import pytest
import torch

from distill3d.engine.cameras import make_cameras, orbit_cameras
from distill3d.engine.config import from_dict
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.representations.nerf.model import HashGridNeRF, NeRFConfig

SMALL = {"levels": 4, "log2_table_size": 12, "max_resolution": 64, "samples_per_ray": 24, "occupancy": {"resolution": 16, "warmup_steps": 0, "update_every": 1}}


def make(**overrides):
    cfg = from_dict(NeRFConfig, {**SMALL, **overrides})
    return HashGridNeRF(cfg, BuildContext(total_steps=100))


def test_render_shapes_ranges_and_gradients():
    nerf = make()
    cams = orbit_cameras(2, distance=3.0)
    out = nerf.render(cams, RenderSettings(12, 10, shading="albedo", background="solid"))
    assert out.rgb.shape == (2, 12, 10, 3) and out.opacity.shape == (2, 12, 10, 1) and out.depth.shape == (2, 12, 10, 1)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1 + 1e-6 and out.opacity.max() <= 1 + 1e-6
    # the density blob (Magic3D style) makes the centre opaque and the corners see the white background
    assert out.opacity[0, 6, 5] > 0.9 and out.opacity[0, 0, 0] < 0.05
    assert torch.allclose(out.rgb[0, 0, 0], torch.ones(3), atol=0.05)
    out.rgb.mean().backward()
    assert nerf.encoding.embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None for p in nerf.color_net.parameters())


def test_depth_of_the_blob_surface_is_in_front_of_the_centre():
    nerf = make()
    cam = make_cameras(0.0, 0.0, 3.0, 40.0)
    out = nerf.render(cam, RenderSettings(9, 9, background="solid", training=False))
    # Magic3D blob: density bias 10 (1 - r / 0.5) > 0 inside r < 0.5: surface near distance 2.5
    assert 2.3 < out.depth[0, 4, 4, 0] / out.opacity[0, 4, 4, 0] < 2.8


def test_finite_difference_normals_of_the_blob_point_outward():
    nerf = make()
    points = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1) * 0.4
    normals = nerf.normals(points)
    cos = (normals * torch.nn.functional.normalize(points, dim=-1)).sum(-1)
    assert cos.min() > 0.9


def _shade_by_hand(mode, albedo, n, light, ambient=0.1, diffuse=0.9):
    """DreamFusion's shading written out: ambient + diffuse * max(0, n . l) times the albedo
    (lambertian) or alone, grey (textureless); normals mapped to colours as (n + 1) / 2."""
    lambert = (n * light).sum(-1, keepdim=True).clamp_min(0)
    return {
        "albedo": albedo,
        "lambertian": albedo * (ambient + diffuse * lambert),
        "textureless": (ambient + diffuse * lambert).expand_as(albedo),
        "normal": (n + 1) / 2,
    }[mode]


@pytest.mark.parametrize("mode", ["albedo", "lambertian", "textureless", "normal"])
def test_shading_modes_follow_the_shading_formula_at_a_pixel(mode):
    """One off-axis pixel re-rendered by hand: march its ray, shade every sample with the formula
    (light at the camera when not training), composite w_i = T_i (1 - exp(-sigma_i delta_i))."""
    from distill3d.engine.cameras import pixel_rays
    from distill3d.representations.nerf.rendering import march_torch, ray_sphere_bounds

    torch.manual_seed(0)
    nerf = make(samples_per_ray=48)
    with torch.no_grad():  # a non-trivial albedo field so lambertian differs from albedo
        nerf.encoding.embeddings.normal_(0, 0.5)
    cam = make_cameras(25.0, 40.0, 3.0, 40.0)
    size, (row, col) = 9, (3, 5)
    with torch.no_grad():
        out = nerf.render(cam, RenderSettings(size, size, shading=mode, background="solid", training=False))
        origins, dirs = pixel_rays(cam, size, size)
        o, d = origins[0, row, col][None], dirs[0, row, col][None]
        near, far, _ = ray_sphere_bounds(o, d, 1.0)
        samples = march_torch(o, d, near, far, 48, None, False)
        points = o + d * samples.t_mid[:, None]
        sigma, albedo = nerf.field(points)
        light = torch.nn.functional.normalize(cam.position[0], dim=-1)
        colour = _shade_by_hand(mode, albedo, nerf.normals(points), light)
        alpha = 1 - torch.exp(-sigma * samples.deltas)
        trans = torch.cumprod(torch.cat([torch.ones(1), 1 - alpha[:-1]]), 0)
        w = trans * alpha
        expected = (w[:, None] * colour).sum(0) + (1 - w.sum()) * out.background[0, row, col]
    assert 0.5 < w.sum() < 1.0 + 1e-5  # the pixel sees the object
    assert out.normal is not None or mode == "albedo"
    torch.testing.assert_close(out.rgb[0, row, col], expected, rtol=1e-4, atol=1e-4)
    if mode != "albedo":  # the modes differ from each other at this pixel
        assert (expected - _shade_by_hand("albedo", albedo, nerf.normals(points), light).mul(w[:, None]).sum(0) - (1 - w.sum()) * out.background[0, row, col]).abs().max() > 0.02


def test_backgrounds():
    cams = orbit_cameras(3, distance=3.0)
    nerf = make(background={"kind": "random"})
    out = nerf.render(cams, RenderSettings(6, 6))
    bg = out.background
    assert torch.allclose(bg[:, 0, 0], bg[:, 5, 5]) and not torch.allclose(bg[0, 0, 0], bg[1, 0, 0])
    learned = make(background={"kind": "learned"})
    out = learned.render(cams, RenderSettings(6, 6))
    out.rgb.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.background.parameters())
    assert any(g.get("name") == "background" for g in learned.param_groups())


def test_occupancy_grid_marks_the_blob_and_skips_the_rest():
    nerf = make()
    nerf.update(0)
    assert nerf.occupancy.active()
    frac = nerf.occupancy.occupied_fraction()
    assert 0.01 < frac < 0.5
    inside = nerf.occupancy(torch.zeros(1, 3))
    outside = nerf.occupancy(torch.tensor([[0.95, 0.95, 0.95]]))
    assert inside.item() and not outside.item()


def test_regularisers_follow_their_weights():
    nerf = make(orientation_weight=1.0, opacity_weight=0.5)
    out = nerf.render(orbit_cameras(1, distance=3.0), RenderSettings(8, 8))
    terms = nerf.regularizers(out, 0)
    assert set(terms) == {"orientation", "opacity"}
    assert terms["opacity"].item() == pytest.approx(0.5 * out.opacity.mean().item())
    assert make().regularizers(out, 0) == {}


def test_normal_smoothness_2d_is_zero_on_flat_maps_and_pulls_bumps_flat():
    from distill3d.representations.nerf.model import normal_smoothness_2d

    h = w = 12
    flat = torch.zeros(1, h, w, 3)
    flat[..., 2] = 1.0
    opacity = torch.ones(1, h, w, 1)
    assert normal_smoothness_2d(flat, opacity).item() == pytest.approx(0.0, abs=1e-10)
    # a disc on a transparent background: its silhouette is not a normal edge
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (((yy - 5.5) ** 2 + (xx - 5.5) ** 2) < 16).float()[None, ..., None]
    assert normal_smoothness_2d(flat * disc * 0.7, disc * 0.7).item() == pytest.approx(0.0, abs=1e-10)
    # one tilted pixel costs, and the gradient turns it back towards its neighbours' normal
    bumpy = flat.clone()
    bumpy[0, 6, 6] = torch.tensor([0.6, 0.0, 0.8])
    bumpy.requires_grad_(True)
    loss = normal_smoothness_2d(bumpy, opacity)
    assert loss.item() > 1e-3
    loss.backward()
    g = bumpy.grad[0, 6, 6]
    assert g[0] > 0 and g[2] < 0  # descent: x decreases, z increases
    assert bumpy.grad[0, 0, 0].abs().max() == 0  # the blur is constant: far pixels are not pulled


def test_normal_smoothness_regulariser_in_training_renders():
    nerf = make(normal_smooth_weight=2.0)
    out = nerf.render(orbit_cameras(1, distance=3.0), RenderSettings(10, 10, shading="albedo"))
    assert out.normal is not None  # training renders produce normals when the regulariser is on
    terms = nerf.regularizers(out, 0)
    assert set(terms) == {"normal_smooth"} and terms["normal_smooth"].item() > 0
    terms["normal_smooth"].backward()
    assert nerf.encoding.embeddings.grad.abs().sum() > 0
    with pytest.raises(Exception, match="normal_smooth_kernel must be an odd number"):
        make(normal_smooth_kernel=4)


def test_normal_regularisers_only_cost_normals_at_their_steps():
    nerf = make(normal_smooth_weight={"linear": [[0, 0.0], [50, 0.0], [51, 1.0]]}, regularizer_every=2)
    cams, settings = orbit_cameras(1, distance=3.0), RenderSettings(8, 8, shading="albedo")
    for step, expect in ((10, None), (61, None), (62, 2.0)):  # off by schedule, off-step, on (x every)
        nerf.update(step)
        out = nerf.render(cams, settings)
        assert (out.normal is not None) == (expect is not None)
        terms = nerf.regularizers(out, step)
        if expect is None:
            assert terms == {}
        else:
            from distill3d.representations.nerf.model import normal_smoothness_2d

            assert terms["normal_smooth"].item() == pytest.approx(expect * normal_smoothness_2d(out.normal, out.opacity).item())
    with pytest.raises(Exception, match="regularizer_every must be >= 1"):
        make(regularizer_every=0)


def test_bad_shading_mix_is_rejected():
    with pytest.raises(ValueError, match="unknown shading mode 'toon'"):
        make(shading={"train_mix": {"toon": 1.0}})


def test_trunc_exp_density_and_dreamfusion_blob():
    """sigma = exp(raw + scale * exp(-|x|^2 / (2 r^2))) with the exp's gradient clamped at 15."""
    nerf = make(density_activation="trunc_exp", density_blob="dreamfusion", blob_scale=5.0, blob_radius=0.4)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.3], [0.6, 0.0, 0.0], [0.0, 0.9, 0.2]])
    with torch.no_grad():
        raw = nerf.density_net(nerf.encoding((points + 1) / 2))[:, 0]
    expected = torch.exp(raw + 5.0 * torch.exp(-(points * points).sum(-1) / (2 * 0.4**2)))
    torch.testing.assert_close(nerf.density(points), expected, rtol=1e-5, atol=1e-6)
    # Instant-NGP's truncated exp: the value is exp(x), the gradient exp(min(x, 15)).
    from distill3d.representations.nerf.model import TruncExp

    x = torch.tensor([0.0, 2.0, 20.0], dtype=torch.float64, requires_grad=True)
    y = TruncExp.apply(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.exp(x.detach()))
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([0.0, 2.0, 15.0], dtype=torch.float64)))


def test_export_mesh_at_the_nominal_threshold():
    # nominal threshold ln2 / step: a sample interval is 50% opaque there
    nerf = make(samples_per_ray=64, blob_scale=100.0, surface_calibration="nominal")
    assert nerf.surface_threshold == nerf.nominal_surface_threshold == pytest.approx(0.6931 / (2 / 64), rel=1e-3)
    mesh, info = nerf.export_mesh(resolution=48, texture_size=32)
    # softplus(100 (1 - r / 0.5)) = 22.18 at r = 0.5 (1 - 0.2218): a sphere of radius ~0.389
    radii = mesh.vertices.norm(dim=-1)
    assert info.faces_final > 100 and radii.mean().item() == pytest.approx(0.389, abs=0.02) and radii.std() < 0.02
    assert mesh.texture is not None and mesh.uv is not None


def test_calibrated_export_has_the_renders_silhouettes():
    """The default threshold is calibrated on the renders: its mesh's silhouettes match them better
    than the nominal level's (here the soft blob renders much larger than its nominal isosurface; 40 px views, a coarse grid)."""
    from distill3d.engine.evaluation import mask_iou
    from distill3d.representations.mesh.render import render_mesh

    nerf = make(samples_per_ray=64, blob_scale=40.0)
    calibrated = nerf.surface_threshold
    assert calibrated != pytest.approx(nerf.nominal_surface_threshold, rel=0.05)
    cams = orbit_cameras(3, elevation=10.0, distance=3.0)
    with torch.no_grad():
        rendered = nerf.render(cams, RenderSettings(40, 40, shading="albedo", background="solid", training=False)).opacity[..., 0] > 0.5
    ious = {}
    for name, thr in (("calibrated", calibrated), ("nominal", nerf.nominal_surface_threshold)):
        from distill3d.representations.mesh.texture_bake import mesh_from_fields

        mesh, _ = mesh_from_fields(nerf.density, nerf.albedo, resolution=48, threshold=thr, texture_size=16, smoothing=0)
        ious[name] = sum(mask_iou(render_mesh(mesh, cams[i], 40, 40).opacity[..., 0] > 0.5, rendered[i : i + 1]) for i in range(3)) / 3
    assert ious["calibrated"] > 0.8 and ious["calibrated"] > ious["nominal"] + 0.3, ious
