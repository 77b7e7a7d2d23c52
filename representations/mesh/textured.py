"""Textured mesh with fixed geometry (DreamGaussian's second stage): only the UV texture trains.

Geometry: vertices (V, 3), faces (F, 3), UVs (V, 2) and vertex normals (V, 3) are buffers, saved in
checkpoints (their sizes come from the source, so loading a checkpoint takes the stored shapes).
Appearance: one trainable image, texture = sigmoid(texture_logits) (S, S, 3) (DreamGaussian keeps
the raw albedo behind a sigmoid too, and trains it with lr 0.2), looked up bilinearly.

Where the surface comes from (checked before any training step):
  - `init_from` a finished run that provides a surface (stage `init_from: previous` in a pipeline):
    its export_mesh (Gaussians: density grid, marching cubes, clean-up, decimation to
    `source_faces`, xatlas unwrap, texture baked from its colours; DMTet / NeRF: their mesh export);
  - or `mesh: FILE` (.glb / .obj / .ply through mesh_io.load_mesh): its UVs and texture when it has
    them, else an xatlas unwrap and a texture baked from its vertex colours (grey without any).
Rendering reuses representations/mesh/render.py (the rasterizer, bilinear texture lookup,
antialiased silhouettes, shading modes through `shade`). Exports glb/obj through mesh_io.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras, pixel_rays
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, RenderOutput, RenderSettings, Representation
from distill3d.engine.schedules import ScheduleSpec
from distill3d.representations.background import Background, BackgroundConfig
from distill3d.representations.mesh.mesh_io import Mesh, load_mesh, vertex_normals
from distill3d.representations.mesh.render import DEFAULT_GREY, render_mesh
from distill3d.representations.shading import ShadingConfig, render_shading, shade, shading_extras, validate_mix

__all__ = ["TexturedMesh", "TexturedMeshConfig", "texture_from_vertex_colors"]

GEOMETRY = ("vertices", "faces", "uv", "normals")
LOGIT_EPS = 1e-3  # textures are stored as logits of values clamped to [eps, 1 - eps]


@dataclass
class TexturedMeshConfig:
    # A mesh file to start from (.glb/.obj/.ply); null: the run's init_from source gives the surface.
    mesh: str | None = None
    texture_size: int = 1024  # texture of a mesh without one (unwrapped and baked at this size)
    # Surface taken from an init_from source: its export_mesh(source_resolution, source_faces, texture_size)
    # (DreamGaussian: a 128^3 density grid, decimated; the rasterizer's cost grows with the faces).
    source_resolution: int = 128
    source_faces: int | None = 50000
    lr_texture: ScheduleSpec = 0.2  # on the texture logits (DreamGaussian's texture_lr)
    lr_background: ScheduleSpec = 0.001
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    rasterize_backend: str = "auto"
    near: float = 0.01
    far: float = 100.0

    def __post_init__(self):
        if not 8 <= self.texture_size <= 8192:
            raise ValueError(f"texture_size must lie in 8..8192, got {self.texture_size}")
        if not 16 <= self.source_resolution <= 1024:
            raise ValueError(f"source_resolution must lie in 16..1024, got {self.source_resolution}")
        if self.source_faces is not None and self.source_faces < 4:
            raise ValueError(f"source_faces must be >= 4 or null, got {self.source_faces}")


def _logit(texture: Tensor) -> Tensor:
    t = texture.float().clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.log(t / (1 - t))


@torch.no_grad()
def texture_from_vertex_colors(mesh: Mesh, texture_size: int) -> Tensor:
    """(S, S, 3) texture of a mesh with `uv`: its vertex colours interpolated over each face in UV
    space (grey without colours), seams filled (texture_bake.fill_seams)."""
    from distill3d.representations.mesh.rasterizer import interpolate
    from distill3d.representations.mesh.texture_bake import fill_seams, rasterize_uv

    S = int(texture_size)
    if mesh.vertex_colors is None:
        return torch.full((S, S, 3), DEFAULT_GREY, device=mesh.vertices.device)
    frags = rasterize_uv(mesh.uv, mesh.faces, S, S)
    mask = frags.mask[0]
    image = interpolate(mesh.vertex_colors[:, :3].float(), frags, mesh.faces)[0] * mask[..., None]
    return fill_seams(image.clamp(0, 1), mask)


def prepare_mesh(mesh: Mesh, texture_size: int, where: str) -> Mesh:
    """A mesh ready to be textured: faces checked, UVs (xatlas) and a texture when missing, normals."""
    from distill3d.representations.mesh.texture_bake import unwrap_uv

    if mesh.num_faces == 0:
        raise UserError(f"{where} has no faces; the textured-mesh representation needs a triangle surface")
    if not torch.isfinite(mesh.vertices).all():
        raise UserError(f"{where} has non-finite vertex coordinates")
    if not mesh.has_texture:
        if mesh.uv is None:
            mesh, _ = unwrap_uv(Mesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors), texture_size)
        mesh.texture = texture_from_vertex_colors(mesh, texture_size)
    if mesh.normals is None:
        mesh.normals = vertex_normals(mesh.vertices, mesh.faces)
    return mesh


class TexturedMesh(Representation):
    Config = TexturedMeshConfig
    exports: ClassVar[tuple[str, ...]] = ("glb", "obj")
    provides: ClassVar[tuple[str, ...]] = ("surface_mesh",)
    accepts_init: ClassVar[tuple[str, ...]] = ("surface_mesh", "density_field")

    def __init__(self, config: TexturedMeshConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        validate_mix(config.shading.train_mix)
        self.background = Background(config.background)
        # Empty until a mesh file, an init_from source or a checkpoint gives the surface.
        self.register_buffer("vertices", torch.zeros(0, 3))
        self.register_buffer("faces", torch.zeros(0, 3, dtype=torch.long))
        self.register_buffer("uv", torch.zeros(0, 2))
        self.register_buffer("normals", torch.zeros(0, 3))
        self.texture_logits = nn.Parameter(torch.zeros(1, 1, 3))
        if config.mesh:
            path = Path(config.mesh).expanduser()
            self.set_mesh(prepare_mesh(load_mesh(path), config.texture_size, f"mesh file {path}"))
        self.to(ctx.device)

    # ----- state -----------------------------------------------------------------------------
    def set_mesh(self, mesh: Mesh) -> None:
        """Take a mesh with uv, texture and normals as the fixed surface and the initial texture."""
        device = self.vertices.device
        self.vertices = mesh.vertices.detach().float().to(device).contiguous()
        self.faces = mesh.faces.detach().long().to(device).contiguous()
        self.uv = mesh.uv.detach().float().to(device).contiguous()
        self.normals = mesh.normals.detach().float().to(device).contiguous()
        self.texture_logits = nn.Parameter(_logit(mesh.texture.detach()).to(device).contiguous())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The geometry and texture sizes are the stored ones: take their shapes first."""
        for name in GEOMETRY:
            if name in state_dict and getattr(self, name).shape != state_dict[name].shape:
                old = getattr(self, name)
                setattr(self, name, torch.zeros(state_dict[name].shape, dtype=old.dtype, device=old.device))
        stored = state_dict.get("texture_logits")
        if stored is not None and stored.shape != self.texture_logits.shape:
            self.texture_logits = nn.Parameter(self.texture_logits.new_zeros(stored.shape))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def has_surface(self) -> bool:
        return int(self.faces.shape[0]) > 0

    def _require_surface(self) -> None:
        if not self.has_surface:
            raise UserError(
                "the textured-mesh representation has no surface to texture: set representation.mesh to a mesh file "
                "(.glb/.obj/.ply), or seed it from a finished run (--init-from RUN, or init_from: previous in a "
                "pipeline stage) whose representation provides a surface (gaussians, dmtet, nerf)"
            )

    def texture(self) -> Tensor:
        return torch.sigmoid(self.texture_logits)

    def mesh(self) -> Mesh:
        """The current textured mesh (texture differentiable)."""
        return Mesh(self.vertices, self.faces, uv=self.uv, texture=self.texture(), normals=self.normals)

    def stats(self) -> dict[str, float]:
        return {"faces": float(self.faces.shape[0])}

    # ----- rendering -------------------------------------------------------------------------
    def render(self, cameras: Cameras, settings: RenderSettings) -> RenderOutput:
        self._require_surface()
        c = self.config
        h, w = settings.height, settings.width
        _, dirs = pixel_rays(cameras, h, w)
        background = self.background(dirs, settings.background)
        mode, light = render_shading(settings, c.shading, cameras.position)
        want_normals = settings.need_normals or mode in ("lambertian", "textureless", "normal")
        light_px = light.view(-1, 1, 1, 3)
        shader = None if mode == "albedo" else (lambda albedo, normal: shade(albedo, normal, light_px, mode, c.shading))
        out = render_mesh(
            self.mesh(), cameras, h, w, background=background, backend=c.rasterize_backend, need_normals=want_normals,
            near=c.near, far=c.far, shade=shader,
        )
        out.extras.update({**shading_extras(mode, light, c.shading), "num_faces": int(self.faces.shape[0])})
        return out

    def param_groups(self) -> list[dict]:
        self._require_surface()
        c = self.config
        groups = [{"name": "texture", "params": [self.texture_logits], "lr": c.lr_texture}]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"name": "background", "params": bg, "lr": c.lr_background})
        return groups

    # ----- seeding ---------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_from(self, source) -> dict:
        """The source run's surface mesh (its export_mesh: UVs and a texture baked from its colours)
        becomes the fixed geometry and the initial texture."""
        if not hasattr(source, "export_mesh"):
            return super().initialize_from(source)
        c = self.config
        try:
            mesh, info = source.export_mesh(c.source_resolution, c.source_faces, c.texture_size)
        except NotImplementedError as exc:
            raise UserError(f"a {type(source).__name__} run cannot give a surface mesh to texture: {exc}") from exc
        self.set_mesh(prepare_mesh(mesh, c.texture_size, f"the surface of the {type(source).__name__} run"))
        return {"faces": int(self.faces.shape[0]), "vertices": int(self.vertices.shape[0]),
                "texture": int(self.texture_logits.shape[0]), "threshold": float(info.threshold)}

    @torch.no_grad()
    def albedo(self, points: Tensor, chunk: int = 4096) -> Tensor:
        """Texture colour (P, 3) at the vertex nearest each point (what seeding another run reads)."""
        self._require_surface()
        tex = self.texture()
        from distill3d.representations.mesh.mesh_io import sample_texture

        nearest = torch.cat([torch.cdist(points[i : i + chunk].float(), self.vertices).argmin(1) for i in range(0, points.shape[0], chunk)])
        return sample_texture(tex, self.uv[nearest])

    # ----- export ----------------------------------------------------------------------------
    @torch.no_grad()
    def export_mesh(self, resolution: int = 128, target_faces: int | None = None, texture_size: int = 1024):
        """The fixed mesh with the trained texture (resolution and target_faces do not apply: the
        geometry is fixed); the texture is resampled when texture_size differs from its size."""
        from distill3d.representations.mesh.texture_bake import ExportInfo

        self._require_surface()
        tex = self.texture()
        if int(texture_size) != tex.shape[0] or int(texture_size) != tex.shape[1]:
            tex = F.interpolate(tex.permute(2, 0, 1)[None], size=(int(texture_size),) * 2, mode="bilinear", align_corners=False, antialias=True)
            tex = tex[0].permute(1, 2, 0).clamp(0, 1)
        mesh = Mesh(self.vertices.clone(), self.faces.clone(), uv=self.uv.clone(), texture=tex.clone(), normals=self.normals.clone())
        n = mesh.num_faces
        info = ExportInfo(threshold=0.0, faces_marching_cubes=n, faces_after_cleanup=n, faces_final=n, decimation=None,
                          texture_size=int(tex.shape[0]), texel_coverage=1.0, extras={"source": "textured-mesh"})
        return mesh, info

    def export(self, fmt: str, path, options=None) -> list[Path]:
        from distill3d.engine.interfaces import ExportOptions
        from distill3d.representations.mesh.mesh_io import save_mesh

        options = options or ExportOptions()
        if fmt not in self.exports:
            raise UserError(f"a textured-mesh run exports {' or '.join(self.exports)}, not {fmt!r}")
        mesh, info = self.export_mesh(options.resolution, options.decimate, options.texture_size)
        options.report(f"{info.faces_final} faces (fixed surface), texture {info.texture_size}^2")
        return save_mesh(mesh, Path(path))
