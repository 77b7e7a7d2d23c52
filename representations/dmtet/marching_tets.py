"""Differentiable marching tetrahedra.

Convention (the one Magic3D's NeRF initialisation implies, sdf = density - threshold):
**sdf > 0 is INSIDE** the surface, sdf <= 0 outside. Faces are oriented counter-clockwise seen
from outside, so (v1 - v0) x (v2 - v0) points outward (from sdf > 0 toward sdf <= 0).

Each tetrahedron whose four vertices do not all agree on the sign contributes one triangle (one
vertex on the other side) or two (a quad, two on each side). Surface vertices sit on grid edges
with a sign change, at the zero of the linear interpolation of the SDF, so they are
differentiable w.r.t. the SDF values and the (deformed) grid positions. Each crossing edge gives
exactly one surface vertex shared by all tetrahedra around it, so the mesh is connected and, away
from the grid border, closed.

The 16-case table is built below from the reference tetrahedron and holds for every positively
oriented tetrahedron (orientation is invariant under orientation-preserving affine maps); the grid
in tet_grid.py is positively oriented.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["marching_tets", "TET_EDGES", "TRIANGLE_TABLE", "NUM_TRIANGLES"]

# The 6 edges of a tetrahedron as pairs of local vertex indices.
TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.int64)


def _build_table() -> tuple[Tensor, Tensor]:
    """(16, 2, 3) local edge indices of the triangles of each case (-1 padding), (16,) counts.

    Case index: sum over local vertices i of (sdf_i > 0) << i.
    """
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    edge_of = {tuple(e): k for k, e in enumerate(TET_EDGES.tolist())}

    def edge(a: int, b: int) -> int:
        return edge_of[(min(a, b), max(a, b))]

    table = torch.full((16, 2, 3), -1, dtype=torch.int64)
    counts = torch.zeros(16, dtype=torch.int64)
    for case in range(16):
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if len(inside) in (0, 4):
            continue
        if len(inside) == 1 or len(outside) == 1:
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[edge(lone, o) for o in others]]
        else:
            (a, b), (c, d) = inside, outside
            # cycle of the quad: ac, ad, bd, bc
            q = [edge(a, c), edge(a, d), edge(b, d), edge(b, c)]
            tris = [[q[0], q[1], q[2]], [q[0], q[2], q[3]]]
        # Orient every triangle outward on the reference tetrahedron (midpoint interpolation).
        mids = {k: ref[TET_EDGES[k]].mean(0) for k in range(6)}
        p_in = ref[inside].mean(0)
        p_out = ref[outside].mean(0)
        for t, tri in enumerate(tris):
            p0, p1, p2 = (mids[k] for k in tri)
            n = torch.linalg.cross(p1 - p0, p2 - p0)
            if float((n * (p_out - p_in)).sum()) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[case, t] = torch.tensor(tri)
        counts[case] = len(tris)
    return table, counts


TRIANGLE_TABLE, NUM_TRIANGLES = _build_table()


def marching_tets(positions: Tensor, sdf: Tensor, tets: Tensor) -> tuple[Tensor, Tensor]:
    """Surface of {sdf > 0} on a tetrahedral grid.

    positions (V, 3) (possibly deformed) grid vertices, sdf (V,), tets (T, 4) int32 or int64,
    positively oriented. Returns (vertices (M, 3), faces (F, 3) int64), differentiable w.r.t. positions and
    sdf; (0, 3) / (0, 3) when no tetrahedron straddles the surface.
    """
    device = positions.device
    with torch.no_grad():
        occ = sdf.detach() > 0
        occ_t = occ[tets]  # (T, 4)
        n_in = occ_t.sum(-1, dtype=torch.uint8)  # 1 byte per tet: the full grid can be 100 M tets
        valid = (n_in > 0) & (n_in < 4)
        if not bool(valid.any()):
            return positions.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64, device=device)
        vt = tets[valid].long()  # (Tv, 4): only the straddling tets are widened (keys below need int64)
        edges = vt[:, TET_EDGES.to(device)]  # (Tv, 6, 2)
        edges = torch.sort(edges, dim=-1).values
        crossing = occ[edges[..., 0]] != occ[edges[..., 1]]  # (Tv, 6)
        nv = positions.shape[0]
        keys = edges[..., 0] * nv + edges[..., 1]
        unique_keys, inverse = torch.unique(keys[crossing], return_inverse=True)
        edge_to_vertex = torch.full(keys.shape, -1, dtype=torch.int64, device=device)
        edge_to_vertex[crossing] = inverse
        ua = torch.div(unique_keys, nv, rounding_mode="floor")
        ub = unique_keys - ua * nv
        weights = (occ_t[valid].to(torch.int64) * (2 ** torch.arange(4, device=device))).sum(-1)  # case index
        table = TRIANGLE_TABLE.to(device)[weights]  # (Tv, 2, 3)
        count = NUM_TRIANGLES.to(device)[weights]  # (Tv,)
        first = table[:, 0]  # every valid tet has at least one triangle
        second = table[count == 2, 1]
        e2v_second = edge_to_vertex[count == 2]
        faces = torch.cat([
            torch.gather(edge_to_vertex, 1, first),
            torch.gather(e2v_second, 1, second),
        ])
    sa, sb = sdf[ua], sdf[ub]
    pa, pb = positions[ua], positions[ub]
    denom = sa - sb  # never 0: the signs differ
    verts = (pa * (-sb)[:, None] + pb * sa[:, None]) / denom[:, None]
    return verts, faces
