"""Render a textured or vertex-coloured Mesh for a batch of Cameras with the rasterizer.

This is what the oracle uses for mesh references (and what a DMTet representation builds on):
albedo only (no lighting), texture looked up bilinearly without mipmaps (as a viewer shows it at
close range), composited over a background with the rasterizer's antialiased coverage.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import RenderOutput
from distill3d.representations.mesh.mesh_io import Mesh, sample_texture, vertex_normals
from distill3d.representations.mesh.rasterizer import antialias as _antialias
from distill3d.representations.mesh.rasterizer import interpolate, project, rasterize

__all__ = ["render_mesh", "DEFAULT_GREY"]

DEFAULT_GREY = 0.7  # albedo of a mesh without texture or vertex colours


def _background(background, batch: int, height: int, width: int, device, dtype) -> Tensor:
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.dim() == 0:
        bg = bg.expand(3)
    if bg.dim() == 1:
        return bg.view(1, 1, 1, 3).expand(batch, height, width, 3)
    if bg.shape == (height, width, 3):
        bg = bg[None]
    return bg.expand(batch, height, width, 3)


def render_mesh(
    mesh: Mesh,
    cameras: Cameras,
    height: int,
    width: int,
    background: float | Sequence[float] | Tensor = 1.0,
    backend: str = "auto",
    antialias: bool = True,
    need_normals: bool = True,
    near: float = 0.01,
    far: float = 100.0,
) -> RenderOutput:
    """RenderOutput with rgb composited over `background`, opacity, ray-distance depth and world
    normals (interpolated vertex normals; the mesh's own when it has them). Differentiable w.r.t.
    vertex positions, colours and texture."""
    device = cameras.device
    mesh = mesh.to(device)
    B = len(cameras)
    faces = mesh.faces
    clip = project(mesh.vertices, cameras.mvp(aspect=width / height, near=near, far=far))
    frags = rasterize(clip, faces, height, width, backend=backend)
    mask = frags.mask[..., None].to(clip.dtype)
    if mesh.has_texture:
        uv = interpolate(mesh.uv, frags, faces)
        albedo = sample_texture(mesh.texture, uv) * mask
    elif mesh.vertex_colors is not None:
        albedo = interpolate(mesh.vertex_colors[:, :3], frags, faces)
    else:
        albedo = mask.expand(B, height, width, 3) * DEFAULT_GREY
    bg = _background(background, B, height, width, device, clip.dtype)
    if antialias:
        aa = _antialias(torch.cat([albedo, mask], dim=-1), frags, clip, faces)
        color, opacity = aa[..., :3], aa[..., 3:].clamp(0.0, 1.0)
    else:
        color, opacity = albedo, mask
    rgb = (color + (1.0 - opacity) * bg).clamp(0.0, 1.0)
    pos = interpolate(mesh.vertices, frags, faces)
    depth = (pos - cameras.position[:, None, None, :]).norm(dim=-1, keepdim=True) * mask
    normal = None
    if need_normals:
        vn = mesh.normals if mesh.normals is not None else vertex_normals(mesh.vertices, faces)
        normal = torch.nn.functional.normalize(interpolate(vn, frags, faces), dim=-1) * mask
    return RenderOutput(rgb=rgb, opacity=opacity, depth=depth, background=bg, normal=normal, extras={"fragments": frags, "albedo": albedo})
