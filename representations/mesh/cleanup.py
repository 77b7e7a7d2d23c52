"""Mesh clean-up for export: connected components, small-component removal and decimation.

Decimation: quadric edge collapse through the optional `fast-simplification` package when it is
installed (it is not a dependency); otherwise, and always with method="cluster", vertex clustering
on a uniform grid (Rossignac & Borrel) with each cluster's vertex placed at the minimiser of its
summed face quadrics (Lindstrom 2000), clamped to the cell. Clustering is fast, robust and keeps
the silhouette, but it can make non-manifold edges on features thinner than a cell; quadric
collapse gives better triangles at the same count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distill3d.representations.mesh.mesh_io import Mesh

__all__ = [
    "connected_components",
    "remove_small_components",
    "remove_unreferenced_vertices",
    "decimate",
    "decimation_method",
]


def connected_components(faces: Tensor, num_vertices: int) -> Tensor:
    """Component label of every face (F,), labels 0..K-1 (faces sharing a vertex are connected)."""
    f = faces.detach().cpu().numpy().astype(np.int64)
    if len(f) == 0:
        return torch.zeros(0, dtype=torch.int64)
    parent = np.arange(num_vertices, dtype=np.int64)
    u = np.concatenate([f[:, 0], f[:, 1]])
    v = np.concatenate([f[:, 1], f[:, 2]])
    while True:
        # Hook roots onto the smaller root across every edge, then jump pointers to the roots.
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        lo, hi = np.minimum(pu[differ], pv[differ]), np.maximum(pu[differ], pv[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    _, labels = np.unique(parent[f[:, 0]], return_inverse=True)
    return torch.from_numpy(labels.reshape(-1).astype(np.int64)).to(faces.device)


def remove_unreferenced_vertices(mesh: Mesh) -> Mesh:
    used, inverse = torch.unique(mesh.faces.reshape(-1), return_inverse=True)
    pick = lambda t: None if t is None else t[used]  # noqa: E731
    return Mesh(mesh.vertices[used], inverse.reshape(-1, 3), pick(mesh.uv), mesh.texture, pick(mesh.vertex_colors), pick(mesh.normals))


def _select_faces(mesh: Mesh, keep: Tensor) -> Mesh:
    return remove_unreferenced_vertices(Mesh(mesh.vertices, mesh.faces[keep], mesh.uv, mesh.texture, mesh.vertex_colors, mesh.normals))


def remove_small_components(mesh: Mesh, min_fraction: float = 0.02, min_faces: int = 0) -> Mesh:
    """Drop connected components with fewer faces than max(min_faces, min_fraction * largest).

    NeRF floaters are small disconnected blobs; the object itself is the largest component. The
    largest component is always kept.
    """
    if mesh.num_faces == 0:
        return mesh
    labels = connected_components(mesh.faces, mesh.num_vertices)
    counts = torch.bincount(labels)
    limit = max(float(min_faces), float(min_fraction) * float(counts.max()))
    big = (counts >= limit) | (counts == counts.max())
    keep = big[labels]
    if bool(keep.all()):
        return mesh
    return _select_faces(mesh, keep)


def decimation_method() -> str:
    """"quadric" when fast-simplification is importable, else "cluster"."""
    try:
        import fast_simplification  # noqa: F401
    except Exception:
        return "cluster"
    return "quadric"


def _face_quadrics(v: Tensor, f: Tensor) -> Tensor:
    """Area-weighted plane quadrics (F, 4, 4) of the faces."""
    n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
    area2 = n.norm(dim=-1, keepdim=True)
    unit = n / area2.clamp_min(1e-30)
    plane = torch.cat([unit, -(unit * v[f[:, 0]]).sum(-1, keepdim=True)], -1)  # (F, 4)
    return plane[:, :, None] * plane[:, None, :] * (0.5 * area2[..., None])


def _cluster_faces(v: Tensor, f: Tensor, lo: Tensor, cell: float) -> tuple[Tensor, Tensor]:
    """Cluster id of every vertex and the surviving faces (in cluster ids) for a grid cell size."""
    idx = torch.floor((v - lo) / cell).long()
    dims = idx.max(0).values + 1
    key = (idx[:, 0] * dims[1] + idx[:, 1]) * dims[2] + idx[:, 2]
    _, cluster = torch.unique(key, return_inverse=True)
    k = int(cluster.max()) + 1
    nf = cluster[f]
    good = (nf[:, 0] != nf[:, 1]) & (nf[:, 1] != nf[:, 2]) & (nf[:, 0] != nf[:, 2])
    nf = nf[good]
    # Drop duplicate faces (same vertex set), keeping the first.
    srt = nf.sort(dim=1).values
    fkey = (srt[:, 0] * k + srt[:, 1]) * k + srt[:, 2]
    _, first = np.unique(fkey.numpy(), return_index=True)
    return cluster, nf[torch.from_numpy(np.sort(first))]


def _cluster_positions(v: Tensor, f: Tensor, cluster: Tensor, lo: Tensor, cell: float) -> Tensor:
    """Each cluster's vertex at the minimiser of its summed face quadrics, clamped near its cell."""
    k = int(cluster.max()) + 1
    qf = _face_quadrics(v, f)
    q_vert = torch.zeros(len(v), 4, 4, dtype=v.dtype).index_add_(0, f.reshape(-1), qf.repeat_interleave(3, dim=0))
    count = torch.zeros(k, dtype=v.dtype).index_add_(0, cluster, torch.ones_like(v[:, 0]))
    mean = torch.zeros(k, 3, dtype=v.dtype).index_add_(0, cluster, v) / count[:, None]
    Q = torch.zeros(k, 4, 4, dtype=v.dtype).index_add_(0, cluster, q_vert)
    # Truncated pseudo-inverse around the mean: stable on flat and straight regions, where the
    # quadric does not pin the position down.
    A, b = Q[:, :3, :3], Q[:, :3, 3]
    U, S, Vh = torch.linalg.svd(A)
    keep = S > 1e-3 * S[:, :1].clamp_min(1e-30)
    Sinv = torch.where(keep, 1.0 / S.clamp_min(1e-30), torch.zeros_like(S))
    rhs = -b - (A @ mean[:, :, None])[..., 0]
    delta = (Vh.transpose(1, 2) @ (Sinv[..., None] * (U.transpose(1, 2) @ rhs[..., None])))[..., 0]
    cell_lo = lo + torch.floor((mean - lo) / cell) * cell
    return (mean + delta).clamp(min=cell_lo - 0.5 * cell, max=cell_lo + 1.5 * cell)


def _decimate_cluster(mesh: Mesh, target_faces: int) -> Mesh:
    v = mesh.vertices.double().cpu()
    f = mesh.faces.cpu()
    lo = v.amin(0) - 1e-9
    extent = float((v.amax(0) - lo).max())
    # Finest grid whose result fits the target: bisect on the number of cells across the extent.
    best = None
    a, b = 1.0, 4.0 * np.sqrt(max(mesh.num_faces, 4))
    for _ in range(16):
        res = 0.5 * (a + b)
        cluster, nf = _cluster_faces(v, f, lo, extent / res)
        if len(nf) <= target_faces:
            best = (cluster, nf, extent / res)
            a = res
            if len(nf) >= 0.95 * target_faces:
                break
        else:
            b = res
        if b - a < 0.25:
            break
    if best is None:
        best = (*_cluster_faces(v, f, lo, extent), extent)
    cluster, nf, cell = best
    pos = _cluster_positions(v, f, cluster, lo, cell)
    return remove_unreferenced_vertices(Mesh(pos.float(), nf))


def decimate(mesh: Mesh, target_faces: int, method: str = "auto") -> Mesh:
    """Reduce a mesh to at most about `target_faces` faces. Attributes (UVs, colours, normals) are
    dropped: decimate before unwrapping and baking. method: "auto", "quadric" or "cluster"."""
    if target_faces <= 0:
        raise ValueError("target_faces must be positive")
    if mesh.num_faces <= target_faces:
        return Mesh(mesh.vertices, mesh.faces)
    if method == "auto":
        method = decimation_method()
    if method == "quadric":
        try:
            import fast_simplification
        except Exception as exc:
            raise RuntimeError("method='quadric' needs the optional package fast-simplification (pip install fast-simplification)") from exc
        v, f = fast_simplification.simplify(
            mesh.vertices.detach().cpu().numpy().astype(np.float32),
            mesh.faces.detach().cpu().numpy().astype(np.int32),
            target_reduction=1.0 - target_faces / mesh.num_faces,
        )
        return remove_unreferenced_vertices(Mesh(torch.from_numpy(np.asarray(v, np.float32)), torch.from_numpy(np.asarray(f, np.int64))))
    if method == "cluster":
        return _decimate_cluster(mesh, target_faces)
    raise ValueError(f"unknown decimation method {method!r}; use 'auto', 'quadric' or 'cluster'")
