"""Triangle meshes in memory and on disk: a small `Mesh` dataclass, loading (OBJ, GLB/glTF, PLY via
trimesh), normalisation into the unit sphere, and atomic writers for OBJ+MTL+PNG, GLB (binary glTF,
texture embedded) and PLY (vertex colours).

Conventions: y-up world (as glTF and OBJ). UVs have their origin at the bottom-left of the texture
(OBJ convention, v up); `texture[0]` is the *top* row of the image. Colours are floats in [0, 1],
RGB (alpha channels of files are dropped). Every writer writes under a temporary name in the
destination folder and renames it into place, so an interrupted export never leaves a half-written
file under the final name (the OBJ's MTL and PNG are moved in first, the OBJ last).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from distill3d.engine.errors import UserError

__all__ = [
    "Mesh",
    "MeshLoadError",
    "load_mesh",
    "normalize",
    "vertex_normals",
    "sample_surface",
    "save_mesh",
    "write_obj",
    "write_glb",
    "write_ply",
    "sample_texture",
    "SUPPORTED_FORMATS",
]

SUPPORTED_FORMATS = (".obj", ".glb", ".gltf", ".ply")


class MeshLoadError(UserError, ValueError):
    """A mesh file that cannot be used: unreadable, without faces, or not normalisable."""


@dataclass
class Mesh:
    vertices: Tensor  # (V, 3) float32
    faces: Tensor  # (F, 3) int64
    uv: Tensor | None = None  # (V, 2) float32, with `texture`
    texture: Tensor | None = None  # (Ht, Wt, 3) float32 in [0, 1], row 0 = top (v = 1)
    vertex_colors: Tensor | None = None  # (V, 3) float32 in [0, 1]
    normals: Tensor | None = None  # (V, 3) float32 unit vertex normals (optional)

    def __post_init__(self):
        self.vertices = torch.as_tensor(self.vertices, dtype=torch.float32)
        self.faces = torch.as_tensor(self.faces, dtype=torch.int64)
        dev = self.vertices.device
        if self.uv is not None:
            self.uv = torch.as_tensor(self.uv, dtype=torch.float32, device=dev)
        if self.texture is not None:
            self.texture = torch.as_tensor(self.texture, dtype=torch.float32, device=dev)
        if self.vertex_colors is not None:
            self.vertex_colors = torch.as_tensor(self.vertex_colors, dtype=torch.float32, device=dev)
        if self.normals is not None:
            self.normals = torch.as_tensor(self.normals, dtype=torch.float32, device=dev)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def has_texture(self) -> bool:
        return self.texture is not None and self.uv is not None

    def to(self, device) -> "Mesh":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(move(self.vertices), move(self.faces), move(self.uv), move(self.texture), move(self.vertex_colors), move(self.normals))

    def with_normals(self) -> "Mesh":
        return replace(self, normals=vertex_normals(self.vertices, self.faces))


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals (V, 3); zero for unreferenced vertices."""
    v = vertices.float()
    f = faces.long()
    fn = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)  # 2 * area * normal
    n = torch.zeros_like(v).index_add_(0, f.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(n, dim=-1)


def sample_surface(vertices: Tensor, faces: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, 3) uniformly over a triangle mesh's surface: faces picked in proportion to
    their area, barycentrics uniform over each triangle."""
    tri = vertices[faces.long()]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1)
    pick = torch.multinomial(area.float().cpu(), n, replacement=True, generator=generator).to(tri.device)
    u, v = torch.rand(2, n, generator=generator).to(tri)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    w = torch.stack([1 - u - v, u, v], dim=-1)
    return (tri[pick] * w[..., None]).sum(1)


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup (no mipmaps, clamped at the border) of texture (Ht, Wt, C) at uv (..., 2)."""
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1).reshape(1, -1, 1, 2)
    img = texture.permute(2, 0, 1)[None].to(grid.dtype)
    out = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.reshape(*uv.shape[:-1], texture.shape[-1])


def normalize(mesh: Mesh, radius: float = 1.0) -> tuple[Mesh, Tensor, float]:
    """Centre the mesh on its bounding-box centre and scale it to fit a sphere of `radius`.

    Returns (normalised mesh, centre (3,), scale): new = (old - centre) * scale.
    Raises MeshLoadError for meshes that cannot be normalised (no faces, non-finite or coincident
    vertices).
    """
    if mesh.num_faces == 0:
        raise MeshLoadError("mesh has no faces; cannot normalise it")
    used = mesh.vertices[torch.unique(mesh.faces.reshape(-1))]
    if not torch.isfinite(used).all():
        raise MeshLoadError("mesh has non-finite vertex coordinates (NaN or inf); cannot normalise it")
    lo, hi = used.amin(0), used.amax(0)
    centre = (lo + hi) / 2
    extent = float((used - centre).norm(dim=-1).max())
    if not extent > 1e-12 * max(1.0, float(centre.abs().max())):
        raise MeshLoadError("mesh is degenerate: all its vertices coincide (zero size); cannot normalise it")
    scale = radius / extent
    return replace(mesh, vertices=(mesh.vertices - centre) * scale), centre, scale


# ---------------------------------------------------------------------------------------------
# Loading


def _image_to_tensor(image) -> Tensor | None:
    if image is None:
        return None
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    return torch.from_numpy(np.clip(arr.astype(np.float32), 0.0, 1.0))


def _color01(c) -> Tensor:
    c = np.asarray(c, dtype=np.float32).reshape(-1)[:3]
    if c.max() > 1.0:
        c = c / 255.0
    return torch.from_numpy(c)


def _from_trimesh(tm) -> Mesh:
    vertices = torch.from_numpy(np.asarray(tm.vertices, dtype=np.float32).copy())
    faces = torch.from_numpy(np.asarray(tm.faces, dtype=np.int64).copy()).reshape(-1, 3)
    visual = getattr(tm, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        material = getattr(visual, "material", None)
        image, factor = None, None
        if material is not None:
            if hasattr(material, "baseColorTexture"):  # PBRMaterial (glTF)
                image = material.baseColorTexture
                factor = material.baseColorFactor
            else:  # SimpleMaterial (OBJ)
                image = getattr(material, "image", None)
        uv = getattr(visual, "uv", None)
        if image is not None and uv is not None and len(uv) == len(vertices):
            texture = _image_to_tensor(image)
            if factor is not None:
                texture = (texture * _color01(factor)).clamp(0, 1)
            return Mesh(vertices, faces, uv=torch.from_numpy(np.asarray(uv, dtype=np.float32).copy()), texture=texture)
        if material is not None:  # a material without an image: its main colour everywhere
            colour = _color01(material.main_color)
            return Mesh(vertices, faces, vertex_colors=colour.expand(len(vertices), 3).clone())
        return Mesh(vertices, faces)
    if kind == "vertex":
        vc = np.asarray(visual.vertex_colors)
        return Mesh(vertices, faces, vertex_colors=torch.from_numpy(vc[:, :3].astype(np.float32) / 255.0))
    if kind == "face":
        fc = torch.from_numpy(np.asarray(visual.face_colors)[:, :3].astype(np.float32) / 255.0)
        # Give every face its own three vertices so a per-vertex colour is a per-face colour.
        return Mesh(vertices[faces.reshape(-1)], torch.arange(faces.numel()).reshape(-1, 3), vertex_colors=fc.repeat_interleave(3, dim=0))
    return Mesh(vertices, faces)


def load_mesh(path: str | os.PathLike) -> Mesh:
    """Read an OBJ (with MTL + texture), GLB/glTF or PLY file into a Mesh.

    Multi-part files are merged into one mesh (trimesh concatenates them, packing textures).
    Raises MeshLoadError with the reason for missing, unreadable or face-less files.
    """
    import trimesh

    path = Path(path)
    if not path.exists():
        raise MeshLoadError(f"mesh file not found: {path}")
    if not path.is_file():
        raise MeshLoadError(f"not a file: {path}")
    if path.suffix.lower() not in SUPPORTED_FORMATS:
        raise MeshLoadError(f"unsupported mesh format {path.suffix!r} for {path}; use one of {', '.join(SUPPORTED_FORMATS)}")
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False, maintain_order=True)
    except Exception as exc:
        raise MeshLoadError(f"cannot read mesh file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshLoadError(f"mesh file {path} holds no triangle mesh (found {type(loaded).__name__})")
    if loaded.faces is None or len(loaded.faces) == 0:
        raise MeshLoadError(f"mesh file {path} has no faces (a point cloud or an empty file?)")
    mesh = _from_trimesh(loaded)
    if mesh.faces.min() < 0 or mesh.faces.max() >= mesh.num_vertices:
        raise MeshLoadError(f"mesh file {path} has face indices out of range")
    if not torch.isfinite(mesh.vertices).all():
        raise MeshLoadError(f"mesh file {path} has non-finite vertex coordinates")
    return mesh


# ---------------------------------------------------------------------------------------------
# Writing (atomic)


def _atomic_write(path: Path, data: bytes) -> None:
    from distill3d.engine.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _png_bytes(image01: Tensor) -> bytes:
    from PIL import Image

    arr = (image01.detach().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _colors_for_export(mesh: Mesh) -> Tensor | None:
    """Per-vertex colours: the mesh's own, else the texture sampled at the vertex UVs."""
    if mesh.vertex_colors is not None:
        return mesh.vertex_colors[:, :3]
    if mesh.has_texture:
        return sample_texture(mesh.texture, mesh.uv)
    return None


def _fmt_rows(arr: np.ndarray, prefix: str, fmt: str) -> str:
    """One line per row: prefix, then `fmt` once per group of fmt.count('%') columns."""
    if len(arr) == 0:
        return ""
    groups = arr.shape[1] // fmt.count("%")
    line = prefix + " " + " ".join([fmt] * groups) + "\n"
    return (line * len(arr)) % tuple(arr.reshape(-1).tolist())


def _obj_text(mesh: Mesh, mtl_name: str | None) -> str:
    v = mesh.vertices.detach().cpu().numpy().astype(np.float64)
    f = mesh.faces.detach().cpu().numpy() + 1
    parts = ["# distill3d mesh export\n"]
    if mtl_name:
        parts.append(f"mtllib {mtl_name}\n")
    colors = None if mesh.has_texture else _colors_for_export(mesh)
    if colors is not None:  # "v x y z r g b": the vertex-colour extension Blender and MeshLab read
        parts.append(_fmt_rows(np.concatenate([v, colors.detach().cpu().numpy()], 1), "v", "%.7g"))
    else:
        parts.append(_fmt_rows(v, "v", "%.7g"))
    if mesh.has_texture:
        parts.append(_fmt_rows(mesh.uv.detach().cpu().numpy().astype(np.float64), "vt", "%.7g"))
    if mesh.normals is not None:
        parts.append(_fmt_rows(mesh.normals.detach().cpu().numpy().astype(np.float64), "vn", "%.6g"))
    if mtl_name:
        parts.append("usemtl material0\n")
    if mesh.has_texture and mesh.normals is not None:
        parts.append(_fmt_rows(np.repeat(f, 3, axis=1), "f", "%d/%d/%d"))
    elif mesh.has_texture:
        parts.append(_fmt_rows(np.repeat(f, 2, axis=1), "f", "%d/%d"))
    elif mesh.normals is not None:
        parts.append(_fmt_rows(np.repeat(f, 2, axis=1), "f", "%d//%d"))
    else:
        parts.append(_fmt_rows(f, "f", "%d"))
    return "".join(parts)


def write_obj(mesh: Mesh, path: str | os.PathLike) -> list[Path]:
    """Write `path` (.obj) and, for a textured mesh, `<stem>.mtl` and `<stem>.png` beside it.

    All files are written into a temporary folder next to the destination and moved into place,
    texture and material first, the OBJ last. Returns the written paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    files: dict[str, bytes] = {}
    mtl_name = None
    if mesh.has_texture:
        png_name, mtl_name = f"{stem}.png", f"{stem}.mtl"
        files[png_name] = _png_bytes(mesh.texture)
        files[mtl_name] = (
            "# distill3d material\nnewmtl material0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nNs 0\nd 1\nillum 1\n" f"map_Kd {png_name}\n"
        ).encode()
    files[path.name] = _obj_text(mesh, mtl_name).encode()
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    written = []
    try:
        for name, data in files.items():
            with open(tmpdir / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name in files:  # dict order: PNG, MTL, then the OBJ
            os.replace(tmpdir / name, path.parent / name)
            written.append(path.parent / name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return written


def _to_trimesh(mesh: Mesh):
    import trimesh
    from PIL import Image

    v = mesh.vertices.detach().cpu().numpy()
    f = mesh.faces.detach().cpu().numpy()
    kwargs = {}
    if mesh.normals is not None:
        kwargs["vertex_normals"] = mesh.normals.detach().cpu().numpy()
    if mesh.has_texture:
        arr = (mesh.texture.detach().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        material = trimesh.visual.material.PBRMaterial(
            name="material0", baseColorTexture=Image.fromarray(arr), metallicFactor=0.0, roughnessFactor=1.0
        )
        visual = trimesh.visual.TextureVisuals(uv=mesh.uv.detach().cpu().numpy(), material=material)
    else:
        colors = _colors_for_export(mesh)
        if colors is not None:
            rgba = np.concatenate([(colors.detach().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8), np.full((len(v), 1), 255, np.uint8)], 1)
            visual = trimesh.visual.ColorVisuals(vertex_colors=rgba)
        else:
            visual = None
    return trimesh.Trimesh(vertices=v, faces=f, visual=visual, process=False, **kwargs)


def write_glb(mesh: Mesh, path: str | os.PathLike) -> list[Path]:
    """Binary glTF 2.0 with the texture embedded (PBR base colour, metallic 0, roughness 1), or
    vertex colours (COLOR_0) for an untextured mesh."""
    path = Path(path)
    tm = _to_trimesh(mesh)
    data = tm.export(file_type="glb", include_normals=mesh.normals is not None)
    _atomic_write(path, data)
    return [path]


def write_ply(mesh: Mesh, path: str | os.PathLike) -> list[Path]:
    """Binary little-endian PLY: x y z [nx ny nz] [red green blue (uchar)] and the faces.

    A textured mesh without vertex colours gets its texture sampled at the vertex UVs.
    """
    path = Path(path)
    v = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    f = mesh.faces.detach().cpu().numpy().astype(np.int32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if mesh.normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    colors = _colors_for_export(mesh)
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vert = np.empty(len(v), dtype=fields)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    if mesh.normals is not None:
        n = mesh.normals.detach().cpu().numpy()
        vert["nx"], vert["ny"], vert["nz"] = n[:, 0], n[:, 1], n[:, 2]
    if colors is not None:
        c = (colors.detach().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        vert["red"], vert["green"], vert["blue"] = c[:, 0], c[:, 1], c[:, 2]
    face = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"] = 3
    face["i"] = f
    names = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment distill3d mesh export", f"element vertex {len(v)}"]
    header += [f"property {names[t]} {n}" for n, t in fields]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    data = ("\n".join(header) + "\n").encode("ascii") + vert.tobytes() + face.tobytes()
    _atomic_write(path, data)
    return [path]


_WRITERS = {".obj": write_obj, ".glb": write_glb, ".ply": write_ply}


def save_mesh(mesh: Mesh, path: str | os.PathLike) -> list[Path]:
    """Write a mesh by file suffix: .obj (+ .mtl + .png), .glb or .ply. Returns the written paths."""
    path = Path(path)
    writer = _WRITERS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"unsupported export format {path.suffix!r}; use one of {', '.join(_WRITERS)}")
    if mesh.num_faces == 0:
        raise ValueError("refusing to write a mesh without faces")
    return writer(mesh, path)
