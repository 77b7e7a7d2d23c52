"""The image-to-3D input: one photo turned into the reference view the model sees.

Steps (`preprocess_image`, called by distill3d.engine.reference_view.load_reference_view):
  1. read the file (PNG, JPEG, WebP, ...; grey, grey+alpha, RGB or RGBA; 8 or 16 bit);
  2. matte it to straight-alpha RGBA (`matting`):
       alpha   the image's own alpha channel (the main path: a cut-out with a transparent background);
       border  the documented fallback for RGB photos on a plain background: the background colour is
               the median of the outermost pixel ring (which must be mostly that colour), and a pixel is
               background when it is within a small colour distance of it AND connected to the border
               (so the object's own patches of that colour stay); soft edges are un-composited;
       rembg   learned matting with the optional `rembg` package (`pip install "distill3d[matting]"`;
               its model is downloaded on first use, which fails offline with a clear message);
       auto    alpha when the image has transparent pixels, else border;
  3. optionally attach a depth map (a file, or a monocular estimate: guidance/depth.py);
  4. recentre: the bounding box of alpha > 0.5 is scaled so its longer side fills
     `foreground_fraction` of a square canvas of `size` pixels and pasted in the centre (colour and
     depth are resized premultiplied by alpha, so the background never bleeds into the edges);
     `foreground_fraction: null` keeps the image's own framing (an exact render used as input);
  5. write RUN/reference.png, the RGBA the model saw.

The reference camera and the `ReferenceView` the plugins read (ctx.reference_view) are in
distill3d.engine.reference_view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.errors import UserError

MIN_SIZE = 32
BORDER_TOLERANCE = 0.06  # colour distance (max over channels, [0, 1]) still counted as background
BORDER_SOFT = 0.06  # distances from tolerance to tolerance + soft ramp alpha 0 -> 1
BORDER_UNIFORM = 0.8  # share of the border ring that must match the background colour


class ImageInputError(UserError):
    """An input image that cannot be used; the message says why and what to give instead."""


# ---------------------------------------------------------------------------------------------
# Reading


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C in 1..4; clear errors for missing, unreadable or tiny files."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"input image {path} does not exist")
    if path.is_dir():
        raise ImageInputError(f"input image {path} is a folder; give an image file (PNG, JPEG, WebP)")
    try:
        image = np.asarray(iio.imread(path, index=0))
    except Exception as exc:  # noqa: BLE001 - any decoder error: not an image we can read
        raise ImageInputError(f"cannot read {path} as an image ({type(exc).__name__}); give a PNG, JPEG or WebP file") from exc
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.size == 0:
        raise ImageInputError(f"{path}: unsupported image shape {tuple(image.shape)}; give a grey, RGB or RGBA image")
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        image = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        image = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageInputError(f"{path}: unsupported pixel type {image.dtype}; give an 8- or 16-bit image")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIZE:
        raise ImageInputError(f"{path} is {w}x{h} pixels; the input image must be at least {MIN_SIZE} pixels on each side")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 2:  # grey + alpha
        image = np.concatenate([np.repeat(image[..., :1], 3, axis=2), image[..., 1:]], axis=2)
    return image


# ---------------------------------------------------------------------------------------------
# Matting


def has_transparency(image: np.ndarray) -> bool:
    return image.shape[2] == 4 and float(image[..., 3].min()) < 1.0 - 1e-3


def matte(image: np.ndarray, mode: str, name: str = "the input image") -> np.ndarray:
    """Straight-alpha RGBA (H, W, 4) from an RGB(A) image (see the module docstring for the modes)."""
    if mode == "auto":
        mode = "alpha" if has_transparency(image) else "border"
    if mode == "alpha":
        if not has_transparency(image):
            raise ImageInputError(
                f"{name} has no transparent pixels (matting: alpha); give an RGBA cut-out, or use matting: border "
                "(plain background) or matting: rembg (learned matting)"
            )
        return image.astype(np.float32)
    if mode == "border":
        return matte_border(image[..., :3], name)
    if mode == "rembg":
        return matte_rembg(image[..., :3], name)
    raise ImageInputError(f"unknown matting {mode!r}; use auto, alpha, border or rembg")


def _connected_to_border(candidate: Tensor) -> Tensor:
    """Pixels of the boolean mask (H, W) reachable from the image border through the mask."""
    reached = torch.zeros_like(candidate)
    reached[0], reached[-1], reached[:, 0], reached[:, -1] = candidate[0], candidate[-1], candidate[:, 0], candidate[:, -1]
    cand = candidate.float()[None, None]
    cur = reached.float()[None, None]
    while True:  # flood fill by dilation inside the candidate mask
        nxt = F.max_pool2d(cur, 3, stride=1, padding=1) * cand
        if torch.equal(nxt, cur):
            return cur[0, 0] > 0
        cur = nxt


def matte_border(rgb: np.ndarray, name: str = "the input image") -> np.ndarray:
    """Matting against a plain background: the border ring's median colour (documented fallback)."""
    img = torch.from_numpy(np.ascontiguousarray(rgb))
    ring = torch.cat([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    background = ring.median(dim=0).values
    dist = (img - background).abs().amax(-1)
    ring_dist = (ring - background).abs().amax(-1)
    if float((ring_dist <= BORDER_TOLERANCE).float().mean()) < BORDER_UNIFORM:
        raise ImageInputError(
            f"{name} has no alpha channel and its background is not a plain colour (its border varies), so it cannot "
            "be cut out automatically; give an RGBA cut-out (transparent background) or use matting: rembg"
        )
    near = dist <= BORDER_TOLERANCE + BORDER_SOFT
    region = _connected_to_border(near)
    alpha = ((dist - BORDER_TOLERANCE) / BORDER_SOFT).clamp(0, 1)
    alpha = torch.where(region, alpha, torch.ones_like(alpha))
    # Un-composite the soft edge: c = a * fg + (1 - a) * bg.
    fg = torch.where(alpha[..., None] > 1e-3, (img - (1 - alpha[..., None]) * background) / alpha[..., None].clamp_min(1e-3), img)
    return torch.cat([fg.clamp(0, 1), alpha[..., None]], -1).numpy()


def matte_rembg(rgb: np.ndarray, name: str = "the input image") -> np.ndarray:
    """Learned matting with the optional rembg package (downloads its model on first use)."""
    try:
        import rembg
    except ImportError as exc:
        raise ImageInputError(
            "matting: rembg needs the optional rembg package: pip install \"distill3d[matting]\" (or pip install rembg); "
            "or give an RGBA cut-out"
        ) from exc
    from PIL import Image

    pil = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    try:
        out = rembg.remove(pil)
    except Exception as exc:  # noqa: BLE001 - its model download (network) or onnxruntime
        raise ImageInputError(
            f"rembg could not cut out {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "On first use rembg downloads its matting model (u2net.onnx into ~/.u2net, or $U2NET_HOME), which fails "
            "offline: download it on a machine with internet and copy it there, or give an RGBA cut-out"
        ) from exc
    rgba = np.asarray(out.convert("RGBA") if hasattr(out, "convert") else out).astype(np.float32) / 255.0
    if rgba.shape[:2] != rgb.shape[:2] or rgba.shape[2] != 4:
        raise ImageInputError(f"rembg returned an image of shape {rgba.shape} for {name}; expected RGBA of its size")
    return rgba


# ---------------------------------------------------------------------------------------------
# Recentring


def _resize_premultiplied(values: Tensor, alpha: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Resize (H, W, C) straight values with their alpha (H, W, 1), premultiplied; returns
    (values, alpha, premultiplied values) at (height, width)."""
    stack = torch.cat([values * alpha, alpha], -1).permute(2, 0, 1)[None]
    if tuple(stack.shape[-2:]) != (height, width):
        stack = F.interpolate(stack, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    stack = stack[0].permute(1, 2, 0)
    a = stack[..., -1:].clamp(0, 1)
    pre = stack[..., :-1]
    straight = torch.where(a > 1e-6, pre / a.clamp_min(1e-6), torch.zeros_like(pre))
    return straight, a, pre


def foreground_box(alpha: Tensor, name: str = "the input image") -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of alpha > 0.5; errors for none or a full-frame one."""
    mask = alpha > 0.5
    if not bool(mask.any()):
        raise ImageInputError(f"{name} has no foreground: every pixel is background after matting; check the image or its alpha")
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    h, w = mask.shape
    if top == 0 and left == 0 and bottom == h - 1 and right == w - 1:
        raise ImageInputError(
            f"the foreground of {name} touches every border of the image: the object is cropped or the background was "
            "not found; give a photo with some margin around the object, or an RGBA cut-out"
        )
    return top, bottom, left, right


def recentre(values: Tensor, alpha: Tensor, size: int, fraction: float | None, name: str = "the input image") -> tuple[Tensor, Tensor]:
    """Values (H, W, C) and alpha (H, W, 1) on a size x size canvas with the object's longer side at
    fraction * size, centred; fraction None pads the image to a square (framing kept)."""
    top, bottom, left, right = foreground_box(alpha[..., 0], name)
    h, w = alpha.shape[:2]
    if fraction is None:
        side = max(h, w)
        canvas_v = torch.zeros(side, side, values.shape[-1])
        canvas_a = torch.zeros(side, side, 1)
        oy, ox = (side - h) // 2, (side - w) // 2
        canvas_v[oy : oy + h, ox : ox + w], canvas_a[oy : oy + h, ox : ox + w] = values, alpha
        v, a, _ = _resize_premultiplied(canvas_v, canvas_a, size, size)
        return v, a
    crop_v, crop_a = values[top : bottom + 1, left : right + 1], alpha[top : bottom + 1, left : right + 1]
    ch, cw = crop_a.shape[:2]
    scale = fraction * size / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    _, a, pre = _resize_premultiplied(crop_v, crop_a, nh, nw)
    canvas_pre = torch.zeros(size, size, values.shape[-1])
    canvas_a = torch.zeros(size, size, 1)
    oy, ox = (size - nh) // 2, (size - nw) // 2
    canvas_pre[oy : oy + nh, ox : ox + nw], canvas_a[oy : oy + nh, ox : ox + nw] = pre, a
    straight = torch.where(canvas_a > 1e-6, canvas_pre / canvas_a.clamp_min(1e-6), torch.zeros_like(canvas_pre))
    return straight.clamp_min(0), canvas_a


# ---------------------------------------------------------------------------------------------
# The reference view


def _load_depth(spec: str, image: np.ndarray, config_dir: Path | None) -> np.ndarray:
    """(H, W) depth (larger = farther) at the image's size from a depth spec (see ReferenceViewConfig)."""
    from distill3d.guidance.depth import estimate_depth, read_depth_file

    if spec == "estimate" or spec.startswith("estimate:"):
        model = spec.split(":", 1)[1] if ":" in spec else None
        rgba = image if image.shape[2] == 4 else np.concatenate([image, np.ones_like(image[..., :1])], -1)
        over_white = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        return disparity_to_depth(estimate_depth(over_white, model))
    disparity = spec.startswith("disparity:")
    path = Path(spec.split(":", 1)[1] if disparity else spec)
    depth = read_depth_file(path, image.shape[:2])
    return disparity_to_depth(depth) if disparity else depth


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """Depth up to scale from a disparity map (larger = nearer), as 1 / disparity. Monocular
    disparity also has an unknown shift, so this is an approximation; the Pearson depth loss only
    needs the ordering and near-affinity, the normal term is approximate with it."""
    top = float(np.max(disparity))
    if not top > 0:
        raise ImageInputError("the disparity map has no positive values; check the file (larger must mean nearer)")
    return 1.0 / np.maximum(disparity, 1e-3 * top)


def preprocess_image(
    path: Path, size: int, fraction: float | None = 0.8, matting: str = "auto", depth: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """(rgba (size, size, 4) straight alpha, depth (size, size) or None): read, matte, attach the
    depth map (which follows the same crop and scale), recentre (see the module docstring)."""
    path = Path(path).expanduser()
    name = str(path)
    image = read_image(path)
    rgba = matte(image, matting, name)
    values = torch.from_numpy(np.ascontiguousarray(rgba[..., :3]))
    alpha = torch.from_numpy(np.ascontiguousarray(rgba[..., 3:]))
    if depth:
        depth_map = torch.from_numpy(np.ascontiguousarray(_load_depth(depth, image, path.parent), dtype=np.float32))
        values = torch.cat([values, depth_map[..., None]], -1)
    values, alpha = recentre(values, alpha, size, fraction, name)
    out = torch.cat([values[..., :3].clamp(0, 1), alpha], -1).float()
    return out, (values[..., 3].float() if depth else None)


def resize_depth(depth: Tensor, alpha: Tensor, size: int) -> Tensor:
    """(1, size, size, 1) depth (H, W) resized like the colour (premultiplied by alpha (H, W))."""
    resized, _, _ = _resize_premultiplied(depth[..., None], alpha[..., None], size, size)
    return resized[None]


def save_rgba(rgba: Tensor, path: Path) -> Path:
    """RGBA (H, W, 4) in [0, 1] as an 8-bit PNG, written atomically."""
    import imageio.v3 as iio

    from distill3d.engine.checkpoint import atomic_path

    data = (rgba.detach().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    with atomic_path(Path(path)) as tmp:
        iio.imwrite(tmp, data)
    return Path(path)
