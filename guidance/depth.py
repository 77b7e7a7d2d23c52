"""Depth for the reference view: files, a pluggable monocular estimator, and the depth/normal maths.

- `read_depth_file`: a depth map as .npy (H, W) or a grey image (8/16 bit), at the input's size.
- `estimate_depth`: transformers' `depth-estimation` pipeline (DPT, Depth Anything, ... by hub id or
  local folder). It returns relative disparity (larger = nearer). Without the model (offline, not
  cached) it is a clear error naming the model and how to get it.
- `pearson_loss`: 1 - Pearson correlation over the foreground: invariant to the unknown scale and
  shift of monocular depth (Magic123 / threestudio's relative depth loss).
- `normals_from_depth`: camera-independent world normals of the surface a ray-distance depth map
  describes; a uniform scale of the depth about the camera leaves them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras, pixel_rays
from distill3d.engine.errors import UserError

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"


class DepthInputError(UserError):
    """A depth map or depth estimator that cannot be used."""


def read_depth_file(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 depth from .npy or a grey image, resized to `shape` if its aspect matches."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DepthInputError(f"depth map {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path, allow_pickle=False)
        else:
            import imageio.v3 as iio

            depth = np.asarray(iio.imread(path, index=0))
    except Exception as exc:  # noqa: BLE001
        raise DepthInputError(f"cannot read depth map {path} ({type(exc).__name__}); give a .npy array or a grey PNG") from exc
    if depth.ndim == 3:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise DepthInputError(f"depth map {path} has shape {depth.shape}; expected (H, W)")
    depth = depth.astype(np.float32)
    if not np.isfinite(depth).all():
        raise DepthInputError(f"depth map {path} holds NaN or infinite values")
    h, w = shape
    if depth.shape != (h, w):
        if abs(depth.shape[0] / depth.shape[1] - h / w) > 0.02:
            raise DepthInputError(f"depth map {path} is {depth.shape[1]}x{depth.shape[0]} but the image is {w}x{h}; give one of the image's size")
        depth = F.interpolate(torch.from_numpy(depth)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    return depth


def estimate_depth(rgb: np.ndarray, model: str | None = None) -> np.ndarray:
    """Relative disparity (H, W) of an RGB image (H, W, 3) in [0, 1] by a transformers depth model."""
    from distill3d.guidance.priors.loading import looks_like_path, offline_mode

    model = model or DEFAULT_DEPTH_MODEL
    try:
        from PIL import Image
        from transformers import pipeline
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise DepthInputError(f"depth estimation needs transformers and Pillow: {exc}") from exc
    local = Path(model).expanduser().exists()
    if not local and looks_like_path(model):
        raise DepthInputError(f"depth model folder {model} does not exist")
    try:
        estimator = pipeline("depth-estimation", model=model, model_kwargs={"local_files_only": local or offline_mode()})
    except Exception as exc:  # noqa: BLE001 - not cached offline, no network, not a depth model
        raise DepthInputError(
            f"the depth estimator {model!r} is not available here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Download it where there is internet "
            f"(`huggingface-cli download {model} --local-dir DIR`) and use depth: estimate:DIR, or give a depth map file "
            "(depth: FILE), or leave depth out"
        ) from exc
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    result = estimator(image)
    depth = result["predicted_depth"]
    depth = torch.as_tensor(depth, dtype=torch.float32).reshape(1, 1, *depth.shape[-2:])
    h, w = rgb.shape[:2]
    return F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def pearson_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1 - Pearson correlation of prediction and target over mask (all (B, H, W, 1)); 0 when equal up
    to a positive scale and a shift, 2 when reversed."""
    m = mask.bool()
    if int(m.sum()) < 2:
        return prediction.sum() * 0.0
    p, t = prediction[m].float(), target[m].float()
    p, t = p - p.mean(), t - t.mean()
    corr = (p * t).sum() / (p.norm() * t.norm()).clamp_min(1e-8)
    return 1.0 - corr


def normals_from_depth(depth: Tensor, cameras: Cameras) -> Tensor:
    """World-space unit normals (B, H, W, 3) facing the camera, from ray-distance depth (B, H, W, 1),
    by central differences of the back-projected points (edges replicated)."""
    b, h, w, _ = depth.shape
    origins, dirs = pixel_rays(cameras, h, w)
    points = origins + dirs * depth
    pad = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    du = pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2]
    dv = pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1]
    normal = F.normalize(torch.cross(du, dv, dim=-1), dim=-1)
    facing = (normal * dirs).sum(-1, keepdim=True) > 0  # make every normal face the camera
    return torch.where(facing, -normal, normal)
