"""Building blocks the representations share: the hash-grid field settings and its encoder, and
the small MLP. NeRF (density + colour) and DMTet (colour) compose these instead of each copying
them; Gaussians use background.py and shading.py the same way."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill3d.representations.nerf.hash_encoding import HashEncoding, HashEncodingConfig, per_level_scale_for


@dataclass
class HashGridSettings:
    """Multiresolution hash encoding (Instant-NGP defaults: 16 levels x 2, 2^19, 16 -> 2048)."""

    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    hash_encoding_backend: str = "auto"  # auto | torch | triton | tcnn (see `distill3d doctor`)


def hash_grid(settings: HashGridSettings) -> HashEncoding:
    """The encoder for positions normalised to [0, 1]^3."""
    enc = HashEncodingConfig(
        levels=settings.levels,
        features=settings.features_per_level,
        log2_table_size=settings.log2_table_size,
        base_resolution=settings.base_resolution,
        per_level_scale=per_level_scale_for(settings.base_resolution, settings.max_resolution, settings.levels),
    )
    return HashEncoding(enc, backend=settings.hash_encoding_backend)


def mlp(in_dim: int, hidden: int, hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)
