"""Backend registrations for mesh ops: op "rasterize".

- "torch" (priority 0): distill3d.representations.mesh.rasterizer.rasterize_torch, runs everywhere.
- "nvdiffrast" (priority 10): NVIDIA nvdiffrast's CUDA rasterizer (`pip install diffrp-nvdiffrast`,
  imports as `nvdiffrast`). Available only on a CUDA device when `nvdiffrast.torch` imports. Nothing
  is imported until a CUDA device asks, so a missing or broken install never breaks an import.

Both loaders return a callable `(verts_clip (B, V, 4), faces (F, 3), height, width) -> Fragments`
with the same conventions (image row 0 at the top, barycentrics weighting vertices 0, 1, 2).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from distill3d.engine.backends import register_backend


def _load_torch():
    from distill3d.representations.mesh.rasterizer import rasterize_torch

    return rasterize_torch


@lru_cache(maxsize=1)
def _nvdiffrast_import_error() -> str | None:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception as exc:  # ImportError, or a build/driver error raised at import
        return f"nvdiffrast.torch does not import ({type(exc).__name__}: {exc}); install it with `pip install diffrp-nvdiffrast`"
    return None


def _nvdiffrast_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "nvdiffrast needs a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _nvdiffrast_import_error()


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasterizer behind the torch backend's interface."""

    def __init__(self):
        import nvdiffrast.torch as dr

        self.dr = dr
        self._contexts: dict = {}

    def context(self, device: torch.device):
        key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
        if key not in self._contexts:
            self._contexts[key] = self.dr.RasterizeCudaContext(device=device)
        return self._contexts[key]

    def __call__(self, verts_clip, faces, height: int, width: int):
        from distill3d.representations.mesh.rasterizer import Fragments

        # nvdiffrast stores image row 0 at y = -1 (bottom); flipping y in clip space puts row 0 at
        # the top like the torch backend. Winding flips too, which does not matter (no culling).
        flip = torch.tensor([1.0, -1.0, 1.0, 1.0], device=verts_clip.device, dtype=torch.float32)
        pos = (verts_clip.float() * flip).contiguous()
        tri = faces.to(device=verts_clip.device, dtype=torch.int32).contiguous()
        rast, _ = self.dr.rasterize(self.context(verts_clip.device), pos, tri, (height, width), grad_db=False)
        tid = rast[..., 3].long() - 1
        mask = (tid >= 0).to(rast.dtype)
        u, v = rast[..., 0], rast[..., 1]
        bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * mask[..., None]
        depth = rast[..., 2] * mask
        return Fragments(tid, bary.to(verts_clip.dtype), depth.to(verts_clip.dtype), backend="nvdiffrast", extras={"rast": rast, "pos": pos, "tri": tri})


_NV: NvdiffrastRasterizer | None = None


def _load_nvdiffrast():
    global _NV
    if _NV is None:
        _NV = NvdiffrastRasterizer()
    return _NV


_TOPOLOGY: list = []  # (tri copy, topology hash), most recent last


def nvdiffrast_antialias(color, fragments, verts_clip, faces):
    """nvdiffrast.antialias on fragments from the nvdiffrast backend (same flipped clip positions).

    `verts_clip` must be the tensor that was rasterized: gradients reach it through the flipped
    copy the rasterizer kept.
    """
    dr = _load_nvdiffrast().dr
    rast, pos, tri = fragments.extras["rast"], fragments.extras["pos"], fragments.extras["tri"]
    topo = next((h for t, h in _TOPOLOGY if t.shape == tri.shape and t.device == tri.device and torch.equal(t, tri)), None)
    if topo is None:
        topo = dr.antialias_construct_topology_hash(tri)
        _TOPOLOGY.append((tri.clone(), topo))
        del _TOPOLOGY[:-4]
    out = dr.antialias(color.float().contiguous(), rast, pos, tri, topology_hash=topo)
    return out.to(color.dtype)


register_backend("rasterize", "torch", _load_torch, priority=0)
register_backend("rasterize", "nvdiffrast", _load_nvdiffrast, unavailable_reason=_nvdiffrast_unavailable, priority=10)
