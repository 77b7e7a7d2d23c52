"""Multiresolution hash encoding (Instant-NGP), pure-torch reference backend.

Parameter layout (shared by every backend so checkpoints move between them): one table
`embeddings` of shape (levels * table_size, features); level l owns rows
[l * table_size, (l + 1) * table_size). Level l has resolution
floor(base_resolution * per_level_scale ** l); a level whose (res + 1)^3 grid fits in the table is
indexed densely (x + y (res+1) + z (res+1)^2), others by the spatial hash
(x * 1) xor (y * 2654435761) xor (z * 805459861) mod table_size. Inputs are in [0, 1]^3, corners
at integer multiples of 1/res, trilinear interpolation.

Speed on CPU comes from: int32 index arithmetic, corner indices built from per-axis terms (two
adds or xors per corner instead of a full hash), and one fused gather + weighted sum through
F.embedding_bag, whose backward is a single scatter into the table for all levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)


def _as_int32(value: int) -> int:
    """The two's-complement int32 whose low 32 bits equal value (uint32 wraparound semantics)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


PRIMES_I32 = tuple(_as_int32(p) for p in PRIMES)


@dataclass
class HashEncodingConfig:
    levels: int = 16
    features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4472692374403782  # 16 levels from 16 to 2048
    init_std: float = 1e-4


def level_resolutions(config: HashEncodingConfig) -> list[int]:
    return [int(math.floor(config.base_resolution * config.per_level_scale**level)) for level in range(config.levels)]


def per_level_scale_for(base_resolution: int, max_resolution: int, levels: int) -> float:
    """The per-level growth factor that takes base_resolution to max_resolution in `levels` levels."""
    if levels <= 1:
        return 1.0
    return math.exp((math.log(max_resolution) - math.log(base_resolution)) / (levels - 1))


def _level_tables(config: HashEncodingConfig, device) -> dict:
    """Per-level constants, grouped into densely indexed and hashed levels."""
    table_size = 1 << config.log2_table_size
    resolutions = level_resolutions(config)
    dense = [l for l, r in enumerate(resolutions) if (r + 1) ** 3 <= table_size]
    hashed = [l for l, r in enumerate(resolutions) if (r + 1) ** 3 > table_size]
    groups = {}
    for name, levels in (("dense", dense), ("hashed", hashed)):
        if not levels:
            continue
        res = torch.tensor([resolutions[l] for l in levels], dtype=torch.float32, device=device)
        if name == "dense":
            r1 = torch.tensor([resolutions[l] + 1 for l in levels], dtype=torch.int32, device=device)
            mult = torch.stack([torch.ones_like(r1), r1, r1 * r1], -1).long()  # (G, 3)
        else:
            mult = torch.tensor([PRIMES] * len(levels), dtype=torch.int64, device=device)
        offset = torch.tensor([l * table_size for l in levels], dtype=torch.int64, device=device)
        groups[name] = (levels, res, mult, offset)
    return groups


def corner_indices(x: Tensor, config: HashEncodingConfig) -> tuple[Tensor, Tensor]:
    """Table rows and trilinear weights of the 8 corners at every level, level-major.

    x: (N, 3) in [0, 1]. Returns idx (L, N, 8) int64 rows into the flat table and w (L, N, 8).
    Corner k has offsets (k & 1, (k >> 1) & 1, (k >> 2) & 1) along x, y, z. Level-major order
    keeps the backward scatter inside one level's slice of the table at a time (cache-friendly).
    """
    table_size = 1 << config.log2_table_size
    n = x.shape[0]
    idx_groups, w_groups = [], []
    x = x.clamp(0.0, 1.0)
    # Dense levels are the coarse ones, so the two groups are consecutive ranges of levels.
    for name, (levels, res, mult, offset) in _level_tables(config, x.device).items():
        g = len(levels)
        pos = x[None] * res[:, None, None]  # (G, N, 3)
        cell = torch.minimum(pos.floor(), (res - 1)[:, None, None])
        frac = pos - cell
        # int64 products keep the low bits of Instant-NGP's uint32 hash exactly.
        term = cell.long() * mult[:, None, :]  # (G, N, 3)
        # Per-axis terms for offset 0 and 1; corners combine one term per axis.
        ax = torch.stack([term[..., 0], term[..., 0] + mult[:, None, 0]], -1)  # (G, N, 2)
        ay = torch.stack([term[..., 1], term[..., 1] + mult[:, None, 1]], -1)
        az = torch.stack([term[..., 2], term[..., 2] + mult[:, None, 2]], -1)
        if name == "dense":
            corner = ax[..., None, None, :] + ay[..., None, :, None] + az[..., :, None, None]
        else:
            corner = (ax[..., None, None, :] ^ ay[..., None, :, None] ^ az[..., :, None, None]) & (table_size - 1)
        corner = corner.reshape(g, n, 8) + offset[:, None, None]
        fx = torch.stack([1 - frac[..., 0], frac[..., 0]], -1)
        fy = torch.stack([1 - frac[..., 1], frac[..., 1]], -1)
        fz = torch.stack([1 - frac[..., 2], frac[..., 2]], -1)
        weight = (fx[..., None, None, :] * fy[..., None, :, None] * fz[..., :, None, None]).reshape(g, n, 8)
        idx_groups.append(corner)
        w_groups.append(weight)
    if len(idx_groups) == 1:
        return idx_groups[0], w_groups[0]
    return torch.cat(idx_groups), torch.cat(w_groups)


class _HashGather(torch.autograd.Function):
    """Weighted gather of table rows with a scatter backward (table gradient only)."""

    @staticmethod
    def forward(ctx, embeddings: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        levels, n, _ = idx.shape
        out = F.embedding_bag(idx.reshape(levels * n, 8), embeddings, per_sample_weights=w.reshape(levels * n, 8), mode="sum")
        ctx.save_for_backward(idx, w)
        ctx.table_shape = embeddings.shape
        return out.view(levels, n, -1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        idx, w = ctx.saved_tensors
        grad_table = torch.zeros(ctx.table_shape, dtype=grad_out.dtype, device=grad_out.device)
        src = (w[..., None] * grad_out[:, :, None, :]).reshape(-1, ctx.table_shape[1])
        grad_table.index_add_(0, idx.reshape(-1), src)
        return grad_table, None, None


def hash_encode_torch(x: Tensor, embeddings: Tensor, config: HashEncodingConfig) -> Tensor:
    """Reference encoding: (N, 3) in [0, 1] -> (N, levels * features), level-major features.

    Differentiable w.r.t. the table and, when x requires grad (analytic normals), w.r.t. x
    through the trilinear weights.
    """
    n = x.shape[0]
    if x.requires_grad:
        idx, w = corner_indices(x, config)
        out = F.embedding_bag(idx.reshape(-1, 8), embeddings, per_sample_weights=w.reshape(-1, 8), mode="sum")
        out = out.view(config.levels, n, config.features)
    else:
        with torch.no_grad():
            idx, w = corner_indices(x, config)
        out = _HashGather.apply(embeddings, idx, w)
    return out.permute(1, 0, 2).reshape(n, config.levels * config.features)


class HashEncoding(nn.Module):
    """The hash-grid encoding module; `backend` picks the kernel (see distill3d.engine.backends)."""

    def __init__(self, config: HashEncodingConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        table = (1 << config.log2_table_size) * config.levels
        self.embeddings = nn.Parameter(torch.empty(table, config.features).uniform_(-config.init_std, config.init_std))
        self.backend = backend

    @property
    def output_dim(self) -> int:
        return self.config.levels * self.config.features

    def forward(self, x: Tensor) -> Tensor:
        from distill3d.engine.backends import resolve_op

        encode = resolve_op("hash_encoding", self.backend, x.device)
        return encode(x, self.embeddings, self.config)
