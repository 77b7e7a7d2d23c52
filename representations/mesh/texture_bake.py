"""UV unwrapping (xatlas), albedo baking in UV space, seam filling, and the field -> textured mesh
pipeline used to export a NeRF (and later any density + colour field).

Baking rasterizes the mesh in UV space with the same rasterizer as the renders (clip position
(2u - 1, 2v - 1, 0, 1), so texel row 0 is v = 1, the top of the image), interpolates the world
position at every covered texel centre, and evaluates the colour field there. Texels no face
covers are filled so that bilinear lookups and mipmaps near chart borders do not bleed background
into the surface: a few rings of dilation (mean of covered neighbours), then push-pull (a pyramid
of weighted averages pulled back down) for everything left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.representations.mesh.cleanup import decimate, decimation_method, remove_small_components
from distill3d.representations.mesh.marching_cubes import EmptySurfaceError, extract_surface
from distill3d.representations.mesh.mesh_io import Mesh, vertex_normals
from distill3d.representations.mesh.rasterizer import interpolate, rasterize
from distill3d.representations.mesh.smoothing import taubin_smooth

# Taubin lambda|mu iterations applied to isosurface exports (marching cubes / tets; measured in
# benchmarks/bench_mesh_pipeline.py). textured_mesh() itself defaults to none: a mesh that is not an
# isosurface (a few large faces) is not to be smoothed.
DEFAULT_SMOOTHING_ITERATIONS = 10

__all__ = [
    "ColorField",
    "unwrap_uv",
    "rasterize_uv",
    "bake_texture",
    "dilate",
    "push_pull_fill",
    "fill_seams",
    "ExportInfo",
    "mesh_from_fields",
]

ColorField = Callable[[Tensor], Tensor]
"""points (N, 3) world -> rgb (N, 3) in [0, 1]."""


def unwrap_uv(mesh: Mesh, texture_size: int = 1024, padding: int = 2) -> tuple[Mesh, Tensor]:
    """xatlas UV atlas. Returns (mesh with vertices split at seams and `uv` set, vmapping (V',)
    index of each new vertex in the input). Vertex colours and normals are carried over."""
    import xatlas

    if mesh.num_faces == 0:
        raise ValueError("cannot unwrap a mesh without faces")
    atlas = xatlas.Atlas()
    atlas.add_mesh(mesh.vertices.detach().cpu().numpy().astype(np.float32), mesh.faces.detach().cpu().numpy().astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmapping, indices, uvs = atlas[0]
    vmap = torch.from_numpy(vmapping.astype(np.int64)).to(mesh.vertices.device)
    pick = lambda t: None if t is None else t[vmap]  # noqa: E731
    out = Mesh(
        mesh.vertices[vmap],
        torch.from_numpy(indices.astype(np.int64)).to(mesh.vertices.device),
        uv=torch.from_numpy(uvs.astype(np.float32)).to(mesh.vertices.device),
        vertex_colors=pick(mesh.vertex_colors),
        normals=pick(mesh.normals),
    )
    return out, vmap


def rasterize_uv(uv: Tensor, faces: Tensor, height: int, width: int, backend: str = "auto"):
    """Fragments of the faces laid out in UV space: (1, height, width) with texel row 0 at v = 1."""
    clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=-1)[None]
    return rasterize(clip, faces, height, width, backend=backend)


def dilate(image: Tensor, mask: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Grow the covered region ring by ring: each new texel takes the mean of its covered 3x3
    neighbours. image (H, W, C), mask (H, W) bool."""
    img = image.permute(2, 0, 1)[None] * mask[None, None]
    w = mask[None, None].to(image.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=image.dtype, device=image.device)
    C = img.shape[1]
    for _ in range(iterations):
        wsum = F.conv2d(w, kernel, padding=1)
        csum = F.conv2d(img, kernel.expand(C, 1, 3, 3), padding=1, groups=C)
        grow = (w == 0) & (wsum > 0)
        if not grow.any():
            break
        img = torch.where(grow, csum / wsum.clamp_min(1e-12), img)
        w = torch.where(grow, torch.ones_like(w), w)
    return img[0].permute(1, 2, 0), w[0, 0] > 0


def push_pull_fill(image: Tensor, mask: Tensor) -> Tensor:
    """Fill every uncovered texel from a pyramid of weighted averages (push-pull)."""
    if bool(mask.all()) or not bool(mask.any()):
        return image
    w = mask[None, None].to(image.dtype)
    c = image.permute(2, 0, 1)[None] * w
    levels = [(c, w)]
    while min(c.shape[-2:]) > 1:
        c = F.avg_pool2d(c, 2, ceil_mode=True)
        w = F.avg_pool2d(w, 2, ceil_mode=True)
        levels.append((c, w))
    filled = levels[-1][0] / levels[-1][1].clamp_min(1e-12)
    for c, w in reversed(levels[:-1]):
        up = F.interpolate(filled, size=c.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(w > 0, c / w.clamp_min(1e-12), up)
    return filled[0].permute(1, 2, 0)


def fill_seams(image: Tensor, mask: Tensor, dilation: int = 4) -> Tensor:
    """Dilation by `dilation` texels, then push-pull for the rest of the texture."""
    img, m = dilate(image, mask, dilation)
    return push_pull_fill(img, m)


@torch.no_grad()
def bake_texture(
    mesh: Mesh,
    color_fn: ColorField,
    texture_size: int = 1024,
    chunk_size: int = 1 << 16,
    dilation: int = 4,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Albedo texture (S, S, 3) of a mesh with `uv`, sampled from color_fn at texel surface points.

    Returns (texture with seams filled, coverage mask (S, S) bool of texels inside a face).
    """
    if mesh.uv is None:
        raise ValueError("bake_texture needs a mesh with uv (run unwrap_uv first)")
    S = int(texture_size)
    frags = rasterize_uv(mesh.uv, mesh.faces, S, S, backend=backend)
    mask = frags.mask[0]
    pos = interpolate(mesh.vertices, frags, mesh.faces)[0][mask]
    colors = torch.empty(pos.shape[0], 3, dtype=torch.float32, device=pos.device)
    for i in range(0, pos.shape[0], chunk_size):
        colors[i : i + chunk_size] = color_fn(pos[i : i + chunk_size]).reshape(-1, 3).float()
    image = torch.zeros(S, S, 3, dtype=torch.float32, device=pos.device)
    image[mask] = colors.clamp(0.0, 1.0)
    return fill_seams(image, mask, dilation), mask


@dataclass
class ExportInfo:
    threshold: float
    faces_marching_cubes: int
    faces_after_cleanup: int
    faces_final: int
    decimation: str | None  # method used, None when not decimated
    texture_size: int
    texel_coverage: float  # fraction of texels inside a chart before filling
    extras: dict = field(default_factory=dict)


@torch.no_grad()
def mesh_from_fields(
    density_fn: Callable[[Tensor], Tensor] | Tensor,
    color_fn: ColorField,
    bounds=((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)),
    resolution: int = 128,
    threshold: float | str = "auto",
    min_component_fraction: float = 0.02,
    target_faces: int | None = None,
    decimation: str = "auto",
    texture_size: int = 1024,
    uv_padding: int = 2,
    vertex_colors: bool = True,
    chunk_size: int = 1 << 16,
    smoothing: int = DEFAULT_SMOOTHING_ITERATIONS,
) -> tuple[Mesh, ExportInfo]:
    """Density + colour fields -> a textured, cleaned mesh ready for `save_mesh`.

    Marching cubes on a resolution^3 grid over bounds at `threshold` ("auto": mean positive
    density), small components removed, Taubin smoothing (`smoothing` iterations), optional decimation to target_faces, area-weighted vertex
    normals, xatlas unwrap, albedo baked at texture_size^2 with seams filled, and (optionally)
    vertex colours from the colour field at the vertices (what the PLY export uses).
    Raises EmptySurfaceError, before anything is written anywhere, when nothing is above the
    threshold.
    """
    verts, faces, thr = extract_surface(density_fn, bounds, resolution, threshold, pad=True)
    return textured_mesh(
        verts, faces, color_fn, threshold=thr, min_component_fraction=min_component_fraction, target_faces=target_faces,
        decimation=decimation, texture_size=texture_size, uv_padding=uv_padding, vertex_colors=vertex_colors, chunk_size=chunk_size,
        smoothing=smoothing,
    )


def textured_mesh(
    verts: Tensor,
    faces: Tensor,
    color_fn: ColorField,
    threshold: float = 0.0,
    min_component_fraction: float = 0.02,
    target_faces: int | None = None,
    decimation: str = "auto",
    texture_size: int = 1024,
    uv_padding: int = 2,
    vertex_colors: bool = True,
    chunk_size: int = 1 << 16,
    extras: dict | None = None,
    smoothing: int = 0,
) -> tuple[Mesh, ExportInfo]:
    """An extracted surface (from marching cubes or marching tets) -> the exported mesh: small
    components removed, Taubin smoothing (`smoothing` lambda|mu iterations, 0 = off; smoothing.py),
    optional decimation, normals, xatlas unwrap, baked albedo, vertex colours."""
    n_extracted = int(faces.shape[0])
    if n_extracted == 0:
        raise EmptySurfaceError("the surface is empty; nothing to export")
    mesh = remove_small_components(Mesh(verts.float().contiguous(), faces), min_fraction=min_component_fraction)
    n_clean = mesh.num_faces
    if smoothing > 0:
        mesh = Mesh(taubin_smooth(mesh.vertices, mesh.faces, smoothing), mesh.faces)
    method = None
    if target_faces is not None and mesh.num_faces > target_faces:
        method = decimation_method() if decimation == "auto" else decimation
        mesh = decimate(mesh, target_faces, method=method)
    if mesh.num_faces == 0:
        raise EmptySurfaceError("empty surface after clean-up; nothing to export")
    mesh = Mesh(mesh.vertices, mesh.faces, normals=vertex_normals(mesh.vertices, mesh.faces))
    if vertex_colors:
        vc = torch.cat([color_fn(mesh.vertices[i : i + chunk_size]).reshape(-1, 3).float() for i in range(0, mesh.num_vertices, chunk_size)])
        mesh.vertex_colors = vc.clamp(0.0, 1.0)
    mesh, _ = unwrap_uv(mesh, texture_size, uv_padding)
    texture, covered = bake_texture(mesh, color_fn, texture_size, chunk_size)
    mesh.texture = texture
    info = ExportInfo(
        threshold=threshold,
        faces_marching_cubes=n_extracted,
        faces_after_cleanup=n_clean,
        faces_final=mesh.num_faces,
        decimation=method,
        texture_size=int(texture_size),
        texel_coverage=float(covered.float().mean()),
        extras={**(extras or {}), "smoothing_iterations": int(smoothing)},
    )
    return mesh, info
