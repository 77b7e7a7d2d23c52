"""Analytic reference scenes: exact hits against hand-computed values, renders, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill3d.engine.cameras import make_cameras, orbit_cameras
from distill3d.engine.interfaces import RenderOutput
from distill3d.engine.reference_scene import (
    DEFAULT_SCENE,
    SCENES_DIR,
    PrimitiveScene,
    SceneError,
    load_scene,
    rotation_matrix,
)

RED, GREEN, BLUE = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP stalls on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(*prims) -> PrimitiveScene:
    return PrimitiveScene.from_dict({"primitives": list(prims)})


def cast(sc: PrimitiveScene, origin, direction):
    o = torch.tensor([origin], dtype=torch.float32)
    d = torch.nn.functional.normalize(torch.tensor([direction], dtype=torch.float32), dim=1)
    hit, depth, normal, color = sc.intersect(o, d)
    return bool(hit[0]), float(depth[0]), normal[0].tolist(), color[0].tolist()


def assert_hit(result, depth, normal, atol=1e-5):
    hit, got_depth, got_normal, _ = result
    assert hit, "expected a hit"
    assert got_depth == pytest.approx(depth, abs=atol)
    assert got_normal == pytest.approx(normal, abs=atol)


# ---------------------------------------------------------------------------------------------
# Hand-computed hits


def test_sphere_hits():
    sc = scene({"type": "sphere", "center": [0, 0, 0], "radius": 0.5, "color": RED})
    assert_hit(cast(sc, [0, 0, 3], [0, 0, -1]), 2.5, [0, 0, 1])
    # Off-axis: x = 0.3 meets the sphere at z = sqrt(0.25 - 0.09) = 0.4.
    assert_hit(cast(sc, [0.3, 0, 3], [0, 0, -1]), 2.6, [0.6, 0, 0.8])
    assert not cast(sc, [0.51, 0, 3], [0, 0, -1])[0]
    assert not cast(sc, [0, 0, 3], [0, 0, 1])[0], "a sphere behind the ray must not be hit"
    # Off-centre sphere, from below.
    sc = scene({"type": "sphere", "center": [0.2, 0.1, -0.3], "radius": 0.25, "color": RED})
    assert_hit(cast(sc, [0.2, -3, -0.3], [0, 1, 0]), 3 + 0.1 - 0.25, [0, -1, 0])


def test_box_hits():
    sc = scene({"type": "box", "center": [0.1, 0, 0], "size": [0.4, 0.6, 0.8], "color": GREEN})
    assert_hit(cast(sc, [0.1, 0, 3], [0, 0, -1]), 3 - 0.4, [0, 0, 1])
    assert_hit(cast(sc, [3, 0.1, 0.1], [-1, 0, 0]), 3 - 0.3, [1, 0, 0])
    assert_hit(cast(sc, [0.0, -2, 0.2], [0, 1, 0]), 2 - 0.3, [0, -1, 0])
    assert not cast(sc, [0.31, 0, 3], [0, 0, -1])[0]
    assert not cast(sc, [0.1, 0.31, 3], [0, 0, -1])[0]
    # A diagonal ray onto the top face: from (0.1, 2, 2) toward -y,-z reaches y = 0.3 at z = 0.3,
    # outside the box (|z| <= 0.4 holds, so it hits the top face at (0.1, 0.3, 0.3)).
    assert_hit(cast(sc, [0.1, 2, 2], [0, -1, -1]), 1.7 * math.sqrt(2), [0, 1, 0])


def test_cylinder_hits():
    sc = scene({"type": "cylinder", "center": [0, 0, 0], "radius": 0.3, "height": 1.0, "color": BLUE})
    assert_hit(cast(sc, [0, 3, 0], [0, -1, 0]), 2.5, [0, 1, 0])  # top cap
    assert_hit(cast(sc, [0.1, -3, 0.1], [0, 1, 0]), 2.5, [0, -1, 0])  # bottom cap
    assert_hit(cast(sc, [0, 0, 3], [0, 0, -1]), 2.7, [0, 0, 1])  # side
    assert_hit(cast(sc, [0.18, 0.2, 3], [0, 0, -1]), 3 - 0.24, [0.6, 0, 0.8])  # side, off-axis
    assert not cast(sc, [0, 0.51, 3], [0, 0, -1])[0], "above the top cap"
    assert not cast(sc, [0.31, 0, 3], [0, 0, -1])[0]
    # Diagonal: from (0, 2, 2) toward -y,-z; the cap plane y = 0.5 is met at z = 0.5 (outside the
    # disc) so the side z = 0.3 is hit at y = 0.3.
    assert_hit(cast(sc, [0, 2, 2], [0, -1, -1]), 1.7 * math.sqrt(2), [0, 0, 1])


def test_torus_hits():
    sc = scene({"type": "torus", "center": [0, 0, 0], "radii": [0.5, 0.15], "color": RED})
    assert not cast(sc, [0, 3, 0], [0, -1, 0])[0], "the hole"
    assert_hit(cast(sc, [0.5, 3, 0], [0, -1, 0]), 3 - 0.15, [0, 1, 0])  # top of the tube
    assert_hit(cast(sc, [3, 0, 0], [-1, 0, 0]), 3 - 0.65, [1, 0, 0])  # outer equator
    assert_hit(cast(sc, [0, 0, 0], [1, 0, 0]), 0.35, [-1, 0, 0])  # inner wall, from the centre
    assert_hit(cast(sc, [0, 0, 3], [0, 0, -1]), 3 - 0.65, [0, 0, 1])
    # y = 0.1 above the equator: (|z| - 0.5)^2 + 0.01 = 0.0225.
    dz = math.sqrt(0.0125)
    assert_hit(cast(sc, [0, 0.1, 3], [0, 0, -1]), 3 - 0.5 - dz, [0, 0.1 / 0.15, dz / 0.15])
    # Through the ring just inside the tube's inner edge: misses the near side, hits the far one?
    # x = 0: ray along -z at y = 0 hits the near outer wall first (already tested); a ray along -x
    # at z = 0.5 (tube centre line) and y = 0.16 passes just above the tube: a miss.
    assert not cast(sc, [3, 0.16, 0.5], [-1, 0, 0])[0]
    # Off-centre torus.
    sc = scene({"type": "torus", "center": [0.1, -0.2, 0.05], "radii": [0.4, 0.1], "color": RED})
    assert_hit(cast(sc, [0.5, 3, 0.05], [0, -1, 0]), 3 + 0.2 - 0.1, [0, 1, 0])


def _torus_sdf(p, big_r, small_r):
    rho = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2)
    return torch.sqrt((rho - big_r) ** 2 + p[:, 1] ** 2) - small_r


def test_torus_matches_brute_force_march():
    """Random rays: exact hits lie on the surface and are the first sign change along the ray."""
    big_r, small_r = 0.5, 0.15
    sc = scene({"type": "torus", "center": [0, 0, 0], "radii": [big_r, small_r], "color": RED})
    g = torch.Generator().manual_seed(0)
    n = 1500
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1) * 2.5
    targets = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * 0.7
    dirs = torch.nn.functional.normalize(targets - origins, dim=1)
    hit, depth, _, _ = sc.intersect(origins, dirs)
    assert 0.2 < hit.double().mean() < 0.8
    # Brute force: dense march (step 1e-3) for the first inside sample, then bisection.
    ts = torch.arange(1.8, 3.2, 1e-3, dtype=torch.float64)
    pts = origins[:, None] + ts[None, :, None] * dirs[:, None]
    inside = _torus_sdf(pts.reshape(-1, 3), big_r, small_r).reshape(n, -1) < 0
    ref_hit = inside.any(dim=1)
    first = inside.double().argmax(dim=1)
    lo, hi = ts[(first - 1).clamp(min=0)], ts[first]
    for _ in range(40):
        mid = (lo + hi) / 2
        inside_mid = _torus_sdf(origins + mid[:, None] * dirs, big_r, small_r) < 0
        hi = torch.where(inside_mid, mid, hi)
        lo = torch.where(inside_mid, lo, mid)
    # A dense march can miss a graze thinner than its step; nearly every ray must agree.
    agree = hit == ref_hit
    assert agree.double().mean() > 0.998
    both = hit & ref_hit
    assert torch.allclose(depth[both], hi[both], atol=1e-6)
    p = origins[hit] + depth[hit, None] * dirs[hit]
    assert _torus_sdf(p, big_r, small_r).abs().max() < 1e-7


def test_rotation_is_honoured():
    # A cube turned +45 degrees about y: its local +z face now faces (sin 45, 0, cos 45), and
    # the plane 0.7071 x + 0.7071 z = 0.25 is met by the ray x = 0.1 at z = 0.25 * sqrt(2) - 0.1.
    sc = scene({"type": "box", "center": [0, 0, 0], "size": [0.5, 0.5, 0.5], "rotation": [0, 45, 0], "color": GREEN})
    s = math.sqrt(0.5)
    assert_hit(cast(sc, [0.1, 0, 3], [0, 0, -1]), 3 - (0.25 * math.sqrt(2) - 0.1), [s, 0, s])
    assert_hit(cast(sc, [-0.1, 0, 3], [0, 0, -1]), 3 - (0.25 * math.sqrt(2) - 0.1), [-s, 0, s])
    # A long bar (x) turned 90 degrees about z stands along y.
    sc = scene({"type": "box", "center": [0, 0, 0], "size": [1.0, 0.2, 0.2], "rotation": [0, 0, 90], "color": GREEN})
    assert_hit(cast(sc, [0, 0.4, 3], [0, 0, -1]), 2.9, [0, 0, 1])
    assert not cast(sc, [0.4, 0, 3], [0, 0, -1])[0]


def test_euler_order_xyz_extrinsic():
    # R = Rz Ry Rx: Rx(90) sends the cylinder axis y to z, then Ry(90) sends z to x.
    sc = scene({"type": "cylinder", "center": [0, 0, 0], "radius": 0.1, "height": 1.0, "rotation": [90, 90, 0], "color": BLUE})
    assert_hit(cast(sc, [0.4, 0, 3], [0, 0, -1]), 2.9, [0, 0, 1])
    assert not cast(sc, [0, 0.4, 3], [0, 0, -1])[0]
    assert_hit(cast(sc, [3, 0, 0], [-1, 0, 0]), 2.5, [1, 0, 0])  # the cap now faces +x
    m = rotation_matrix([90, 90, 0])
    assert torch.allclose(m @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)


def test_rotated_torus():
    sc = scene({"type": "torus", "center": [0, 0, 0], "radii": [0.5, 0.15], "rotation": [90, 0, 0], "color": RED})
    assert not cast(sc, [0, 0, 3], [0, 0, -1])[0], "axis now along z: the hole faces the camera"
    assert_hit(cast(sc, [0.5, 0, 3], [0, 0, -1]), 3 - 0.15, [0, 0, 1])


def test_nearest_hit_over_primitives():
    front = {"type": "sphere", "center": [0, 0, 0.4], "radius": 0.2, "color": RED}
    back = {"type": "box", "center": [0, 0, -0.4], "size": [0.4, 0.4, 0.4], "color": GREEN}
    for prims in ([front, back], [back, front]):
        sc = scene(*prims)
        hit, depth, normal, color = cast(sc, [0, 0, 3], [0, 0, -1])
        assert hit and depth == pytest.approx(2.4, abs=1e-5) and color == pytest.approx(RED)
        hit, depth, normal, color = cast(sc, [0, 0, -3], [0, 0, 1])
        assert hit and depth == pytest.approx(2.4, abs=1e-5) and color == pytest.approx(GREEN)
        assert normal == pytest.approx([0, 0, -1], abs=1e-6)


def test_render_sphere_mask_area_matches_projected_disc():
    r, dist, fovy, size = 0.5, 3.0, 40.0, 128
    sc = scene({"type": "sphere", "center": [0, 0, 0], "radius": r, "color": [0.2, 0.4, 0.6]})
    cams = make_cameras([0.0, 30.0], [0.0, 100.0], dist, fovy)
    out = sc.render(cams, size, size)
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    disc_radius = focal * math.tan(math.asin(r / dist))
    expected = math.pi * disc_radius**2
    areas = out.opacity.sum(dim=(1, 2, 3))
    assert torch.allclose(areas, torch.full_like(areas, expected), rtol=0.01), (areas, expected)
    # Depth at the centre pixels: close to dist - r.
    centre = out.depth[:, size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1]
    assert torch.allclose(centre, torch.full_like(centre, dist - r), atol=2e-3)


def test_render_output_fields():
    sc = load_scene(DEFAULT_SCENE)
    cams = orbit_cameras(3, elevation=15, distance=3.2, fovy=42.5)
    out = sc.render(cams, 32, 40)
    assert isinstance(out, RenderOutput)
    assert out.rgb.shape == (3, 32, 40, 3) and out.opacity.shape == (3, 32, 40, 1)
    assert out.depth.shape == (3, 32, 40, 1) and out.normal.shape == (3, 32, 40, 3)
    mask = out.opacity[..., 0] > 0.5
    assert set(out.opacity.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(out.rgb[~mask] == 1.0), "default background is white"
    assert torch.all(out.depth[~mask] == 0) and torch.all(out.normal[~mask] == 0)
    assert torch.allclose(out.normal[mask].norm(dim=-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert torch.all(out.depth[mask] > 1.5)
    # Normals face the camera where hit.
    from distill3d.engine.cameras import pixel_rays

    _, dirs = pixel_rays(cams, 32, 40)
    assert torch.all((out.normal * dirs).sum(-1)[mask] < 1e-4)
    # Custom background is composited and echoed.
    bg = torch.rand(3, 32, 40, 3)
    out2 = sc.render(cams, 32, 40, background=bg)
    assert torch.equal(out2.background, bg)
    assert torch.allclose(out2.rgb[~mask], bg[~mask])
    assert torch.allclose(out2.rgb[mask], out.rgb[mask])


@pytest.mark.parametrize("name", ["default", "two_cylinders"])
def test_shipped_scenes(name):
    sc = load_scene(SCENES_DIR / f"{name}.json")
    assert sc.bounding_radius < 0.9 and sc.scene_radius() == sc.bounding_radius
    types = {p.type for p in sc.primitives}
    if name == "default":
        assert len(sc) == 3 and types == {"sphere", "box", "torus"}
    else:
        assert 2 <= len(sc) <= 4 and "cylinder" in types
    # Every primitive is visible from the training range of elevations, and the object is a decent size.
    for elevation in (-10.0, 15.0, 45.0):
        cams = orbit_cameras(8, elevation=elevation, distance=3.2, fovy=42.0)
        out = sc.render(cams, 64, 64)
        seen = set(out.extras["primitive_index"].unique().tolist()) - {-1}
        assert seen == set(range(len(sc)))
        coverage = out.opacity.mean().item()
        assert 0.05 < coverage < 0.4
    assert load_scene(name).to_dict() == sc.to_dict(), "built-in scenes load by name"


def test_yaml_scene(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: tiny\nprimitives:\n  - {type: sphere, center: [0, 0, 0], radius: 0.3, color: [1, 0, 0]}\n")
    sc = load_scene(path)
    assert sc.name == "tiny" and len(sc) == 1
    assert_hit(cast(sc, [0, 0, 2], [0, 0, -1]), 1.7, [0, 0, 1])


# ---------------------------------------------------------------------------------------------
# Validation

GOOD = {"type": "sphere", "center": [0, 0, 0], "radius": 0.3, "color": [1, 0, 0]}


def write(tmp_path, data, name="scene.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "prim, words",
    [
        ({**GOOD, "type": "cone"}, ["primitives[1]", "'type'", "cone", "sphere, box, torus, cylinder"]),
        ({k: v for k, v in GOOD.items() if k != "type"}, ["primitives[1]", "'type'"]),
        ({k: v for k, v in GOOD.items() if k != "radius"}, ["primitives[1]", "missing field 'radius'"]),
        ({k: v for k, v in GOOD.items() if k != "center"}, ["primitives[1]", "missing field 'center'"]),
        ({k: v for k, v in GOOD.items() if k != "color"}, ["primitives[1]", "missing field 'color'"]),
        ({**GOOD, "center": [0, 0]}, ["primitives[1]", "'center'", "3 numbers"]),
        ({**GOOD, "center": [0, 0, "x"]}, ["primitives[1]", "'center'"]),
        ({**GOOD, "rotation": [0, 0, 0, 0]}, ["primitives[1]", "'rotation'", "3 numbers"]),
        ({**GOOD, "color": [1, 0]}, ["primitives[1]", "'color'", "3 numbers"]),
        ({**GOOD, "color": [1.5, 0, 0]}, ["primitives[1]", "'color'", "[0, 1]"]),
        ({**GOOD, "color": [0, -0.1, 0]}, ["primitives[1]", "'color'", "[0, 1]"]),
        ({**GOOD, "radius": 0}, ["primitives[1]", "'radius'", "positive"]),
        ({**GOOD, "radius": -0.2}, ["primitives[1]", "'radius'", "positive"]),
        ({**GOOD, "radius": True}, ["primitives[1]", "'radius'", "number"]),
        ({**GOOD, "radius": [0.3]}, ["primitives[1]", "'radius'", "number"]),
        ({**GOOD, "size": [1, 1, 1]}, ["primitives[1]", "unknown field 'size'", "radius"]),
        ({**GOOD, "colour": [1, 0, 0]}, ["primitives[1]", "unknown field 'colour'"]),
        ({"type": "box", "center": [0, 0, 0], "size": [0.2, 0.2], "color": RED}, ["primitives[1] (box)", "'size'", "3 numbers"]),
        ({"type": "box", "center": [0, 0, 0], "size": [0.2, 0, 0.2], "color": RED}, ["primitives[1] (box)", "'size'", "positive"]),
        ({"type": "torus", "center": [0, 0, 0], "radii": [0.3], "color": RED}, ["primitives[1] (torus)", "'radii'", "2 numbers"]),
        ({"type": "torus", "center": [0, 0, 0], "radii": [0.3, -0.1], "color": RED}, ["primitives[1] (torus)", "'radii'", "positive"]),
        ({"type": "torus", "center": [0, 0, 0], "radii": [0.1, 0.2], "color": RED}, ["primitives[1] (torus)", "'radii'", "smaller"]),
        ({"type": "cylinder", "center": [0, 0, 0], "radius": 0.2, "color": RED}, ["primitives[1] (cylinder)", "missing field 'height'"]),
        ({"type": "cylinder", "center": [0, 0, 0], "radius": 0.2, "height": -1, "color": RED}, ["primitives[1] (cylinder)", "'height'", "positive"]),
        ({**GOOD, "center": [0.8, 0, 0]}, ["primitives[1]", "unit sphere", "'center'", "'radius'"]),
        ({"type": "box", "center": [0, 0, 0], "size": [1.2, 1.2, 1.2], "color": RED}, ["primitives[1] (box)", "unit sphere", "'size'"]),
        ({"type": "torus", "center": [0, 0.5, 0], "radii": [0.5, 0.1], "color": RED}, ["primitives[1] (torus)", "unit sphere"]),
        ({"type": "cylinder", "center": [0, 0, 0], "radius": 0.2, "height": 1.98, "color": RED}, ["primitives[1] (cylinder)", "unit sphere", "'height'"]),
        ("not a mapping", ["primitives[1]", "mapping"]),
    ],
)
def test_primitive_validation_errors(tmp_path, prim, words):
    path = write(tmp_path, {"primitives": [GOOD, prim]})
    with pytest.raises(SceneError) as info:
        load_scene(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "data, name, words",
    [
        ({"primitives": []}, "scene.json", ["'primitives'", "empty"]),
        ({"name": "x"}, "scene.json", ["missing field 'primitives'"]),
        ({"primitives": GOOD}, "scene.json", ["'primitives'", "list"]),
        ({"primitives": [GOOD], "lights": []}, "scene.json", ["unknown top-level field 'lights'"]),
        ({"primitives": [GOOD], "name": 3}, "scene.json", ["'name'", "string"]),
        ([GOOD], "scene.json", ["mapping"]),
        ('{"primitives": [', "scene.json", ["invalid JSON", "line 1"]),
        ("primitives: [a, b", "scene.yaml", ["invalid YAML"]),
        ("primitives: []", "scene.yml", ["empty"]),
        ({"primitives": [GOOD]}, "scene.txt", ["extension", ".json"]),
    ],
)
def test_scene_file_errors(tmp_path, data, name, words):
    path = write(tmp_path, data, name)
    with pytest.raises(SceneError) as info:
        load_scene(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SceneError, match="does not exist") as info:
        load_scene(missing)
    assert str(missing) in str(info.value)
    directory = tmp_path / "dir.json"
    directory.mkdir()
    with pytest.raises(SceneError, match="cannot read"):
        load_scene(directory)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SceneError):
        load_scene(binary)
