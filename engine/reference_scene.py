"""Analytic reference scenes: exact ray casting of a few primitives, the ground truth of the oracle demo.

A scene file (JSON for ``.json``, YAML for ``.yaml``/``.yml``) lists analytic primitives that lie
inside the unit sphere::

    {"name": "optional name",
     "primitives": [
       {"type": "sphere",   "center": [x, y, z], "radius": r,              "color": [r, g, b]},
       {"type": "box",      "center": [x, y, z], "size": [sx, sy, sz],     "color": [...]},
       {"type": "torus",    "center": [x, y, z], "radii": [R, r],          "color": [...]},
       {"type": "cylinder", "center": [x, y, z], "radius": r, "height": h, "color": [...]}
     ]}

Every primitive may also carry ``"rotation": [rx, ry, rz]`` in degrees. Conventions:

- World frame as in :mod:`distill3d.engine.cameras` (right-handed, y-up).
- Box ``size`` is the full extent along the local x, y, z axes (centred on ``center``).
- Torus: ring of major radius R in the local xz-plane, tube of minor radius r (r < R), axis +y.
- Cylinder: axis along local +y, spanning ``height`` (centred on ``center``), capped at both ends.
- Rotation, "Euler XYZ": the local frame is rotated first by rx about the x axis, then by ry about
  the y axis, then by rz about the z axis, all axes fixed in the world and every angle
  right-handed (counter-clockwise looking down the axis toward the origin). As a matrix,
  ``R = Rz(rz) @ Ry(ry) @ Rx(rx)`` and ``world = R @ local + center``. This is Blender's "XYZ Euler"
  mode and SciPy's ``Rotation.from_euler("xyz", ...)`` (lower-case, extrinsic).
- Colours are linear RGB in [0, 1]; renders are unlit albedo.

:func:`load_scene` validates everything and raises :class:`SceneError` naming the file, the
primitive index and the field. :meth:`PrimitiveScene.intersect` finds the exact nearest hit of
rays (closed forms for sphere, box and cylinder; for the torus, the quartic is solved through the
eigenvalues of its companion matrix in float64, then polished by Newton steps, error ~1e-9), and
:meth:`PrimitiveScene.render` renders pixel-centre rays of a batch of cameras into a
:class:`~distill3d.engine.interfaces.RenderOutput`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras, pixel_rays
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import RenderOutput

SCENES_DIR = Path(__file__).resolve().parent / "scenes"
DEFAULT_SCENE = SCENES_DIR / "default.json"

PRIMITIVE_TYPES = ("sphere", "box", "torus", "cylinder")
# Size fields of each type: name -> number of values (1 = a scalar).
_SIZE_FIELDS: dict[str, dict[str, int]] = {
    "sphere": {"radius": 1},
    "box": {"size": 3},
    "torus": {"radii": 2},
    "cylinder": {"radius": 1, "height": 1},
}
_COMMON_FIELDS = {"type": 0, "center": 3, "color": 3}
_OPTIONAL_FIELDS = {"rotation": 3}
_TOP_LEVEL_KEYS = ("name", "primitives")

_T_MIN = 1e-7  # hits closer than this along the ray are ignored (self-intersection guard)


class SceneError(UserError, ValueError):
    """A scene file that cannot be read or does not describe a valid scene."""


def rotation_matrix(rotation_deg) -> Tensor:
    """``Rz @ Ry @ Rx`` (float64 (3, 3)) for Euler XYZ angles in degrees; see the module docstring."""
    rx, ry, rz = (math.radians(float(a)) for a in rotation_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    my = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    mz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return mz @ my @ mx


@dataclass(frozen=True)
class Primitive:
    """One validated primitive. ``params`` holds its size fields (floats or tuples of floats)."""

    type: str
    center: tuple[float, float, float]
    color: tuple[float, float, float]
    params: dict[str, Any]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def bounding_radius(self) -> float:
        """Radius of a sphere around ``center`` that contains the primitive."""
        p = self.params
        if self.type == "sphere":
            return float(p["radius"])
        if self.type == "box":
            return 0.5 * math.sqrt(sum(s * s for s in p["size"]))
        if self.type == "torus":
            return float(p["radii"][0] + p["radii"][1])
        if self.type == "cylinder":
            return math.hypot(p["radius"], 0.5 * p["height"])
        raise AssertionError(self.type)

    @property
    def extent(self) -> float:
        """Distance from the world origin of the farthest point of the bounding sphere."""
        return math.sqrt(sum(c * c for c in self.center)) + self.bounding_radius

    def matrix(self) -> Tensor:
        """Local-to-world rotation (float64 (3, 3))."""
        return rotation_matrix(self.rotation)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "center": list(self.center)}
        for k, v in self.params.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        if any(self.rotation):
            out["rotation"] = list(self.rotation)
        out["color"] = list(self.color)
        return out


# ----------------------------------------------------------------------------------------------
# Ray / primitive intersection in the primitive's local frame (float64, unit directions).
# Each returns (t (M,), normal (M, 3)) with t = inf for a miss; normals are local and outward.


def _nearest(ts: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest candidate > _T_MIN per row of (M, K) (NaN/invalid entries must be inf)."""
    ts = torch.where(ts > _T_MIN, ts, torch.full_like(ts, math.inf))
    return ts.min(dim=1)


def _hit_sphere(o: Tensor, d: Tensor, prim: Primitive) -> tuple[Tensor, Tensor]:
    r = float(prim.params["radius"])
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - r * r
    disc = b * b - c
    sq = disc.clamp(min=0).sqrt()
    ts = torch.stack([-b - sq, -b + sq], dim=1)
    ts = torch.where((disc >= 0)[:, None], ts, torch.full_like(ts, math.inf))
    t, _ = _nearest(ts)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    return t, p / r


def _safe_inverse(d: Tensor) -> Tensor:
    tiny = 1e-300
    return 1.0 / torch.where(d.abs() < tiny, torch.where(d < 0, -tiny, tiny), d)


def _hit_box(o: Tensor, d: Tensor, prim: Primitive) -> tuple[Tensor, Tensor]:
    half = torch.tensor(prim.params["size"], dtype=o.dtype, device=o.device) / 2
    inv = _safe_inverse(d)
    t1 = (-half - o) * inv
    t2 = (half - o) * inv
    t_near = torch.minimum(t1, t2).max(dim=1).values
    t_far = torch.maximum(t1, t2).min(dim=1).values
    ts = torch.stack([t_near, t_far], dim=1)
    ok = (t_near <= t_far)[:, None]
    ts = torch.where(ok, ts, torch.full_like(ts, math.inf))
    t, _ = _nearest(ts)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    # The face hit is the axis where the point is relatively farthest out.
    rel = p / half
    axis = rel.abs().argmax(dim=1)
    normal = torch.zeros_like(p)
    normal.scatter_(1, axis[:, None], torch.sign(rel.gather(1, axis[:, None])))
    return t, normal


def _hit_cylinder(o: Tensor, d: Tensor, prim: Primitive) -> tuple[Tensor, Tensor]:
    r = float(prim.params["radius"])
    h2 = 0.5 * float(prim.params["height"])
    inf = torch.full_like(o[:, 0], math.inf)
    # Side: (ox + t dx)^2 + (oz + t dz)^2 = r^2 with |oy + t dy| <= h/2.
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    disc = b * b - a * c
    sq = disc.clamp(min=0).sqrt()
    safe_a = torch.where(a > 1e-18, a, torch.ones_like(a))
    side = []
    for sgn in (-1.0, 1.0):
        ts = (-b + sgn * sq) / safe_a
        y = o[:, 1] + ts * d[:, 1]
        valid = (a > 1e-18) & (disc >= 0) & (y.abs() <= h2)
        side.append(torch.where(valid, ts, inf))
    # Caps: y = +-h/2 with x^2 + z^2 <= r^2.
    inv_dy = _safe_inverse(d[:, 1])
    caps = []
    for y_cap in (-h2, h2):
        ts = (y_cap - o[:, 1]) * inv_dy
        x = o[:, 0] + ts * d[:, 0]
        z = o[:, 2] + ts * d[:, 2]
        valid = (d[:, 1].abs() > 1e-300) & (x * x + z * z <= r * r)
        caps.append(torch.where(valid, ts, inf))
    ts = torch.stack(side + caps, dim=1)
    t, which = _nearest(ts)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    side_n = torch.stack([p[:, 0], torch.zeros_like(p[:, 0]), p[:, 2]], dim=1) / r
    cap_n = torch.zeros_like(p)
    cap_n[:, 1] = torch.where(which == 3, 1.0, -1.0).to(p.dtype)
    normal = torch.where((which < 2)[:, None], side_n, cap_n)
    return t, normal


def _torus_sdf_local(p: Tensor, big_r: float, small_r: float) -> Tensor:
    rho = torch.sqrt(p[..., 0] ** 2 + p[..., 2] ** 2)
    return torch.sqrt((rho - big_r) ** 2 + p[..., 1] ** 2) - small_r


def _hit_torus(o: Tensor, d: Tensor, prim: Primitive) -> tuple[Tensor, Tensor]:
    big_r, small_r = (float(v) for v in prim.params["radii"])
    m = o.shape[0]
    inf = torch.full_like(o[:, 0], math.inf)
    # Move each origin to where the ray enters the bounding sphere (radius R + r) so the quartic
    # is well scaled (|o| <= R + r); origins already inside stay where they are.
    bound = big_r + small_r
    b0 = (o * d).sum(-1)
    c0 = (o * o).sum(-1) - bound * bound
    disc0 = b0 * b0 - c0
    t0 = (-b0 - disc0.clamp(min=0).sqrt()).clamp(min=0)
    o = o + t0[:, None] * d
    # (|p|^2 + R^2 - r^2)^2 = 4 R^2 (px^2 + pz^2), p = o + t d, |d| = 1: a monic quartic in t.
    bb = (o * d).sum(-1)
    k = (o * o).sum(-1) + big_r**2 - small_r**2
    aa = d[:, 0] ** 2 + d[:, 2] ** 2
    bxz = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    cxz = o[:, 0] ** 2 + o[:, 2] ** 2
    r4 = 4 * big_r**2
    a3 = 4 * bb
    a2 = 4 * bb * bb + 2 * k - r4 * aa
    a1 = 4 * bb * k - 2 * r4 * bxz
    a0 = k * k - r4 * cxz
    comp = torch.zeros(m, 4, 4, dtype=o.dtype, device=o.device)
    comp[:, 0, 0] = -a3
    comp[:, 0, 1] = -a2
    comp[:, 0, 2] = -a1
    comp[:, 0, 3] = -a0
    comp[:, 1, 0] = 1
    comp[:, 2, 1] = 1
    comp[:, 3, 2] = 1
    if comp.device.type == "cpu":
        roots = torch.linalg.eigvals(comp)
    else:  # eigvals of general matrices runs on the CPU anyway for most backends
        roots = torch.linalg.eigvals(comp.cpu()).to(comp.device)
    real = roots.real.clone()
    is_real = roots.imag.abs() <= 1e-6 * (1 + real.abs())
    # Newton polish of every real root on the quartic itself (guarded against near-double roots).
    coeffs = (a3[:, None], a2[:, None], a1[:, None], a0[:, None])
    for _ in range(3):
        f = (((real + coeffs[0]) * real + coeffs[1]) * real + coeffs[2]) * real + coeffs[3]
        df = ((4 * real + 3 * coeffs[0]) * real + 2 * coeffs[1]) * real + coeffs[2]
        step = f / torch.where(df.abs() > 1e-30, df, torch.ones_like(df))
        good = (df.abs() > 1e-30) & torch.isfinite(step) & (step.abs() < 1e-3)
        real = torch.where(good, real - step, real)
    cand = torch.where(is_real, real + t0[:, None], inf[:, None].expand_as(real))
    t, _ = _nearest(cand)
    p = o + torch.nan_to_num(t - t0, posinf=0.0)[:, None] * d
    rho = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2).clamp(min=1e-12)
    scale = 1 - big_r / rho
    normal = torch.stack([p[:, 0] * scale, p[:, 1], p[:, 2] * scale], dim=1)
    normal = torch.nn.functional.normalize(normal, dim=1)
    return t, normal


_INTERSECTORS = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder, "torus": _hit_torus}


# ----------------------------------------------------------------------------------------------


@dataclass
class PrimitiveScene:
    """A validated set of primitives with exact ray casting and rendering."""

    primitives: list[Primitive]
    name: str = "scene"
    source: str = "<memory>"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.primitives:
            raise SceneError(f"{self.source}: a scene needs at least one primitive")

    def __len__(self) -> int:
        return len(self.primitives)

    @staticmethod
    def from_dict(data: Any, source: str = "<dict>") -> "PrimitiveScene":
        """Validate a parsed scene mapping (as read from JSON/YAML); see :func:`load_scene`."""
        return _parse_scene(data, source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "primitives": [p.to_dict() for p in self.primitives]}

    @property
    def bounding_radius(self) -> float:
        """Radius of an origin-centred sphere that contains every primitive (<= 1)."""
        return max(p.extent for p in self.primitives)

    def scene_radius(self) -> float:
        return self.bounding_radius

    @property
    def colors(self) -> Tensor:
        """(P, 3) float32 colours, in primitive order."""
        return torch.tensor([p.color for p in self.primitives], dtype=torch.float32)

    def _tensors(self, device: torch.device):
        key = str(device)
        if key not in self._cache:
            self._cache[key] = [
                (torch.tensor(p.center, dtype=torch.float64, device=device), p.matrix().to(device)) for p in self.primitives
            ]
        return self._cache[key]

    @torch.no_grad()
    def intersect(self, origins: Tensor, dirs: Tensor, return_index: bool = False):
        """Exact nearest hit of rays over all primitives.

        origins, dirs: (N, 3); dirs should be unit (they are renormalised; depth is the Euclidean
        distance along the ray). Returns (hit (N,) bool, depth (N,) with 0 where missed,
        normal (N, 3) unit outward world-space normals with 0 where missed, color (N, 3) with 0
        where missed), in the dtype (float32 if not floating) and on the device of ``origins``;
        with ``return_index`` also the primitive index (N,) long, -1 where missed.
        Computed in float64 (on the CPU for MPS tensors).
        """
        if origins.shape != dirs.shape or origins.dim() != 2 or origins.shape[1] != 3:
            raise ValueError(f"intersect expects origins and dirs of shape (N, 3); got {tuple(origins.shape)} and {tuple(dirs.shape)}")
        out_device = origins.device
        out_dtype = origins.dtype if origins.is_floating_point() else torch.float32
        dev = torch.device("cpu") if out_device.type == "mps" else out_device
        o = origins.detach().to(dev, torch.float64)
        d = torch.nn.functional.normalize(dirs.detach().to(dev, torch.float64), dim=1)
        n = o.shape[0]
        best_t = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        best_n = torch.zeros(n, 3, dtype=torch.float64, device=dev)
        best_i = torch.full((n,), -1, dtype=torch.long, device=dev)
        for i, (prim, (center, rot)) in enumerate(zip(self.primitives, self._tensors(dev))):
            oc = o - center
            # Cull with the primitive's bounding sphere (slightly enlarged): only candidates are cast.
            rb = prim.bounding_radius * (1 + 1e-6) + 1e-9
            b = (oc * d).sum(-1)
            disc = b * b - ((oc * oc).sum(-1) - rb * rb)
            cand = (disc >= 0) & (-b + disc.clamp(min=0).sqrt() > _T_MIN)
            idx = cand.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            t, nl = _INTERSECTORS[prim.type](oc[idx] @ rot, d[idx] @ rot, prim)
            closer = t < best_t[idx]
            upd = idx[closer]
            best_t[upd] = t[closer]
            best_n[upd] = nl[closer] @ rot.T
            best_i[upd] = i
        hit = best_i >= 0
        depth = torch.where(hit, best_t, torch.zeros_like(best_t))
        normal = torch.nn.functional.normalize(best_n, dim=1) * hit[:, None]
        color = self.colors.to(dev)[best_i.clamp(min=0)] * hit[:, None]
        result = (
            hit.to(out_device),
            depth.to(out_device, out_dtype),
            normal.to(out_device, out_dtype),
            color.to(out_device, out_dtype),
        )
        if return_index:
            return result + (best_i.to(out_device),)
        return result

    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: int, background: Tensor | None = None) -> RenderOutput:
        """Exact unlit render of pixel-centre rays (one ray per pixel, hard edges).

        background: anything broadcastable to (B, H, W, 3) in [0, 1]; None is white. rgb is the
        albedo over it, opacity the hit mask, depth the ray distance (0 where empty), normal the
        world-space outward normal (0 where empty); extras["primitive_index"] (B, H, W) is the
        index of the primitive seen (-1 where empty).
        """
        b = len(cameras)
        origins, dirs = pixel_rays(cameras, height, width)
        hit, depth, normal, color, index = self.intersect(origins.reshape(-1, 3), dirs.reshape(-1, 3), return_index=True)
        device = origins.device
        if background is None:
            bg = torch.ones(b, height, width, 3, device=device)
        else:
            bg = torch.as_tensor(background).detach().to(device, torch.float32)
            try:
                bg = bg.expand(b, height, width, 3)
            except RuntimeError as exc:
                raise ValueError(f"background of shape {tuple(bg.shape)} does not broadcast to {(b, height, width, 3)}") from exc
        mask = hit.reshape(b, height, width, 1).to(torch.float32)
        rgb = color.reshape(b, height, width, 3).float() * mask + bg * (1 - mask)
        return RenderOutput(
            rgb=rgb,
            opacity=mask,
            depth=depth.reshape(b, height, width, 1).float(),
            background=bg,
            normal=normal.reshape(b, height, width, 3).float(),
            extras={"primitive_index": index.reshape(b, height, width)},
        )


# ----------------------------------------------------------------------------------------------
# Loading and validation.


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_primitive(item: Any, i: int, source: str) -> Primitive:
    where = f"{source}: primitives[{i}]"
    if not isinstance(item, dict):
        raise SceneError(f"{where}: expected a mapping with a 'type' field, got {item!r}")
    if "type" not in item:
        raise SceneError(f"{where}: missing field 'type' (one of {', '.join(PRIMITIVE_TYPES)})")
    kind = item["type"]
    if kind not in PRIMITIVE_TYPES:
        raise SceneError(f"{where}: field 'type': unknown primitive type {kind!r}; valid types: {', '.join(PRIMITIVE_TYPES)}")
    where = f"{where} ({kind})"
    sizes = _SIZE_FIELDS[kind]
    allowed = {**_COMMON_FIELDS, **sizes, **_OPTIONAL_FIELDS}
    unknown = [k for k in item if k not in allowed]
    if unknown:
        raise SceneError(f"{where}: unknown field {unknown[0]!r}; valid fields for a {kind}: {', '.join(allowed)}")
    for key in list(_COMMON_FIELDS) + list(sizes):
        if key not in item:
            raise SceneError(f"{where}: missing field {key!r}")

    def vector(key: str, n: int) -> tuple[float, ...]:
        value = item[key]
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise SceneError(f"{where}: field {key!r}: expected a list of {n} numbers, got {value!r}")
        if not all(_is_number(v) for v in value):
            raise SceneError(f"{where}: field {key!r}: expected {n} finite numbers, got {value!r}")
        return tuple(float(v) for v in value)

    def scalar(key: str) -> float:
        value = item[key]
        if not _is_number(value):
            raise SceneError(f"{where}: field {key!r}: expected a finite number, got {value!r}")
        return float(value)

    center = vector("center", 3)
    color = vector("color", 3)
    if not all(0.0 <= c <= 1.0 for c in color):
        raise SceneError(f"{where}: field 'color': components must lie in [0, 1], got {list(color)}")
    rotation = vector("rotation", 3) if "rotation" in item else (0.0, 0.0, 0.0)
    params: dict[str, Any] = {}
    for key, n in sizes.items():
        value = scalar(key) if n == 1 else vector(key, n)
        values = (value,) if n == 1 else value
        if not all(v > 0 for v in values):
            raise SceneError(f"{where}: field {key!r}: sizes must be positive, got {item[key]!r}")
        params[key] = value
    if kind == "torus" and params["radii"][1] >= params["radii"][0]:
        raise SceneError(
            f"{where}: field 'radii': the minor (tube) radius {params['radii'][1]} must be smaller than "
            f"the major radius {params['radii'][0]} (radii are [major, minor])"
        )
    prim = Primitive(kind, center, color, params, rotation)
    if prim.extent > 1.0 + 1e-9:
        size_keys = " / ".join(repr(k) for k in sizes)
        raise SceneError(
            f"{where}: not inside the unit sphere: its bounding sphere (field 'center' at distance "
            f"{math.sqrt(sum(c * c for c in center)):.4g} from the origin, radius {prim.bounding_radius:.4g} from "
            f"field {size_keys}) reaches {prim.extent:.4g} > 1; move it toward the origin or make it smaller"
        )
    return prim


def _parse_scene(data: Any, source: str) -> PrimitiveScene:
    if not isinstance(data, dict):
        raise SceneError(f"{source}: a scene must be a mapping with a 'primitives' list, got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_LEVEL_KEYS]
    if unknown:
        raise SceneError(f"{source}: unknown top-level field {unknown[0]!r}; valid fields: {', '.join(_TOP_LEVEL_KEYS)}")
    name = data.get("name", None)
    if name is not None and not isinstance(name, str):
        raise SceneError(f"{source}: field 'name': expected a string, got {name!r}")
    if "primitives" not in data:
        raise SceneError(f"{source}: missing field 'primitives' (a list of primitives)")
    items = data["primitives"]
    if not isinstance(items, list):
        raise SceneError(f"{source}: field 'primitives': expected a list, got {items!r}")
    if not items:
        raise SceneError(f"{source}: field 'primitives': the list is empty; a scene needs at least one primitive")
    prims = [_parse_primitive(item, i, source) for i, item in enumerate(items)]
    if name is None:
        name = Path(source).stem if source and not source.startswith("<") else "scene"
    return PrimitiveScene(prims, name=name, source=source)


def resolve_scene_path(path: str | Path) -> Path:
    """A path as given if it exists, else a built-in scene of that name (``"two_cylinders"``,
    ``"default.json"``) from ``engine/scenes/``; else the path as given (loading then fails)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if p.parent == Path("."):
        for candidate in (SCENES_DIR / p.name, SCENES_DIR / f"{p.name}.json", SCENES_DIR / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    return p


def builtin_scenes() -> list[str]:
    """Names of the scenes shipped in ``engine/scenes/``."""
    return sorted(p.stem for p in SCENES_DIR.glob("*.json"))


def load_scene(path: str | Path) -> PrimitiveScene:
    """Read and validate a scene file (JSON for .json, YAML for .yaml/.yml).

    ``path`` may also name a built-in scene (see :func:`resolve_scene_path`). Raises
    :class:`SceneError` naming the file (and primitive index and field) for every problem.
    """
    p = resolve_scene_path(path)
    source = str(p)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SceneError(f"{source}: unsupported scene file extension {p.suffix!r}; use .json, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        hint = f" (built-in scenes: {', '.join(builtin_scenes())})"
        raise SceneError(f"{source}: scene file does not exist{hint}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SceneError(f"{source}: cannot read scene file: {exc}") from exc
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SceneError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SceneError(f"{source}: invalid YAML: {exc}") from exc
    return _parse_scene(data, source)
