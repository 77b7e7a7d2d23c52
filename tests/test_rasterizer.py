"""Mesh rasterizer: coverage, depth test, perspective-correct barycentrics, camera conventions,
silhouette gradients, backends."""

from __future__ import annotations


import pytest
import torch

from distill3d.engine.backends import BackendUnavailable, backends_for, choose
from distill3d.engine.cameras import make_cameras, pixel_rays
from distill3d.representations.mesh.rasterizer import (
    antialias,
    antialias_torch,
    face_adjacency,
    interpolate,
    project,
    rasterize,
    rasterize_torch,
)


def _pixel_centres(h, w):
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return xs, ys


def _clip_from_pixels(pts, h, w, z=0.0, wcoord=1.0):
    """Pixel-space (x right, y down) 2D points -> clip (1, V, 4) with given z and w."""
    pts = torch.as_tensor(pts, dtype=torch.float32)
    x = pts[:, 0] / w * 2 - 1
    y = 1 - pts[:, 1] / h * 2
    z = torch.as_tensor(z, dtype=torch.float32).expand_as(x)
    wc = torch.as_tensor(wcoord, dtype=torch.float32).expand_as(x)
    return torch.stack([x * wc, y * wc, z * wc, wc], -1)[None]


def _inside_2d(p0, p1, p2, xs, ys):
    def edge(a, b):
        return (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])

    e0, e1, e2 = edge(p1, p2), edge(p2, p0), edge(p0, p1)
    return ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))


def test_backend_registry_on_cpu():
    assert "torch" in backends_for("rasterize") and "nvdiffrast" in backends_for("rasterize")
    assert backends_for("rasterize")[0] == "nvdiffrast"  # preferred where it can run
    assert choose("rasterize", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailable, match="CUDA"):
        choose("rasterize", "nvdiffrast", torch.device("cpu"))


def test_coverage_matches_pixel_centre_test():
    h, w = 20, 28
    tri = [(3.2, 2.7), (24.6, 6.1), (9.9, 17.4)]
    clip = _clip_from_pixels(tri, h, w)
    frags = rasterize(clip, torch.tensor([[0, 1, 2]]), h, w)
    xs, ys = _pixel_centres(h, w)
    expected = _inside_2d(*tri, xs, ys)
    assert frags.triangle_id.shape == (1, h, w)
    assert torch.equal(frags.mask[0], expected)
    assert (frags.triangle_id[0][expected] == 0).all()
    assert (frags.bary[0][~expected] == 0).all()
    b = frags.bary[0][expected]
    assert torch.allclose(b.sum(-1), torch.ones(len(b)), atol=1e-5) and (b >= -1e-6).all()


def test_perspective_correct_barycentrics():
    # A face with different w per vertex: interpolating clip positions gives back the pixel's NDC.
    h, w = 16, 16
    wv = torch.tensor([1.0, 2.5, 4.0])
    ndc = torch.tensor([[-0.9, -0.8], [0.9, -0.6], [-0.1, 0.95]])
    clip = torch.cat([ndc * wv[:, None], (0.3 * wv)[:, None], wv[:, None]], -1)[None]
    frags = rasterize_torch(clip, torch.tensor([[0, 1, 2]]), h, w)
    p = interpolate(clip[0], frags, torch.tensor([[0, 1, 2]]))[0]
    m = frags.mask[0]
    assert m.sum() > 50
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    ys = 1 - (torch.arange(h) + 0.5) / h * 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    assert torch.allclose((p[..., 0] / p[..., 3])[m], gx[m], atol=1e-5)
    assert torch.allclose((p[..., 1] / p[..., 3])[m], gy[m], atol=1e-5)
    assert torch.allclose(frags.depth[0][m], (p[..., 2] / p[..., 3])[m], atol=1e-6)


def _plane_cameras():
    return make_cameras([20.0, -10.0, 35.0], [30.0, -50.0, 160.0], [3.0, 2.5, 3.5], [50.0, 40.0, 60.0])


def test_plane_depth_matches_ray_casting():
    # Plane y = 0.1 (quad of half-size 1.2): rasterized ray distance == analytic ray casting.
    s, y0 = 1.2, 0.1
    verts = torch.tensor([[-s, y0, -s], [s, y0, -s], [s, y0, s], [-s, y0, s]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cams = _plane_cameras()
    h, w = 40, 48
    frags = rasterize(project(verts, cams.mvp(aspect=w / h)), faces, h, w)
    pos = interpolate(verts, frags, faces)
    origins, dirs = pixel_rays(cams, h, w)
    t = (y0 - origins[..., 1]) / dirs[..., 1]
    hit = origins + t[..., None] * dirs
    inside = (t > 0) & (hit[..., 0].abs() < s) & (hit[..., 2].abs() < s)
    margin = (hit[..., 0].abs() < s - 0.05) & (hit[..., 2].abs() < s - 0.05) & (t > 0)
    m = frags.mask
    assert margin.sum() > 500
    assert (m | ~margin).all() and (~m | inside | ~margin).all()
    assert ((m & ~inside).sum() + (~m & inside).sum()) < 0.02 * inside.sum()
    both = m & margin
    dist = (pos - origins).norm(dim=-1)
    assert torch.allclose(dist[both], t[both], rtol=1e-4, atol=1e-4)
    assert torch.allclose(pos[both], hit[both], atol=1e-4)


def test_depth_test_keeps_nearest_regardless_of_order():
    h, w = 24, 24
    a = _clip_from_pixels([(2.1, 2.2), (22.3, 3.1), (4.2, 21.3)], h, w, z=0.2)
    b = _clip_from_pixels([(20.1, 20.3), (3.2, 12.1), (21.3, 1.2)], h, w, z=-0.3)  # nearer
    verts = torch.cat([a, b], 1)
    f1 = torch.tensor([[0, 1, 2], [3, 4, 5]])
    f2 = torch.tensor([[3, 4, 5], [0, 1, 2]])
    r1 = rasterize_torch(verts, f1, h, w)
    r2 = rasterize_torch(verts, f2, h, w)
    xs, ys = _pixel_centres(h, w)
    in_b = _inside_2d((20.1, 20.3), (3.2, 12.1), (21.3, 1.2), xs, ys)
    in_a = _inside_2d((2.1, 2.2), (22.3, 3.1), (4.2, 21.3), xs, ys)
    assert (in_a & in_b).sum() > 20
    assert (r1.triangle_id[0][in_b] == 1).all() and (r2.triangle_id[0][in_b] == 0).all()
    assert (r1.triangle_id[0][in_a & ~in_b] == 0).all()
    assert torch.allclose(r1.depth, r2.depth)


def test_batch_equals_single_views_and_attribute_gradients():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    verts = torch.tensor(m.vertices, dtype=torch.float32)
    faces = torch.tensor(m.faces)
    cams = _plane_cameras()
    clip = project(verts, cams.mvp())
    full = rasterize_torch(clip, faces, 32, 32)
    for i in range(len(cams)):
        one = rasterize_torch(clip[i : i + 1], faces, 32, 32)
        assert torch.equal(one.triangle_id[0], full.triangle_id[i])
        assert torch.allclose(one.bary[0], full.bary[i])
    colors = torch.rand(len(verts), 3, requires_grad=True)
    out = interpolate(colors, full, faces)
    out.sum().backward()
    assert colors.grad.abs().sum() > 0
    # Per-view attributes (B, V, C) broadcast the same way.
    out2 = interpolate(colors.detach()[None].expand(len(cams), -1, -1), full, faces)
    assert torch.allclose(out.detach(), out2)


def test_faces_crossing_the_near_plane_and_behind_the_camera():
    # A large ground plane under a camera looking slightly down: part of it is behind the camera.
    s, y0 = 50.0, -0.5
    verts = torch.tensor([[-s, y0, -s], [s, y0, -s], [s, y0, s], [-s, y0, s]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cams = make_cameras([10.0], [0.0], [2.0], [60.0])
    h, w = 32, 32
    frags = rasterize_torch(project(verts, cams.mvp(near=0.1, far=1000.0)), faces, h, w)
    origins, dirs = pixel_rays(cams, h, w)
    t = (y0 - origins[..., 1]) / dirs[..., 1]
    hit = (t > 0) & ((origins + t[..., None] * dirs)[..., 0].abs() < s) & ((origins + t[..., None] * dirs)[..., 2].abs() < s)
    assert 0.2 < hit.float().mean() < 0.8
    assert (frags.mask != hit).sum() <= 2 * w  # only along the horizon row(s)
    pos = interpolate(verts, frags, faces)
    both = frags.mask & hit & (t < 20)
    assert torch.allclose((pos - origins).norm(dim=-1)[both], t[both], rtol=1e-3)
    # Entirely behind the camera: nothing.
    behind = verts.clone()
    behind[:, 2] = 5.0 + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert not rasterize_torch(project(behind, cams.mvp()), faces, h, w).mask.any()


def test_face_adjacency():
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [3, 4, 2]])
    adj = face_adjacency(faces)
    # Edge k of a face joins its vertices k and k+1: face 0's edge (1, 2) is face 1's edge (2, 1).
    assert adj.tolist() == [[-1, 1, -1], [0, -1, 2], [-1, -1, 1]]


def test_antialias_leaves_interior_edges_and_constant_colour_alone():
    h, w = 24, 24
    verts = _clip_from_pixels([(3, 3), (20, 4), (21, 20), (4, 19)], h, w)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    frags = rasterize_torch(verts, faces, h, w)
    col = torch.where(frags.mask[..., None], torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 1.0, 1.0]))
    out = antialias(col, frags, verts, faces)
    m = frags.mask[0]
    interior = m.clone()
    interior[1:] &= m[:-1]
    interior[:-1] &= m[1:]
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    assert torch.equal(out[0][interior], col[0][interior])  # shared diagonal edge is no silhouette
    assert not torch.equal(out, col)  # the outline is blended


def _coverage(verts, faces, h, w):
    frags = rasterize_torch(verts, faces, h, w)
    return antialias_torch(frags.mask[..., None].float(), frags, verts, faces)[..., 0]


def test_antialiased_coverage_tracks_area_and_its_gradient():
    h, w = 48, 48
    pts = torch.tensor([(6.3, 5.2), (41.7, 12.9), (17.4, 43.1)])
    faces = torch.tensor([[0, 1, 2]])
    clip = _clip_from_pixels(pts, h, w).requires_grad_(True)
    cov = _coverage(clip, faces, h, w)
    area = 0.5 * abs(float(torch.linalg.det(torch.stack([pts[1] - pts[0], pts[2] - pts[0]]))))
    hard = rasterize_torch(clip.detach(), faces, h, w).mask.sum().item()
    assert abs(cov.sum().item() - area) < abs(hard - area) + 1.0
    assert abs(cov.sum().item() - area) < 0.02 * area
    cov.sum().backward()
    # Analytic d(area)/d(vertex) in pixels, mapped to clip x (dx_pix/dx_clip = w/2) and y (-h/2).
    g = clip.grad[0, :, :2]
    for k in range(3):
        a, b = pts[(k + 1) % 3], pts[(k + 2) % 3]
        # area = 0.5 |cross(b - a, p - a)|; gradient of area w.r.t. p is perpendicular to (b - a).
        e = b - a
        sign = 1.0 if float(e[0] * (pts[k] - a)[1] - e[1] * (pts[k] - a)[0]) > 0 else -1.0
        grad_pix = 0.5 * sign * torch.tensor([-e[1], e[0]])
        expected = torch.stack([grad_pix[0] * w / 2, -grad_pix[1] * h / 2])
        assert torch.allclose(g[k], expected, rtol=0.15, atol=0.05 * expected.abs().max())


def test_silhouette_gradient_moves_vertex_toward_target_mask():
    h, w = 32, 32
    faces = torch.tensor([[0, 1, 2]])
    target_pts = [(4.0, 4.0), (28.0, 6.0), (14.0, 27.0)]
    target = _coverage(_clip_from_pixels(target_pts, h, w), faces, h, w).detach()
    start = torch.tensor(target_pts)
    start[1] = torch.tensor([22.0, 9.0])  # vertex 1 pulled inward
    clip = _clip_from_pixels(start, h, w).requires_grad_(True)
    loss = (_coverage(clip, faces, h, w) - target).square().sum()
    loss.backward()
    g = clip.grad[0, 1, :2]
    to_target = torch.tensor([(28.0 - 22.0) / w * 2, -(6.0 - 9.0) / h * 2])
    assert torch.dot(-g, to_target) > 0  # descent direction points toward the target position
    assert clip.grad[0, [0, 2], :2].abs().sum() < g.abs().sum() * 2
    # A few steps of (normalised) gradient descent close most of the gap.
    x = clip.detach().clone()
    for _ in range(30):
        x.requires_grad_(True)
        (_coverage(x, faces, h, w) - target).square().sum().backward()
        with torch.no_grad():
            x = x - 0.02 * x.grad / x.grad.abs().max().clamp_min(1e-12)
    final = (_coverage(x.detach(), faces, h, w) - target).square().sum().item()
    assert final < 0.2 * loss.item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvdiffrast_matches_torch_backend():
    pytest.importorskip("nvdiffrast.torch")
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    verts = torch.tensor(m.vertices, dtype=torch.float32, device="cuda")
    faces = torch.tensor(m.faces, device="cuda")
    cams = _plane_cameras().to("cuda")
    h, w = 96, 128
    clip = project(verts, cams.mvp(aspect=w / h))
    assert choose("rasterize", "auto", torch.device("cuda")) == "nvdiffrast"
    a = rasterize(clip, faces, h, w, backend="torch")
    b = rasterize(clip, faces, h, w, backend="nvdiffrast")
    assert b.backend == "nvdiffrast"
    same = a.triangle_id == b.triangle_id
    assert (a.mask != b.mask).float().mean() < 0.005
    assert same.float().mean() > 0.99
    both = same & a.mask
    assert torch.allclose(a.bary[both], b.bary[both], atol=1e-3)
    assert torch.allclose(a.depth[both], b.depth[both], atol=1e-4)
    pa, pb = interpolate(verts, a, faces), interpolate(verts, b, faces)
    assert torch.allclose(pa[both], pb[both], atol=1e-3)
    # Silhouette gradients agree in direction.
    grads = []
    for backend in ("torch", "nvdiffrast"):
        v = verts.clone().requires_grad_(True)
        c = project(v, cams.mvp(aspect=w / h))
        fr = rasterize(c, faces, h, w, backend=backend)
        cov = antialias(fr.mask[..., None].float(), fr, c, faces)
        cov.sum().backward()
        grads.append(v.grad.flatten())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.8, float(cos)


def _interior_pixels(clip, faces, h, w, margin=2e-3, tries=4):
    """Covered pixels whose visible face does not change when the vertices move by +-margin: there the
    fragments are smooth functions of the vertices, and finite differences must match autograd."""
    base = rasterize_torch(clip, faces, h, w).triangle_id
    keep = base >= 0
    g = torch.Generator().manual_seed(0)
    for _ in range(tries):
        noise = (torch.rand(clip.shape, generator=g, dtype=clip.dtype) * 2 - 1) * margin
        keep &= rasterize_torch(clip + noise, faces, h, w).triangle_id == base
    return keep


def test_interior_barycentric_depth_and_uv_gradients_match_finite_differences():
    """gradcheck (float64 central differences) of the perspective-correct barycentrics, the z/w
    depth and an interpolated UV attribute with respect to the clip-space vertices and the UVs, at
    pixels inside faces (two overlapping faces with different w, so the depth test and the
    perspective division are both exercised)."""
    h, w = 10, 12
    ndc = torch.tensor([[-0.85, -0.7, 0.2], [0.9, -0.5, 0.5], [-0.2, 0.85, -0.1], [0.8, 0.75, 0.3], [-0.6, 0.2, -0.4]], dtype=torch.float64)
    wv = torch.tensor([1.0, 2.0, 1.5, 1.2, 2.5], dtype=torch.float64)
    clip = torch.cat([ndc * wv[:, None], wv[:, None]], -1)[None]
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [4, 1, 3]])
    uv = torch.rand(5, 2, dtype=torch.float64)
    keep = _interior_pixels(clip, faces, h, w)
    tids = rasterize_torch(clip, faces, h, w).triangle_id[keep]
    assert keep.sum() > 40 and len(set(tids.tolist())) == 3  # every face visible somewhere

    def fragments(c, u):
        frags = rasterize_torch(c, faces, h, w)
        assert torch.equal(frags.triangle_id[keep], tids)
        return frags.bary[keep], frags.depth[keep], interpolate(u, frags, faces)[keep]

    assert torch.autograd.gradcheck(fragments, (clip.clone().requires_grad_(True), uv.clone().requires_grad_(True)), eps=1e-6, atol=1e-6, rtol=1e-4)
