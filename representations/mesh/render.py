"""Render a textured or vertex-coloured Mesh for a batch of Cameras with the rasterizer.

This is what the oracle uses for mesh references (and what a DMTet representation builds on):
albedo only (no lighting), texture looked up bilinearly without mipmaps (as a viewer shows it at
close range), composited over a background with the rasterizer's antialiased coverage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import RenderOutput
from distill3d.representations.mesh.mesh_io import Mesh, load_mesh, normalize, sample_texture, vertex_normals
from distill3d.representations.mesh.rasterizer import antialias as _antialias
from distill3d.representations.mesh.rasterizer import interpolate, project, rasterize

__all__ = ["render_mesh", "MeshReference", "DEFAULT_GREY", "MESH_REFERENCE_SUFFIXES"]

MESH_REFERENCE_SUFFIXES = (".obj", ".glb", ".gltf", ".ply")

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
    shade: Callable[[Tensor, Tensor | None], Tensor] | None = None,
) -> RenderOutput:
    """RenderOutput with rgb composited over `background`, opacity, ray-distance depth and world
    normals (interpolated vertex normals; the mesh's own when it has them). Differentiable w.r.t.
    vertex positions, colours and texture. `shade(albedo, normal)` (B, H, W, 3) each, normal None
    unless need_normals, turns the albedo into the colour composited (lighting; the textured-mesh
    representation's shading modes); extras["albedo"] stays the unshaded albedo."""
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
    normal = None
    if need_normals:
        vn = mesh.normals if mesh.normals is not None else vertex_normals(mesh.vertices, faces)
        normal = torch.nn.functional.normalize(interpolate(vn, frags, faces), dim=-1) * mask
    colour = albedo if shade is None else shade(albedo, normal) * mask
    bg = _background(background, B, height, width, device, clip.dtype)
    if antialias:
        aa = _antialias(torch.cat([colour, mask], dim=-1), frags, clip, faces)
        color, opacity = aa[..., :3], aa[..., 3:].clamp(0.0, 1.0)
    else:
        color, opacity = colour, mask
    rgb = (color + (1.0 - opacity) * bg).clamp(0.0, 1.0)
    pos = interpolate(mesh.vertices, frags, faces)
    depth = (pos - cameras.position[:, None, None, :]).norm(dim=-1, keepdim=True) * mask
    return RenderOutput(rgb=rgb, opacity=opacity, depth=depth, background=bg, normal=normal, extras={"fragments": frags, "albedo": albedo})


class MeshReference:
    """A mesh file as an oracle/evaluation reference: `render(cameras, height, width, background)`
    like the analytic scenes (distill3d.engine.references).

    The mesh is centred and scaled into a sphere of `radius` (default 0.8, inside the NeRF's unit
    bounding sphere with a margin, like the bundled scenes). Renders are exact rasterizations of
    pixel centres (hard edges, like the scenes' one ray per pixel) unless antialias=True.
    """

    def __init__(self, mesh: Mesh, radius: float = 0.8, antialias: bool = False, backend: str = "auto", name: str = "mesh"):
        self.mesh, self.centre, self.scale = normalize(mesh, radius)
        if self.mesh.normals is None:
            self.mesh.normals = vertex_normals(self.mesh.vertices, self.mesh.faces)
        self.radius = float(radius)
        self.antialias = antialias
        self.backend = backend
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "MeshReference":
        """Load an OBJ/GLB/PLY reference; MeshLoadError (a ValueError) says why a file is unusable."""
        path = Path(path)
        return cls(load_mesh(path), name=path.stem, **kwargs)

    @property
    def bounding_radius(self) -> float:
        return float(self.mesh.vertices.norm(dim=-1).max())

    def scene_radius(self) -> float:
        return self.bounding_radius

    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: int, background: Tensor | None = None) -> RenderOutput:
        bg = 1.0 if background is None else torch.as_tensor(background).detach().to(cameras.device, torch.float32)
        return render_mesh(self.mesh, cameras, height, width, background=bg, backend=self.backend, antialias=self.antialias)
