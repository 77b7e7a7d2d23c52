"""Point and splat files: the standard 3D Gaussian Splatting .ply (what splat viewers read) and
point clouds (PLY, OBJ vertices, plain xyz text) to initialise Gaussians from.

3DGS layout: one `vertex` element, binary little-endian float32, properties in this order:
x y z nx ny nz f_dc_0..2 f_rest_0..(3 (K-1) - 1) opacity scale_0..2 rot_0..3, with f_rest
channel-major (all red coefficients, then green, then blue), opacity before the sigmoid, log
scales and the quaternion w first. Normals are written as zeros (as 3DGS does).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill3d.engine.errors import UserError

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class PointCloudError(UserError, ValueError):
    """A point-cloud or splat file that cannot be used."""


@dataclass
class PlyElement:
    name: str
    count: int
    properties: list[tuple[str, str]]  # (name, numpy type); list properties are not supported


def _read_ply(path: Path) -> tuple[dict[str, np.ndarray], list[PlyElement]]:
    """The `vertex` element of a PLY file as {property: array} (binary or ASCII)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PointCloudError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(b"ply"):
        raise PointCloudError(f"{path} is not a PLY file (it does not start with 'ply')")
    end = raw.find(b"end_header")
    if end < 0:
        raise PointCloudError(f"{path}: PLY header has no end_header")
    body_start = raw.index(b"\n", end) + 1
    header = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[PlyElement] = []
    for line in header:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append(PlyElement(parts[1], int(parts[2]), []))
        elif parts[0] == "property":
            if not elements:
                raise PointCloudError(f"{path}: PLY property before any element")
            if parts[1] == "list":
                elements[-1].properties.append((parts[-1], "list"))
            elif parts[1] in _PLY_TYPES:
                elements[-1].properties.append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise PointCloudError(f"{path}: unknown PLY property type {parts[1]!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise PointCloudError(f"{path}: unsupported PLY format {fmt!r}")
    if not elements or elements[0].name != "vertex":
        raise PointCloudError(f"{path}: the first PLY element must be 'vertex'")
    vertex = elements[0]
    if any(t == "list" for _, t in vertex.properties):
        raise PointCloudError(f"{path}: list properties in the vertex element are not supported")
    if fmt == "ascii":
        text = raw[body_start:].decode("ascii", errors="replace").split()
        n_prop = len(vertex.properties)
        if len(text) < vertex.count * n_prop:
            raise PointCloudError(f"{path}: PLY file is truncated")
        table = np.asarray(text[: vertex.count * n_prop], dtype=np.float64).reshape(vertex.count, n_prop)
        data = {name: table[:, i] for i, (name, _) in enumerate(vertex.properties)}
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, endian + t) for name, t in vertex.properties])
        if len(raw) - body_start < dtype.itemsize * vertex.count:
            raise PointCloudError(f"{path}: PLY file is truncated")
        arr = np.frombuffer(raw, dtype=dtype, count=vertex.count, offset=body_start)
        data = {name: arr[name] for name, _ in vertex.properties}
    return data, elements


# ----- 3DGS splats ----------------------------------------------------------------------------
@dataclass
class SplatData:
    means: Tensor  # (N, 3)
    sh: Tensor  # (N, K, 3) with K = (degree + 1)^2, sh[:, 0] the DC term
    opacity_logits: Tensor  # (N,)
    log_scales: Tensor  # (N, 3)
    quats: Tensor  # (N, 4) w first

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.sh.shape[1]))) - 1


def splat_property_names(sh_degree: int) -> list[str]:
    k = (sh_degree + 1) ** 2
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * (k - 1))]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def write_splat_ply(splats: SplatData, path: str | os.PathLike) -> Path:
    """Write the standard 3DGS .ply atomically (temporary file renamed into place)."""
    from distill3d.engine.checkpoint import atomic_path

    n, k = splats.sh.shape[0], splats.sh.shape[1]
    rest = splats.sh[:, 1:].transpose(1, 2).reshape(n, 3 * (k - 1))  # channel-major
    cols = [splats.means, torch.zeros(n, 3), splats.sh[:, 0], rest, splats.opacity_logits[:, None], splats.log_scales, splats.quats]
    table = torch.cat([c.detach().float().cpu().reshape(n, -1) for c in cols], 1).numpy().astype("<f4")
    names = splat_property_names(splats.sh_degree)
    assert table.shape[1] == len(names)
    header = "ply\nformat binary_little_endian 1.0\ncomment written by distill3d (3D Gaussian Splatting layout)\n"
    header += f"element vertex {n}\n" + "".join(f"property float {name}\n" for name in names) + "end_header\n"
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(np.ascontiguousarray(table).tobytes())
    return path


def read_splat_ply(path: str | os.PathLike) -> SplatData:
    """Read a 3DGS .ply; anything else is a PointCloudError that says what is missing."""
    path = Path(path)
    data, _ = _read_ply(path)
    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [name for name in required if name not in data]
    if missing:
        raise PointCloudError(
            f"{path} is not a 3D Gaussian Splatting .ply: its vertices lack {', '.join(missing)} "
            "(a plain point cloud initialises Gaussians through representation.init_points instead)"
        )
    n_rest = len([name for name in data if re.fullmatch(r"f_rest_\d+", name)])
    k = 1 + n_rest // 3
    degree = int(round(math.sqrt(k))) - 1
    if n_rest % 3 or (degree + 1) ** 2 != k or degree > 3:
        raise PointCloudError(f"{path}: {n_rest} f_rest_* properties do not match an SH degree 0..3")
    col = lambda *names: torch.from_numpy(np.stack([np.asarray(data[n], dtype=np.float32) for n in names], -1))  # noqa: E731
    n = len(data["x"])
    sh = torch.zeros(n, k, 3)
    sh[:, 0] = col("f_dc_0", "f_dc_1", "f_dc_2")
    if k > 1:
        rest = col(*[f"f_rest_{i}" for i in range(n_rest)]).reshape(n, 3, k - 1)
        sh[:, 1:] = rest.transpose(1, 2)
    return SplatData(
        means=col("x", "y", "z"),
        sh=sh,
        opacity_logits=col("opacity")[:, 0],
        log_scales=col("scale_0", "scale_1", "scale_2"),
        quats=col("rot_0", "rot_1", "rot_2", "rot_3"),
    )


# ----- point clouds ---------------------------------------------------------------------------
def read_point_cloud(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """Points (N, 3) and colours (N, 3) in [0, 1] or None, from .ply, .obj (vertex lines,
    optional `v x y z r g b` colours) or .xyz/.txt (3 or 6 numbers per line, colours in 0..1 or
    0..255). Unreadable or empty files raise PointCloudError."""
    path = Path(path)
    if not path.exists():
        raise PointCloudError(f"point cloud file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        data, _ = _read_ply(path)
        if not all(k in data for k in ("x", "y", "z")):
            raise PointCloudError(f"{path}: PLY vertices have no x, y, z")
        points = np.stack([data["x"], data["y"], data["z"]], -1)
        colors = None
        for names in (("red", "green", "blue"), ("r", "g", "b")):
            if all(k in data for k in names):
                colors = np.stack([data[k] for k in names], -1).astype(np.float64)
                if colors.max(initial=0) > 1.0 or data[names[0]].dtype.kind in "ui":
                    colors = colors / 255.0
        if colors is None and all(f"f_dc_{i}" in data for i in range(3)):
            from distill3d.representations.gaussians.sh import C0

            colors = np.stack([data[f"f_dc_{i}"] for i in range(3)], -1) * C0 + 0.5
    elif suffix in (".obj", ".xyz", ".txt", ".pts"):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            raise PointCloudError(f"cannot read {path}: {exc.strerror or exc}") from exc
        rows = []
        for i, line in enumerate(lines):
            parts = line.split()
            if suffix == ".obj":
                if not parts or parts[0] != "v":
                    continue
                parts = parts[1:]
            elif not parts or parts[0].startswith("#"):
                continue
            try:
                rows.append([float(v) for v in parts[:6]])
            except ValueError as exc:
                raise PointCloudError(f"{path}:{i + 1}: not a point ({line.strip()[:60]!r})") from exc
        if rows and len({len(r) for r in rows}) != 1:
            raise PointCloudError(f"{path}: lines have different numbers of values")
        if rows and len(rows[0]) not in (3, 6):
            raise PointCloudError(f"{path}: each point needs 3 (x y z) or 6 (x y z r g b) values, got {len(rows[0])}")
        table = np.asarray(rows, dtype=np.float64).reshape(-1, len(rows[0]) if rows else 3)
        points = table[:, :3]
        colors = table[:, 3:6] if table.shape[1] == 6 else None
        if colors is not None and colors.max(initial=0) > 1.0:
            colors = colors / 255.0
    else:
        raise PointCloudError(f"{path}: unknown point cloud format {suffix!r}; use .ply, .obj or .xyz (x y z [r g b] per line)")
    if points.shape[0] == 0:
        raise PointCloudError(f"{path} holds no points")
    points_t = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if not bool(torch.isfinite(points_t).all()):
        raise PointCloudError(f"{path}: some points are not finite numbers")
    colors_t = None if colors is None else torch.from_numpy(np.ascontiguousarray(colors, dtype=np.float32)).clamp(0.0, 1.0)
    return points_t, colors_t
