"""Solid interiors: fill the cavities of an occupancy grid before extracting a surface.

A NeRF (and a DMTet seeded from it) is only ever supervised where rays stop, on the visible
surface; inside the object its density is free to drop below the surface threshold. Meshing that
field then gives, besides the outer surface, large closed inner shells that no camera sees: the
renders are right but the exported mesh has two or three times the reference's area, and its
geometry (Chamfer distance, volume, anything a DCC tool computes) is wrong. Every region that
cannot be reached from the grid's border without crossing the object is interior; it is filled.

Such a field's shell is also porous at the grid's scale: pores one or two cells wide join the
inner shells to the outside. `close_gaps=k` treats openings up to about 2k cells wide as closed
when deciding what is outside (the outside is found on the object dilated by k cells, then grown
back by k cells into the free space), so those labyrinths are filled too; concave features
narrower than that are filled as well, which at one cell is below what the grid resolves anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fill_cavities", "outside_region", "DEFAULT_CLOSE_GAPS"]

# What exports use: closes one-cell pores, well below the features a 64-256 grid resolves.
DEFAULT_CLOSE_GAPS = 1


def outside_region(inside: Tensor) -> Tensor:
    """The cells of a (X, Y, Z) bool grid connected to the border through non-inside cells
    (6-connectivity, so a diagonal gap in a wall does not count as an opening)."""
    if inside.dim() != 3:
        raise ValueError(f"occupancy grid must be 3D, got shape {tuple(inside.shape)}")
    free = ~inside.bool()
    reach = torch.zeros_like(free)
    for dim in range(3):
        for index in (0, free.shape[dim] - 1):
            reach.select(dim, index).copy_(free.select(dim, index))
    while True:
        grown = reach.clone()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown[:, :, 1:] |= reach[:, :, :-1]
        grown[:, :, :-1] |= reach[:, :, 1:]
        grown &= free
        if torch.equal(grown, reach):
            return reach
        reach = grown


def _dilate(mask: Tensor, steps: int) -> Tensor:
    """Grow a (X, Y, Z) bool grid by `steps` cells (3x3x3 neighbourhood)."""
    if steps <= 0:
        return mask
    x = mask[None, None].float()
    for _ in range(steps):
        x = torch.nn.functional.max_pool3d(x, kernel_size=3, stride=1, padding=1)
    return x[0, 0] > 0.5


def fill_cavities(inside: Tensor, close_gaps: int = 0) -> Tensor:
    """inside with every enclosed empty region (cavity) marked inside as well; with close_gaps=k,
    also the regions joined to the outside only through openings up to about 2k cells wide."""
    inside = inside.bool()
    if close_gaps <= 0:
        return ~outside_region(inside)
    outside = outside_region(_dilate(inside, close_gaps))
    free = ~inside
    for _ in range(close_gaps):  # grow back into the free space, never through the object
        outside = _dilate(outside, 1) & free
    return ~outside
