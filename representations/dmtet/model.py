"""DMTet representation (Magic3D / Magic123 fine stage).

Geometry: a tetrahedral grid of [-radius, radius]^3 (tet_grid.py) with a learned SDF value and a
learned deformation per vertex; positions = grid + tanh(delta) * deformation_scale * spacing
(spacing = 2 radius / grid_resolution). The surface {sdf = 0} is extracted every render by
differentiable marching tetrahedra (marching_tets.py). **sdf > 0 is inside.**

Appearance: a hash-grid encoding + MLP albedo field evaluated at the world position of every
rasterized pixel. Rendering: project -> rasterize -> interpolate (positions, vertex normals) ->
albedo -> shading -> antialias (silhouette gradients to the SDF and deformation) -> composite over
the background. Regularisers: normal consistency between adjacent faces, uniform Laplacian.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras, pixel_rays
from distill3d.engine.interfaces import BuildContext, RenderOutput, RenderSettings, Representation
from distill3d.engine.schedules import Schedule, ScheduleSpec
from distill3d.representations.background import Background, BackgroundConfig
from distill3d.representations.dmtet.marching_tets import marching_tets
from distill3d.representations.dmtet.redistance import redistanced_sdf
from distill3d.representations.dmtet.tet_grid import tet_grid
from distill3d.representations.mesh.cavities import DEFAULT_CLOSE_GAPS, fill_cavities
from distill3d.representations.mesh.mesh_io import sample_surface, vertex_normals
from distill3d.representations.mesh.rasterizer import antialias, face_adjacency, interpolate, project, rasterize
from distill3d.representations.fields import HashGridSettings, hash_grid, mlp
from distill3d.representations.shading import ShadingConfig, render_shading, shade, shading_extras, validate_mix

__all__ = ["DMTet", "DMTetConfig", "drop_small_solids", "normal_consistency", "uniform_laplacian"]


@dataclass
class DMTetConfig(HashGridSettings):  # the hash-grid settings are those of the colour field
    grid_resolution: int = 128  # cells per side of the tet grid (6 N^3 tetrahedra)
    radius: float = 1.0  # the grid covers [-radius, radius]^3
    # Maximum vertex displacement in grid spacings: tanh(delta) * scale * 2 radius / N.
    deformation_scale: float = 0.5
    init_sphere_radius: float = 0.5  # default shape: sdf = r - |x|
    # Seeding from a density field: "redistance" puts the surface on the density's isosurface,
    # off the lattice (redistance.py); "density" is Magic3D's sdf = density / threshold - 1, clamped.
    seed_sdf: Literal["redistance", "density"] = "redistance"
    # Redistance seeds drop solid pieces smaller than this fraction of the largest (a NeRF's
    # floaters): exports remove them anyway, but in training renders they cover the object.
    seed_min_component_fraction: float = 0.02
    # Colour field (hash encoding + MLP -> albedo).
    hidden_dim: int = 64
    hidden_layers: int = 2
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    lr_sdf: float = 1e-3
    lr_deformation: float = 1e-3
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    # Regularisers (weights may be scheduled; Magic3D uses normal consistency up to 1e4).
    normal_consistency_weight: ScheduleSpec = 0.0
    laplacian_weight: ScheduleSpec = 0.0
    rasterize_backend: str = "auto"
    near: float = 0.01
    far: float = 100.0
    tet_cache: bool = True  # cache generated grids on disk under ctx.cache_dir (or DISTILL3D_CACHE)


def normal_consistency(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean of 1 - cos between the normals of faces sharing an edge (0 for a flat surface)."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0
    fn = F.normalize(torch.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]], dim=-1), dim=-1, eps=1e-12)
    adj = face_adjacency(faces)
    f_idx = torch.arange(faces.shape[0], device=faces.device)[:, None].expand_as(adj)
    pair = (adj >= 0) & (adj > f_idx)  # each interior edge once
    if not bool(pair.any()):
        return vertices.sum() * 0
    a, b = f_idx[pair], adj[pair]
    return (1 - (fn[a] * fn[b]).sum(-1)).mean()


def drop_small_solids(inside: Tensor, min_fraction: float) -> Tensor:
    """An (X, Y, Z) occupancy grid without the connected pieces (26-connectivity) smaller than
    min_fraction of the largest one (0 keeps everything)."""
    if min_fraction <= 0 or not bool(inside.any()):
        return inside
    from distill3d.representations.mesh.cleanup import connected_components

    shape = inside.shape
    index = torch.full(shape, -1, dtype=torch.int64)
    cells = inside.nonzero()
    index[tuple(cells.T)] = torch.arange(cells.shape[0])
    pairs = [torch.stack([torch.arange(cells.shape[0]), torch.arange(cells.shape[0])], -1)]
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                if (dx, dy, dz) <= (0, 0, 0):
                    continue  # 13 forward offsets cover every neighbour pair once
                nb = cells + torch.tensor([dx, dy, dz])
                ok = ((nb >= 0) & (nb < torch.tensor(shape))).all(-1)
                j = torch.full((cells.shape[0],), -1, dtype=torch.int64)
                j[ok] = index[tuple(nb[ok].T)]
                keep = j >= 0
                pairs.append(torch.stack([torch.arange(cells.shape[0])[keep], j[keep]], -1))
    e = torch.cat(pairs)
    labels = connected_components(torch.stack([e[:, 0], e[:, 1], e[:, 1]], -1), cells.shape[0])
    # faces are the pairs; the first cells.shape[0] of them are the self-pairs, one per cell
    cell_label = labels[: cells.shape[0]]
    sizes = torch.bincount(cell_label)
    small = sizes < min_fraction * sizes.max()
    out = inside.clone()
    drop = small[cell_label]
    out[tuple(cells[drop].T)] = False
    return out


def uniform_laplacian(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean squared length of (mean of neighbours - vertex) over referenced vertices."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.unique(torch.sort(e, dim=-1).values, dim=0)
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    nv = vertices.shape[0]
    deg = torch.zeros(nv, device=vertices.device, dtype=vertices.dtype).index_add_(0, src, torch.ones_like(src, dtype=vertices.dtype))
    nsum = torch.zeros_like(vertices).index_add(0, src, vertices[dst])
    used = deg > 0
    lap = nsum[used] / deg[used, None] - vertices[used]
    return (lap * lap).sum(-1).mean()


class DMTet(Representation):
    Config = DMTetConfig
    exports = ("glb", "obj", "ply")
    provides = ("surface_mesh",)
    accepts_init = ("density_field",)

    def __init__(self, config: DMTetConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        validate_mix(config.shading.train_mix)
        c = config
        verts, tets = tet_grid(c.grid_resolution, 1.0, cache_dir=ctx.cache_dir, use_disk=c.tet_cache)
        # Recomputed deterministically from the config: not saved in checkpoints.
        self.register_buffer("grid_vertices", verts * float(c.radius), persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.sdf = nn.Parameter(torch.zeros(verts.shape[0]))
        self.deformation = nn.Parameter(torch.zeros(verts.shape[0], 3))
        self.encoding = hash_grid(c)
        self.color_net = mlp(self.encoding.output_dim, c.hidden_dim, c.hidden_layers, 3)
        self.background = Background(c.background)
        total = ctx.total_steps
        self.normal_consistency_weight = Schedule.parse(c.normal_consistency_weight, "representation.normal_consistency_weight").resolve(total)
        self.laplacian_weight = Schedule.parse(c.laplacian_weight, "representation.laplacian_weight").resolve(total)
        self.init_sphere(c.init_sphere_radius)
        self.to(ctx.device)

    # ----- geometry ----------------------------------------------------------------------
    @property
    def spacing(self) -> float:
        return 2.0 * self.config.radius / self.config.grid_resolution

    def vertex_positions(self) -> Tensor:
        """Deformed grid vertices (V, 3)."""
        return self.grid_vertices + torch.tanh(self.deformation) * (self.config.deformation_scale * self.spacing)

    def surface(self) -> tuple[Tensor, Tensor]:
        """Current surface (vertices (M, 3), faces (F, 3)), differentiable w.r.t. sdf and deformation."""
        return marching_tets(self.vertex_positions(), self.sdf, self.tets)

    @torch.no_grad()
    def init_sphere(self, radius: float = 0.5) -> None:
        """sdf = radius - |x| (positive inside), no deformation."""
        self.sdf.copy_(radius - self.grid_vertices.norm(dim=-1))
        self.deformation.zero_()

    @torch.no_grad()
    def init_from_density(
        self,
        density_fn: Callable[[Tensor], Tensor],
        threshold: float | str = "auto",
        clamp: float | None = None,
        chunk_size: int = 1 << 18,
    ) -> float:
        """Seed the SDF from a density field (a finished NeRF): sdf = density(x) - threshold,
        clamped to [-clamp, clamp]; the deformation is reset to zero.

        threshold "auto" is the mean positive density on the grid (the NeRF export's default).
        clamp None means 10 * max(|threshold|, 1): values near the surface (which set where the
        surface lies) are untouched, far-away ones cannot dominate the SDF's scale.
        Returns the threshold used.
        """
        pts = self.grid_vertices
        d = torch.cat([density_fn(pts[i : i + chunk_size]).reshape(-1).float() for i in range(0, pts.shape[0], chunk_size)])
        if threshold == "auto":
            pos = d[d > 0]
            thr = float(pos.mean()) if pos.numel() else 0.0
        else:
            thr = float(threshold)
        limit = 10.0 * max(abs(thr), 1.0) if clamp is None else float(clamp)
        sdf = (d - thr).clamp(-limit, limit)
        self.sdf.copy_(self.solid_sdf(sdf, fill_value=limit).to(self.sdf.dtype))
        self.deformation.zero_()
        return thr

    @torch.no_grad()
    def init_from_surface(self, density_fn: Callable[[Tensor], Tensor], threshold: float, chunk_size: int = 1 << 18) -> None:
        """Seed the SDF so the surface lies on {density = threshold} between lattice points
        (redistance.py): signed distances in grid spacings near the surface, +-1.5 elsewhere,
        enclosed cavities filled; the deformation is reset to zero."""
        pts = self.grid_vertices
        d = torch.cat([density_fn(pts[i : i + chunk_size]).reshape(-1).float() for i in range(0, pts.shape[0], chunk_size)])
        inside = self.solid_sdf(d - threshold, fill_value=1.0) > 0
        m = self.config.grid_resolution + 1
        inside = drop_small_solids(inside.reshape(m, m, m), self.config.seed_min_component_fraction).reshape(-1)
        sdf = redistanced_sdf(pts, self.config.grid_resolution + 1, inside, density_fn, threshold, self.spacing)
        self.sdf.copy_(sdf.to(self.sdf.dtype))
        self.deformation.zero_()

    def solid_sdf(self, sdf: Tensor | None = None, fill_value: float | None = None) -> Tensor:
        """The SDF with its enclosed cavities filled (set to fill_value, default the largest SDF):
        a density seed has hidden inner shells, and nothing trains them away (cavities.py)."""
        sdf = self.sdf.detach() if sdf is None else sdf
        m = self.config.grid_resolution + 1
        inside = (sdf > 0).reshape(m, m, m)  # tet_grid orders vertices (i m + j) m + k
        cavity = (fill_cavities(inside, DEFAULT_CLOSE_GAPS) & ~inside).reshape(-1)
        if not bool(cavity.any()):
            return sdf
        value = float(sdf.max()) if fill_value is None else float(fill_value)
        return sdf.masked_fill(cavity, value)

    def initialize_from(self, source, texture_steps: int = 200) -> dict:
        """Coarse-to-fine from a density field (a NeRF run): the surface starts where the source's
        renders put it (its surface_threshold): by default on the isosurface itself, with an SDF in
        grid spacings (seed_sdf "redistance"), else the density normalised by that threshold and
        clamped to [-1, 1]; either way the SDF learning rate means the same for every source; then, if the source has
        a colour field, the albedo is fitted to it at points on the new surface (inherited texture)."""
        threshold = float(source.surface_threshold) or "auto"
        if threshold == "auto":
            threshold = self.init_from_density(source.density, "auto")
        if self.config.seed_sdf == "redistance":
            self.init_from_surface(source.density, threshold)
        else:
            self.init_from_density(lambda p: source.density(p) / threshold, 1.0, clamp=1.0)
        done = {"threshold": threshold}
        if texture_steps > 0:
            done["texture_mse"] = self._fit_albedo(source.albedo, texture_steps)
        return done

    def _fit_albedo(self, target_fn: Callable[[Tensor], Tensor], steps: int, points_per_step: int = 1 << 14) -> float:
        with torch.no_grad():
            verts, faces = self.surface()
        if faces.shape[0] == 0:
            return float("nan")
        params = [*self.encoding.parameters(), *self.color_net.parameters()]
        optimizer = torch.optim.Adam(params, lr=1e-2, eps=1e-15)
        loss = torch.zeros(())
        for _ in range(steps):
            with torch.no_grad():
                points = sample_surface(verts, faces, points_per_step)
                target = target_fn(points)
            loss = torch.nn.functional.mse_loss(self.albedo(points), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for p in params:
            p.grad = None
        return float(loss.detach())

    # ----- appearance --------------------------------------------------------------------
    def albedo(self, points: Tensor) -> Tensor:
        """Albedo (P, 3) in [0, 1] at world points (P, 3)."""
        x = ((points / self.config.radius + 1) * 0.5).clamp(0.0, 1.0)
        return torch.sigmoid(self.color_net(self.encoding(x)))

    # ----- rendering ---------------------------------------------------------------------
    def render(self, cameras: Cameras, settings: RenderSettings) -> RenderOutput:
        c = self.config
        b, h, w = len(cameras), settings.height, settings.width
        _, dirs = pixel_rays(cameras, h, w)
        background = self.background(dirs, settings.background)
        mode, light = render_shading(settings, c.shading, cameras.position)
        verts, faces = self.surface()
        extras = {**shading_extras(mode, light, c.shading), "mesh_vertices": verts, "mesh_faces": faces, "num_faces": int(faces.shape[0])}
        want_normals = settings.need_normals or mode in ("lambertian", "textureless", "normal")
        if faces.shape[0] == 0:
            zeros = background.new_zeros(b, h, w, 1)
            normal = background.new_zeros(b, h, w, 3) if want_normals else None
            # keep the outputs attached to the parameters so backward() does not fail
            tie = self.sdf.sum() * 0
            return RenderOutput(rgb=background + tie, opacity=zeros + tie, depth=zeros, background=background, normal=normal, extras=extras)
        clip = project(verts, cameras.mvp(aspect=w / h, near=c.near, far=c.far))
        frags = rasterize(clip, faces, h, w, backend=c.rasterize_backend)
        mask = frags.mask[..., None].to(clip.dtype)
        pos = interpolate(verts, frags, faces)  # (B, H, W, 3)
        covered = frags.mask
        normal = None
        if want_normals:
            vn = vertex_normals(verts, faces)
            normal = F.normalize(interpolate(vn, frags, faces), dim=-1, eps=1e-12) * mask
        alb = pos.new_zeros(b, h, w, 3)
        if bool(covered.any()):
            alb = alb.index_put((covered,), self.albedo(pos[covered]))
        light_px = light.view(b, 1, 1, 3)
        colour = shade(alb, normal, light_px, mode, c.shading) * mask
        aa = antialias(torch.cat([colour, mask], dim=-1), frags, clip, faces)
        colour, opacity = aa[..., :3], aa[..., 3:].clamp(0.0, 1.0)
        rgb = colour + (1.0 - opacity) * background
        depth = (pos - cameras.position[:, None, None, :]).norm(dim=-1, keepdim=True) * mask
        extras["fragments"] = frags
        return RenderOutput(rgb=rgb, opacity=opacity, depth=depth, background=background, normal=normal, extras=extras)

    # ----- training hooks ----------------------------------------------------------------
    def regularizers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        w_nc = self.normal_consistency_weight(step)
        w_lap = self.laplacian_weight(step)
        if w_nc <= 0 and w_lap <= 0:
            return terms
        verts, faces = out.extras.get("mesh_vertices"), out.extras.get("mesh_faces")
        if verts is None:
            verts, faces = self.surface()
        if faces.shape[0] == 0:
            return terms
        if w_nc > 0:
            terms["normal_consistency"] = w_nc * normal_consistency(verts, faces)
        if w_lap > 0:
            terms["laplacian"] = w_lap * uniform_laplacian(verts, faces)
        return terms

    def param_groups(self) -> list[dict]:
        c = self.config
        groups = [
            {"name": "sdf", "params": [self.sdf], "lr": c.lr_sdf},
            {"name": "deformation", "params": [self.deformation], "lr": c.lr_deformation},
            {"name": "encoding", "params": list(self.encoding.parameters()), "lr": c.lr_encoding, "eps": 1e-15},
            {"name": "network", "params": list(self.color_net.parameters()), "lr": c.lr_network},
        ]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"name": "background", "params": bg, "lr": c.lr_background})
        return groups

    # ----- export ------------------------------------------------------------------------
    @torch.no_grad()
    def export_mesh(self, resolution: int = 128, target_faces: int | None = None, texture_size: int = 1024, min_component_fraction: float = 0.02, smoothing: int | None = None):
        """The current marching-tets surface with enclosed cavities filled (resolution is ignored:
        the tet grid sets it), small components removed, Taubin smoothing (`smoothing` iterations,
        None: the export default), optional decimation, xatlas unwrap, baked albedo texture and vertex
        colours. Returns (Mesh, ExportInfo); EmptySurfaceError when there is no surface."""
        from distill3d.representations.mesh.marching_cubes import EmptySurfaceError
        from distill3d.representations.mesh.texture_bake import DEFAULT_SMOOTHING_ITERATIONS, textured_mesh

        verts, faces = marching_tets(self.vertex_positions(), self.solid_sdf(), self.tets)
        if faces.shape[0] == 0:
            raise EmptySurfaceError("the DMTet SDF has no zero crossing; nothing to export")
        return textured_mesh(
            verts, faces, self.albedo, min_component_fraction=min_component_fraction, target_faces=target_faces,
            texture_size=texture_size, extras={"source": "dmtet", "grid_resolution": self.config.grid_resolution},
            smoothing=DEFAULT_SMOOTHING_ITERATIONS if smoothing is None else smoothing,
        )
