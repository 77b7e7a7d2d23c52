"""Pure-torch 3D Gaussian rasterizer: the reference backend of the "gaussian_rasterize" op.

Projection (EWA splatting): each Gaussian's 3D covariance R S S^T R^T is carried into the camera
and through the Jacobian J of the perspective projection at its mean, giving a 2D covariance
J W Sigma W^T J^T; 0.3 px^2 is added on the diagonal (the usual dilation, so no splat is thinner
than a pixel). "Antialiased" mode (as gsplat's) also scales the opacity by
sqrt(det(cov) / det(cov + 0.3 I)) so that small splats do not get brighter when dilated.

Rasterization: the image is cut into square tiles; each Gaussian is listed in every tile its
footprint reaches (the ellipse where its alpha is at least 1/255, so nothing visible is cut),
sorted by depth. Per tile the work is dense: for the tile's P pixels and its G Gaussians,
alpha (P, G) = min(0.99, o exp(power)), power being a quadratic polynomial of the pixel position,
so one (P, 6) x (6, G) matmul gives every power at once. Transmittance is an exclusive cumulative
sum in log space, T = exp(sum_{j<i} log(1 - alpha_j)), weights w = alpha T, and the outputs are one
(P, G) x (G, K) matmul over per-Gaussian features (colour, 1 for opacity, depth, normal).
Tiles with similar Gaussian counts are batched, and each batch walks its depth-sorted list in
chunks, front to back, stopping when every pixel's transmittance is below 1e-4 (early
termination).

The backward pass is written by hand (GaussianRasterizeFunction): it walks the same chunks back
to front, recomputing alpha and T from the saved per-chunk transmittance (no (P, G) tensor is
stored), with dL/dalpha_i = T_i (f_i . g) - (sum_{j>i} w_j f_j . g) / (1 - alpha_i). Gradients of
the powers reduce to 6 pixel moments per Gaussian (another small matmul), from which the
gradients of the 2D means and conics follow in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4


@dataclass
class RasterSettings:
    height: int
    width: int
    focal: float  # pixels (square pixels, principal point at the image centre)
    near: float = 0.01
    eps2d: float = 0.3
    antialiased: bool = False
    tile_size: int = 8
    chunk_elements: int = 1 << 19  # pixels x Gaussians per dense chunk
    saved_elements: int = 1 << 23  # keep alpha and T for backward up to this many pixel-Gaussian pairs


# ----- geometry -------------------------------------------------------------------------------
def quat_to_rotmat(quats: Tensor) -> Tensor:
    """(N, 4) quaternions (w, x, y, z), normalised here -> (N, 3, 3) rotation matrices."""
    q = torch.nn.functional.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).view(-1, 3, 3)


def covariance_3d(scales: Tensor, quats: Tensor) -> Tensor:
    """Sigma = R S S^T R^T (N, 3, 3) from activated scales (N, 3) and quaternions (N, 4)."""
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(1, 2)


@dataclass
class Projected:
    means2d: Tensor  # (N, 2) pixel coordinates (u right, v down; pixel centres at +0.5)
    conics: Tensor  # (N, 3) inverse 2D covariance (a, b, c): power = -a dx^2/2 - b dx dy - c dy^2/2
    opacities: Tensor  # (N,) after the antialiasing compensation (if any)
    depths: Tensor  # (N,) camera-space depth, positive in front
    radii: Tensor  # (N, 2) int32 half extents in pixels of the alpha >= 1/255 footprint; 0: culled


def project(means: Tensor, cov3d: Tensor, opacities: Tensor, w2c: Tensor, s: RasterSettings) -> Projected:
    """EWA projection into an OpenGL-style camera (looks along -z, y up) w2c (4, 4)."""
    R, t = w2c[:3, :3], w2c[:3, 3]
    p = means @ R.T + t
    depth = -p[:, 2]
    d = depth.clamp_min(1e-6)
    f = s.focal
    u = s.width / 2 + f * p[:, 0] / d
    v = s.height / 2 - f * p[:, 1] / d
    # The Jacobian is taken at a position clamped just outside the view (as 3DGS): off-screen
    # Gaussians near the camera plane would otherwise get huge, unstable footprints.
    lim_x = 1.3 * (s.width / 2) / f
    lim_y = 1.3 * (s.height / 2) / f
    tx = (p[:, 0] / d).clamp(-lim_x, lim_x)
    ty = (p[:, 1] / d).clamp(-lim_y, lim_y)
    zeros = torch.zeros_like(d)
    J = torch.stack([f / d, zeros, f * tx / d, zeros, -f / d, -f * ty / d], -1).view(-1, 2, 3)
    M = J @ R
    cov = M @ cov3d @ M.transpose(1, 2)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    det0 = a * c - b * b
    a, c = a + s.eps2d, c + s.eps2d
    det = (a * c - b * b).clamp_min(1e-12)
    if s.antialiased:
        opacities = opacities * (det0.clamp_min(0) / det).sqrt()
    conics = torch.stack([c / det, -b / det, a / det], -1)
    with torch.no_grad():
        op = opacities.detach()
        # Mahalanobis radius where alpha = op * exp(-r^2 / 2) reaches 1/255.
        extend = (2 * torch.log((op / ALPHA_MIN).clamp_min(1.0))).sqrt()
        rx = torch.ceil(extend * a.detach().sqrt())
        ry = torch.ceil(extend * c.detach().sqrt())
        ud, vd = u.detach(), v.detach()
        visible = (depth.detach() > s.near) & (op >= ALPHA_MIN) & (rx > 0)
        visible &= (ud + rx > 0) & (ud - rx < s.width) & (vd + ry > 0) & (vd - ry < s.height)
        radii = torch.stack([rx, ry], -1).where(visible[:, None], torch.zeros_like(rx)[:, None]).to(torch.int32)
    return Projected(torch.stack([u, v], -1), conics, opacities, depth, radii)


# ----- tiles ----------------------------------------------------------------------------------
@dataclass
class TileBatch:
    tiles: Tensor  # (B,) tile ids
    gaussians: Tensor  # (B, G) Gaussian ids sorted front to back, padded with N (a dummy row)
    origins: Tensor  # (B, 2) pixel position of each tile's centre


@dataclass
class TilePlan:
    tiles_x: int
    tiles_y: int
    batches: list[TileBatch]
    pixels: Tensor  # (P, 6) [1, x, y, x^2, x y, y^2] of the tile's pixel centres relative to its centre
    n_pairs: int


def plan_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, s: RasterSettings) -> TilePlan:
    """Depth-sorted Gaussian lists per tile, grouped into batches of tiles with similar counts."""
    ts = s.tile_size
    nx, ny = math.ceil(s.width / ts), math.ceil(s.height / ts)
    dev = means2d.device
    n = means2d.shape[0]
    lin = torch.arange(ts, dtype=torch.float32, device=dev) + 0.5 - ts / 2
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    x, y = xx.reshape(-1), yy.reshape(-1)
    pixels = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], -1)
    with torch.no_grad():
        vis = (radii[:, 0] > 0).nonzero().squeeze(1)
        vis = vis[torch.argsort(depths[vis], stable=True)]
        m, r = means2d[vis], radii[vis].float()
        x0 = ((m[:, 0] - r[:, 0]) / ts).floor().clamp(0, nx - 1).long()
        x1 = ((m[:, 0] + r[:, 0]) / ts).floor().clamp(0, nx - 1).long()
        y0 = ((m[:, 1] - r[:, 1]) / ts).floor().clamp(0, ny - 1).long()
        y1 = ((m[:, 1] + r[:, 1]) / ts).floor().clamp(0, ny - 1).long()
        wx, wy = x1 - x0 + 1, y1 - y0 + 1
        counts = wx * wy
        total = int(counts.sum())
        owner = torch.repeat_interleave(torch.arange(vis.shape[0], device=dev), counts)
        local = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tx = x0[owner] + local % wx[owner]
        ty = y0[owner] + local // wx[owner]
        tile_of_pair = ty * nx + tx
        order = torch.sort(tile_of_pair, stable=True).indices  # pairs already in depth order
        tile_sorted = tile_of_pair[order]
        gauss_sorted = vis[owner[order]]
        per_tile = torch.bincount(tile_sorted, minlength=nx * ny)
        starts = torch.cumsum(per_tile, 0) - per_tile
        nonempty = (per_tile > 0).nonzero().squeeze(1)
        nonempty = nonempty[torch.argsort(per_tile[nonempty], descending=True, stable=True)]
        counts_list = per_tile[nonempty].tolist()
    batches = []
    i = 0
    P = ts * ts
    while i < len(counts_list):
        top = counts_list[i]
        j = i + 1
        # Tiles whose counts are within a factor 2 of the batch's largest share one padded batch.
        max_tiles = max(1, s.chunk_elements // (P * min(top, 256)))
        while j < len(counts_list) and counts_list[j] * 2 >= top and j - i < max_tiles:
            j += 1
        tiles = nonempty[i:j]
        g = torch.arange(top, device=dev)
        valid = g[None, :] < per_tile[tiles][:, None]
        ids = torch.where(valid, gauss_sorted[(starts[tiles][:, None] + g[None, :]).clamp_max(max(total - 1, 0))], torch.full_like(g, n)[None])
        origins = torch.stack([(tiles % nx).float() * ts + ts / 2, (tiles // nx).float() * ts + ts / 2], -1)
        batches.append(TileBatch(tiles, ids, origins))
        i = j
    return TilePlan(nx, ny, batches, pixels, total)


# ----- dense per-batch compositing -------------------------------------------------------------
def _coefficients(means_local: Tensor, conics: Tensor) -> Tensor:
    """(B, G, 6) coefficients of power = coef . [1, x, y, x^2, x y, y^2]."""
    mx, my = means_local.unbind(-1)
    a, b, c = conics.unbind(-1)
    return torch.stack(
        [-0.5 * a * mx * mx - b * mx * my - 0.5 * c * my * my, a * mx + b * my, c * my + b * mx, -0.5 * a, -b, -0.5 * c], -1
    )


POWER_MIN = -20.0  # o exp(power) < 1/255 for any o <= 1 below this: such alphas are cut to 0 anyway


def _chunk_alpha(pixels: Tensor, coef_t: Tensor, op: Tensor) -> Tensor:
    """alpha (B, P, g) of one chunk: o exp(power), clamped to 0.99, zero below 1/255. Powers are
    clamped at POWER_MIN first (same result): exp of large negative numbers takes a slow path
    on CPU (about 15x slower), and most pixel-Gaussian pairs of a tile are far out."""
    raw = op[:, None, :] * torch.matmul(pixels, coef_t).clamp_min_(POWER_MIN).exp_()
    return torch.where(raw < ALPHA_MIN, torch.zeros_like(raw), raw.clamp_max(ALPHA_MAX))


def _chunk_transmittance(alpha: Tensor, t_start: Tensor) -> tuple[Tensor, Tensor]:
    """Exclusive transmittance T (B, P, g) within a chunk entered with t_start (B, P), and the
    transmittance after the chunk."""
    keep = 1.0 - alpha
    inclusive = torch.cumprod(keep, -1)
    t_next = t_start * inclusive[..., -1]
    return inclusive.mul_(t_start[..., None]).div_(keep), t_next


class GaussianRasterizeFunction(torch.autograd.Function):
    """Differentiable tile compositing of projected Gaussians (hand-written backward)."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, plan: TilePlan, settings: RasterSettings):
        n, k = features.shape
        ts = settings.tile_size
        P = ts * ts
        pad = lambda t, v: torch.cat([t, t.new_full((1, *t.shape[1:]), v)])  # noqa: E731
        m_pad, c_pad, o_pad, f_pad = pad(means2d, 0.0), pad(conics, 1.0), pad(opacities, 0.0), pad(features, 0.0)
        out_tiles = features.new_zeros(plan.tiles_x * plan.tiles_y, P, k)
        # Keep alpha and T for the backward pass when they are small; recompute them otherwise.
        keep_chunks = torch.is_grad_enabled() or any(t.requires_grad for t in (means2d, conics, opacities, features))
        keep_chunks = keep_chunks and plan.n_pairs * P <= settings.saved_elements
        saved = []
        for batch in plan.batches:
            ids = batch.gaussians
            coef_t = _coefficients(m_pad[ids] - batch.origins[:, None, :], c_pad[ids]).transpose(1, 2)
            op, feats = o_pad[ids], f_pad[ids]
            B, G = ids.shape
            chunk = max(1, settings.chunk_elements // (B * P))
            t_run = features.new_ones(B, P)
            acc = features.new_zeros(B, P, k)
            chunks = []
            for c0 in range(0, G, chunk):
                c1 = min(c0 + chunk, G)
                alpha = _chunk_alpha(plan.pixels, coef_t[:, :, c0:c1], op[:, c0:c1])
                T, t_next = _chunk_transmittance(alpha, t_run)
                acc.baddbmm_(alpha * T, feats[:, c0:c1])
                chunks.append((t_run, alpha, T) if keep_chunks else (t_run, None, None))
                t_run = t_next
                if c1 < G and bool((t_run < T_MIN).all()):
                    break
            out_tiles[batch.tiles] = acc
            saved.append((chunk, chunks))
        ctx.plan, ctx.settings, ctx.saved_chunks = plan, settings, saved
        ctx.save_for_backward(means2d, conics, opacities, features)
        return _untile(out_tiles, plan, settings)

    @staticmethod
    def backward(ctx, grad_image: Tensor):
        means2d, conics, opacities, features = ctx.saved_tensors
        plan, settings = ctx.plan, ctx.settings
        n, k = features.shape
        pad = lambda t, v: torch.cat([t, t.new_full((1, *t.shape[1:]), v)])  # noqa: E731
        m_pad, c_pad, o_pad, f_pad = pad(means2d, 0.0), pad(conics, 1.0), pad(opacities, 0.0), pad(features, 0.0)
        g_tiles = _tile(grad_image.contiguous(), plan, settings)
        g_means = means2d.new_zeros(n + 1, 2)
        g_conics = conics.new_zeros(n + 1, 3)
        g_op = opacities.new_zeros(n + 1)
        g_feat = features.new_zeros(n + 1, k)
        pixels = plan.pixels
        for batch, (chunk, chunks) in zip(plan.batches, ctx.saved_chunks):
            ids = batch.gaussians
            means_local = m_pad[ids] - batch.origins[:, None, :]
            con = c_pad[ids]
            coef_t = _coefficients(means_local, con).transpose(1, 2)
            op, feats = o_pad[ids], f_pad[ids]
            gout = g_tiles[batch.tiles]  # (B, P, k)
            B, G = ids.shape
            carry = features.new_zeros(B, gout.shape[1])
            g_coef = features.new_zeros(B, G, 6)
            g_op_b = features.new_zeros(B, G)
            g_feat_b = features.new_zeros(B, G, k)
            for ci in reversed(range(len(chunks))):
                c0, c1 = ci * chunk, min((ci + 1) * chunk, G)
                t_start, alpha, T = chunks[ci]
                if alpha is None:
                    alpha = _chunk_alpha(pixels, coef_t[:, :, c0:c1], op[:, c0:c1])
                    T, _ = _chunk_transmittance(alpha, t_start)
                w = alpha * T
                g_feat_b[:, c0:c1] = torch.bmm(w.transpose(1, 2), gout)
                s = torch.bmm(gout, feats[:, c0:c1].transpose(1, 2))  # (B, P, g): f_i . dL/dout
                ws = w.mul_(s)
                csw = torch.cumsum(ws, -1)
                carry = carry + csw[..., -1]
                # dL/dalpha_i = T_i s_i - (sum_{j>i} w_j s_j) / (1 - alpha_i)
                after = csw.neg_().add_(carry[..., None])
                d_alpha = s.mul_(T).sub_(after.div_(1.0 - alpha))
                d_alpha.masked_fill_(alpha >= ALPHA_MAX, 0.0)  # clamped: no gradient to o or power
                g_power = d_alpha.mul_(alpha)  # alpha = o exp(power) where it is not clamped (or 0)
                g_op_b[:, c0:c1] = g_power.sum(1) / op[:, c0:c1].clamp_min(1e-20)  # padding has o = 0
                g_coef[:, c0:c1] = torch.matmul(g_power.transpose(1, 2), pixels)
            # coef -> local means and conics (closed form of _coefficients' derivative)
            mx, my = means_local.unbind(-1)
            a, b, c = con.unbind(-1)
            M0, M1, M2, M3, M4, M5 = g_coef.unbind(-1)
            gmx = M0 * (-a * mx - b * my) + M1 * a + M2 * b
            gmy = M0 * (-b * mx - c * my) + M1 * b + M2 * c
            ga = -0.5 * M0 * mx * mx + M1 * mx - 0.5 * M3
            gb = -M0 * mx * my + M1 * my + M2 * mx - M4
            gc = -0.5 * M0 * my * my + M2 * my - 0.5 * M5
            flat = ids.reshape(-1)
            g_means.index_add_(0, flat, torch.stack([gmx, gmy], -1).reshape(-1, 2))
            g_conics.index_add_(0, flat, torch.stack([ga, gb, gc], -1).reshape(-1, 3))
            g_op.index_add_(0, flat, g_op_b.reshape(-1))
            g_feat.index_add_(0, flat, g_feat_b.reshape(-1, k))
        return g_means[:n], g_conics[:n], g_op[:n], g_feat[:n], None, None


def _untile(tiles: Tensor, plan: TilePlan, s: RasterSettings) -> Tensor:
    """(tiles, P, K) -> (H, W, K)."""
    ts, k = s.tile_size, tiles.shape[-1]
    img = tiles.view(plan.tiles_y, plan.tiles_x, ts, ts, k).permute(0, 2, 1, 3, 4).reshape(plan.tiles_y * ts, plan.tiles_x * ts, k)
    return img[: s.height, : s.width]


def _tile(image: Tensor, plan: TilePlan, s: RasterSettings) -> Tensor:
    """(H, W, K) -> (tiles, P, K), zero-padded to whole tiles."""
    ts, k = s.tile_size, image.shape[-1]
    full = image.new_zeros(plan.tiles_y * ts, plan.tiles_x * ts, k)
    full[: s.height, : s.width] = image
    return full.view(plan.tiles_y, ts, plan.tiles_x, ts, k).permute(0, 2, 1, 3, 4).reshape(plan.tiles_y * plan.tiles_x, ts * ts, k)


def rasterize_gaussians_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    w2c: Tensor,
    settings: RasterSettings,
) -> tuple[Tensor, Tensor, dict]:
    """Render one view. means (N, 3), quats (N, 4) (w, x, y, z), scales (N, 3) activated,
    opacities (N,) in [0, 1], features (N, K) composited per pixel (colour, depth, normal, ...),
    w2c (4, 4) OpenGL world-to-camera. Returns (features image (H, W, K), alpha (H, W, 1),
    info {"means2d": (N, 2) screen positions (their .grad is the densification statistic),
    "radii": (N, 2) int pixel half extents, 0 for culled Gaussians})."""
    proj = project(means, covariance_3d(scales, quats), opacities, w2c, settings)
    plan = plan_tiles(proj.means2d.detach(), proj.radii, proj.depths.detach(), settings)
    ones = torch.ones_like(features[:, :1])
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    image = GaussianRasterizeFunction.apply(means2d, proj.conics, proj.opacities, torch.cat([features, ones], -1), plan, settings)
    return image[..., :-1], image[..., -1:], {"means2d": means2d, "radii": proj.radii, "pairs": plan.n_pairs}
