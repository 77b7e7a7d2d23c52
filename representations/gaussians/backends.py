"""Backend registrations for op "gaussian_rasterize".

- "torch" (priority 0): rasterize.rasterize_gaussians_torch, runs everywhere (the reference).
- "gsplat" (priority 10): gsplat's fused CUDA rasterizer (`pip install gsplat`). Available only
  on a CUDA device with torch.cuda.is_available(): gsplat has no CPU path, and on a machine with
  nvcc but no GPU its JIT build fails, so nothing of it is imported unless a GPU is present.

Both take (means (N, 3), quats (N, 4) w first, scales (N, 3), opacities (N,), features (N, K),
w2c (4, 4) OpenGL world-to-camera, RasterSettings) and return (features image (H, W, K),
alpha (H, W, 1), info with "means2d" ((N, 2) or (1, N, 2)) whose .grad is the densification statistic in pixels
and "radii" (N, 2) with 0 for culled Gaussians).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from distill3d.engine.backends import register_backend

# gsplat compiles kernels for these channel counts; others are padded up to the next one.
_GSPLAT_CHANNELS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)


def _load_torch():
    from distill3d.representations.gaussians.rasterize import rasterize_gaussians_torch

    return rasterize_gaussians_torch


@lru_cache(maxsize=1)
def _gsplat_import_error() -> str | None:
    try:
        import gsplat  # noqa: F401
    except Exception as exc:  # ImportError, or a build error raised at import
        return f"gsplat does not import ({type(exc).__name__}: {exc}); install it with `pip install gsplat`"
    return None


def _gsplat_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "gsplat needs a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _gsplat_import_error()


def rasterize_gaussians_gsplat(means, quats, scales, opacities, features, w2c, settings):
    """gsplat.rasterization behind the torch backend's interface (same camera and pixels)."""
    from gsplat import rasterization

    s = settings
    # OpenGL (y up, looking along -z) -> OpenCV (y down, looking along +z), as gsplat expects.
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=w2c.device, dtype=w2c.dtype))
    viewmat = (flip @ w2c)[None].float()
    K = torch.tensor([[s.focal, 0.0, s.width / 2], [0.0, s.focal, s.height / 2], [0.0, 0.0, 1.0]], device=means.device)[None]
    k = features.shape[1]
    channels = next((c for c in _GSPLAT_CHANNELS if c >= k), k)
    feats = torch.nn.functional.pad(features.float(), (0, channels - k)) if channels > k else features.float()
    image, alpha, meta = rasterization(
        means.float(), quats.float(), scales.float(), opacities.float(), feats, viewmat, K, s.width, s.height,
        near_plane=s.near, eps2d=s.eps2d, rasterize_mode="antialiased" if s.antialiased else "classic",
        packed=False, tile_size=16, sh_degree=None, render_mode="RGB",
    )
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"][0]
    if radii.dim() == 1:  # gsplat < 1.5: one radius per Gaussian
        radii = radii[:, None].expand(-1, 2)
    # "means2d" is gsplat's (1, N, 2) tensor: its .grad reshaped to (N, 2) is the statistic.
    return image[0, ..., :k], alpha[0], {"means2d": means2d, "radii": radii.int()}


def _load_gsplat():
    return rasterize_gaussians_gsplat


register_backend("gaussian_rasterize", "torch", _load_torch, priority=0)
register_backend("gaussian_rasterize", "gsplat", _load_gsplat, unavailable_reason=_gsplat_unavailable, priority=10)
