"""Multiresolution hash encoding (Instant-NGP), pure-torch reference backend.

Parameter layout (shared by every backend so checkpoints move between them): one table
`embeddings` of shape (levels * table_size, features); level l owns rows
[l * table_size, (l + 1) * table_size). Level l has resolution
res = floor(base_resolution * per_level_scale ** l); a level whose (res + 1)^3 grid fits in the
table is indexed densely (x + y (res+1) + z (res+1)^2), others by the spatial hash
(x * 1) xor (y * 2654435761) xor (z * 805459861) mod table_size, in uint32 arithmetic (the
products wrap at 2^32). Inputs are clamped to [0, 1]^3; pos = x * res (in x's dtype), cell =
min(floor(pos), res - 1), frac = pos - cell; corner k (0..7) has offsets (k & 1, (k >> 1) & 1,
(k >> 2) & 1) along x, y, z and trilinear weight prod_axis (frac if offset else 1 - frac). Output
(N, levels * features), level-major: the features of level 0, then level 1, ...

How this is made fast on a CPU (measurements in benchmarks/bench_hash_encoding.py):
- One level at a time (and points in chunks of `CHUNK`), so a level's table slice and the
  per-level temporaries stay in cache, and no (L, N, 8) array is ever built.
- Structure of arrays, points innermost: corner rows and weights are (8, n) arrays built from
  per-axis (2, n) terms by outer-dimension broadcasts, which torch vectorises (inner size-2/8
  broadcasts are 10-20x slower). Index arithmetic in int32: the low bits of an int32 product are
  those of the uint32 product, so the hash is exact. trunc == floor for pos >= 0.
- A row of two float32 features is viewed as one complex64 number, so a gather is a 1-D
  index_select and the backward a single 1-D index_add_ (a plain serial loop in ATen) per level,
  instead of the 2-D index_add_ (a dispatched add per row) or embedding_bag's sorting backward.
- Nothing is saved between forward and backward but x and the table: the backward recomputes the
  corners level by level (cheaper than keeping 64 MB of indices and weights for 2^16 points),
  zeroes each level's gradient slice just before scattering into it (so the scatter hits cache),
  and reuses the table-gradient buffer from call to call (see `_GradBufferPool`): freshly
  mmapped 64 MB costs 16k page faults, 50-100 ms in this VM, more than the rest of the backward.
- Gradient into x (analytic normals) is analytic, from the same per-level quantities. With
  create_graph=True the backward recomputes through plain differentiable torch ops instead, so
  double backward works (slowly).
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)


def _as_int32(value: int) -> int:
    """The two's-complement int32 whose low 32 bits equal value (uint32 wraparound semantics)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


PRIMES_I32 = tuple(_as_int32(p) for p in PRIMES)

# Points per chunk inside a level: bounds the temporaries ((8, CHUNK) arrays) for large batches.
CHUNK = 1 << 16


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


@lru_cache(maxsize=64)
def _plan_cached(levels: int, log2_table_size: int, base_resolution: int, per_level_scale: float) -> tuple:
    config = HashEncodingConfig(levels, 1, log2_table_size, base_resolution, per_level_scale)
    table_size = 1 << log2_table_size
    return tuple((res, (res + 1) ** 3 <= table_size) for res in level_resolutions(config))


def _plan(config: HashEncodingConfig) -> tuple:
    """((res, dense), ...) per level."""
    return _plan_cached(config.levels, config.log2_table_size, config.base_resolution, float(config.per_level_scale))


def _axis_weights(frac: Tensor) -> Tensor:
    """(2, 3, n): per-axis weights for offset 0 (1 - frac) and offset 1 (frac); frac is (3, n)."""
    return torch.stack([1 - frac, frac])


def _trilinear(wt: Tensor) -> Tensor:
    """(8, n) corner weights from per-axis weights (2, 3, n), corner k = kx + 2 ky + 4 kz."""
    wzy = wt[:, 2, None] * wt[None, :, 1]  # (2z, 2y, n)
    return (wzy[:, :, None] * wt[None, None, :, 0]).view(8, wt.shape[-1])


def _corner_rows(xt: Tensor, res: int, dense: bool, log2_table_size: int) -> tuple[Tensor, Tensor]:
    """Corner rows within the level's table slice and frac, for clamped points xt (3, n).

    Returns rows (8 * n,) int32 (int64 for tables over 2^30 rows), corner-major (row of corner k
    of point i at k * n + i), and frac (3, n) in xt's dtype.
    """
    wide = log2_table_size > 30
    itype = torch.int64 if wide else torch.int32
    pos = xt * res
    cell = pos.to(itype).clamp_max_(res - 1)  # pos >= 0, so truncation is floor
    frac = pos.sub_(cell)
    if dense:
        r1 = res + 1
        mult = (1, r1, r1 * r1)
    else:
        mult = PRIMES if wide else PRIMES_I32
    tx = cell[0]
    ty = cell[1] * mult[1]
    tz = cell[2] * mult[2]
    ax = torch.stack([tx, tx + 1])
    ay = torch.stack([ty, ty + mult[1]])
    az = torch.stack([tz, tz + mult[2]])
    if dense:
        rows = (az[:, None] + ay[None, :])[:, :, None] + ax[None, None, :]
    else:
        mask = (1 << log2_table_size) - 1
        rows = (az[:, None] ^ ay[None, :]).bitwise_and_(mask)[:, :, None] ^ ax.bitwise_and_(mask)[None, None, :]
    return rows.view(-1), frac


def _clamped_t(x: Tensor) -> Tensor:
    """x (N, 3) -> clamp(x, 0, 1) as a contiguous (3, N) array."""
    return x.detach().t().contiguous().clamp_(0.0, 1.0)


def _columns(table: Tensor) -> tuple[Tensor, bool]:
    """The table viewed as columns of 1-D gathers: (rows, C) complex pairs of features where the
    dtype and device allow (CPU float32/float64, even feature count), else (rows, F) real."""
    f = table.shape[1]
    if table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64) and f % 2 == 0 and _USE_COMPLEX:
        return torch.view_as_complex(table.view(table.shape[0], f // 2, 2)), True
    return table, False


_USE_COMPLEX = True  # tests switch this off to exercise the real-column path used on GPUs


def _encode_forward(x: Tensor, emb: Tensor, config: HashEncodingConfig) -> Tensor:
    n = x.shape[0]
    levels, table_size, log2 = config.levels, 1 << config.log2_table_size, config.log2_table_size
    plan = _plan(config)
    cols, paired = _columns(emb)
    ncol = cols.shape[1]
    out_t = torch.empty(levels, ncol, n, dtype=cols.dtype, device=emb.device)
    xt = _clamped_t(x)

    def level_chunk(item):
        level, start, stop = item
        res, dense = plan[level]
        level_cols = cols[level * table_size : (level + 1) * table_size]
        rows, frac = _corner_rows(xt[:, start:stop], res, dense, log2)
        w = _trilinear(_axis_weights(frac)).to(emb.dtype)
        for c in range(ncol):
            vals = level_cols[:, c].index_select(0, rows).view(8, stop - start)
            torch.sum(vals.mul_(w), 0, out=out_t[level, c, start:stop])

    chunks = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    _run_levels(level_chunk, [(level, s, e) for level in _costly_first(plan) for s, e in chunks], emb.device)
    if paired:
        out_t = torch.view_as_real(out_t)  # (L, C, n, 2)
        return out_t.permute(2, 0, 1, 3).reshape(n, levels * config.features)
    return out_t.permute(2, 0, 1).reshape(n, levels * config.features)


def _encode_backward(x: Tensor, emb: Tensor, grad_out: Tensor, config: HashEncodingConfig, need_x: bool, need_emb: bool):
    n = x.shape[0]
    levels, table_size, log2 = config.levels, 1 << config.log2_table_size, config.log2_table_size
    plan = _plan(config)
    cols, paired = _columns(emb)
    ncol = cols.shape[1]
    grad_out = grad_out.to(emb.dtype).contiguous()
    if paired:
        g_t = torch.view_as_complex(grad_out.view(n, levels, ncol, 2)).permute(1, 2, 0).contiguous()  # (L, C, n)
    else:
        g_t = grad_out.view(n, levels, ncol).permute(1, 2, 0).contiguous()
    grad_emb = _GRAD_POOL.empty_like(emb) if need_emb else None
    grad_cols = _columns(grad_emb)[0] if need_emb else None
    xt = _clamped_t(x)

    def level_work(level):
        # One level, all points: the table-gradient slice of a level is only written here.
        res, dense = plan[level]
        sl = slice(level * table_size, (level + 1) * table_size)
        if need_emb:
            grad_emb[sl].zero_()  # just before the scatter: the slice is then in cache
        level_grad_xt = torch.empty(3, n, dtype=x.dtype, device=x.device) if need_x else None
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            m = stop - start
            rows, frac = _corner_rows(xt[:, start:stop], res, dense, log2)
            wt = _axis_weights(frac)
            w = _trilinear(wt).to(emb.dtype)
            dot = None  # d loss / d (corner weight), (8, m)
            for c in range(ncol):
                g = g_t[level, c, start:stop]
                if need_emb:
                    grad_cols[sl, c].index_add_(0, rows, (w * g).view(-1))
                if need_x:
                    vals = cols[sl, c].index_select(0, rows).view(8, m)
                    term = vals.mul_(g.conj()).real if paired else vals.mul_(g)
                    dot = term if dot is None else dot.add_(term)
            if need_x:
                s = dot.to(x.dtype).view(2, 2, 2, m)  # [kz, ky, kx]
                gx = ((s[:, :, 1] - s[:, :, 0]) * (wt[:, 2, None] * wt[None, :, 1])).sum((0, 1))
                gy = ((s[:, 1] - s[:, 0]) * (wt[:, 2, None] * wt[None, :, 0])).sum((0, 1))
                gz = ((s[1] - s[0]) * (wt[:, 1, None] * wt[None, :, 0])).sum((0, 1))
                torch.stack([gx, gy, gz], out=level_grad_xt[:, start:stop]).mul_(res)
        return level_grad_xt

    level_grads = _run_levels(level_work, _costly_first(plan), emb.device)
    grad_x = None
    if need_x:
        # Summed in a fixed order, so results do not depend on thread scheduling.
        grad_xt = level_grads[0]
        for more in level_grads[1:]:
            grad_xt += more
        inside = (x >= 0) & (x <= 1)  # clamp passes gradient on [0, 1], as torch.clamp does
        grad_x = grad_xt.t() * inside
    return grad_x, grad_emb


def _costly_first(plan) -> list[int]:
    """Levels ordered for scheduling: hashed (large random footprint) first, finest first."""
    return sorted(range(len(plan)), key=lambda level: (plan[level][1], -plan[level][0]))


# ----------------------------------------------------------------------------------------------
# Level parallelism on CPU
# ----------------------------------------------------------------------------------------------
# Half of the work (the 1-D gathers and scatters) is a serial loop inside ATen, and the rest is
# ~20 small ops per level, each an OpenMP parallel region whose barrier waits for every thread:
# on a busy 2-core machine a descheduled OpenMP thread stalls every region (measured: 2-12 s per
# forward+backward with 2 threads under load, against 0.4 s with 1). So on CPU the levels are
# spread over torch.get_num_threads() Python worker threads, each pinned to a single OpenMP
# thread (omp_set_num_threads is per calling thread; the main thread keeps its setting). torch
# releases the GIL inside ops; the workers share nothing but disjoint output slices.

_POOL_STATE: dict = {}
_IN_WORKER = threading.local()


def _omp_set_num_threads():
    """libgomp's omp_set_num_threads, or None where torch does not use OpenMP."""
    if "fn" not in _POOL_STATE:
        fn = None
        try:
            if "OpenMP" in torch.__config__.parallel_info():
                import ctypes

                fn = ctypes.CDLL(None).omp_set_num_threads
        except (OSError, AttributeError):
            fn = None
        _POOL_STATE["fn"] = fn
    return _POOL_STATE["fn"]


def _worker_init():
    torch.get_num_threads()  # let ATen initialise this thread's OpenMP setting first ...
    _omp_set_num_threads()(1)  # ... then pin it to one thread
    _IN_WORKER.active = True


def _executor(workers: int):
    import os
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), workers)  # a forked child gets fresh threads
    if _POOL_STATE.get("key") != key:
        old = _POOL_STATE.get("pool")
        if old is not None and _POOL_STATE["key"][0] == key[0]:
            old.shutdown(wait=False)  # torch's thread count changed
        _POOL_STATE["key"] = key
        _POOL_STATE["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="hash-encoding", initializer=_worker_init)
    return _POOL_STATE["pool"]


def _run_levels(fn, items: list, device: torch.device) -> list:
    """[fn(item) for item in items]: inline, or on CPU worker threads when torch may use several."""
    workers = min(torch.get_num_threads(), len(items)) if device.type == "cpu" and PARALLEL_LEVELS else 1
    if workers <= 1 or getattr(_IN_WORKER, "active", False) or _omp_set_num_threads() is None:
        return [fn(item) for item in items]
    inference = torch.is_inference_mode_enabled()

    def task(item):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(item)

    with _POOL_STATE.setdefault("lock", threading.Lock()):
        pool = _executor(workers)
    return [future.result() for future in [pool.submit(task, item) for item in items]]


PARALLEL_LEVELS = True  # spread levels over worker threads on CPU (see above)


def _encode_differentiable(x: Tensor, emb: Tensor, config: HashEncodingConfig) -> Tensor:
    """The same encoding from plain differentiable torch ops (any order of derivatives, slow)."""
    n = x.shape[0]
    table_size = 1 << config.log2_table_size
    xt = x.t().clamp(0.0, 1.0)
    outs = []
    for level, (res, dense) in enumerate(_plan(config)):
        rows, _ = _corner_rows(xt.detach().contiguous(), res, dense, config.log2_table_size)
        pos = xt * res
        frac = pos - pos.detach().floor().clamp_max(res - 1)
        w = _trilinear(_axis_weights(frac)).to(emb.dtype)
        vals = emb[level * table_size : (level + 1) * table_size].index_select(0, rows).view(8, n, -1)
        outs.append((w[..., None] * vals).sum(0))
    return torch.cat(outs, 1) if outs else emb.new_zeros(n, 0)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, embeddings: Tensor, config: HashEncodingConfig) -> Tensor:
        ctx.save_for_backward(x, embeddings)
        ctx.config = config
        return _encode_forward(x.detach(), embeddings.detach(), config)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, emb = ctx.saved_tensors
        need_x, need_emb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate through plain torch ops so the gradient itself is
            # differentiable (e.g. a loss on analytic normals).
            inputs = [t for t, need in ((x, need_x), (emb, need_emb)) if need]
            with torch.enable_grad():
                out = _encode_differentiable(x, emb, ctx.config)
                grads = list(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
            gx = grads.pop(0) if need_x else None
            gemb = grads.pop(0) if need_emb else None
            if gemb is None and need_emb:
                gemb = torch.zeros_like(emb)
            return gx, gemb, None
        gx, gemb = _encode_backward(x.detach(), emb.detach(), grad_out, ctx.config, need_x, need_emb)
        return gx, gemb, None


def hash_encode_torch(x: Tensor, embeddings: Tensor, config: HashEncodingConfig) -> Tensor:
    """Reference encoding: (N, 3) in [0, 1] -> (N, levels * features), level-major features.

    Differentiable w.r.t. the table and, when x requires grad (analytic normals), w.r.t. x
    through the trilinear weights (zero gradient outside [0, 1], where x is clamped).
    """
    table_size = 1 << config.log2_table_size
    if embeddings.shape != (config.levels * table_size, config.features):
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match the config (expected {(config.levels * table_size, config.features)})")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"x must be (N, 3), got {tuple(x.shape)}")
    return _HashEncode.apply(x, embeddings, config)


def corner_indices(x: Tensor, config: HashEncodingConfig) -> tuple[Tensor, Tensor]:
    """Table rows and trilinear weights of the 8 corners at every level (for tests and other
    backends; the encoding itself never builds these arrays).

    x: (N, 3). Returns idx (L, N, 8) int64 rows into the flat table (level offset included) and
    w (L, N, 8) in x's dtype, corner k at offsets (k & 1, (k >> 1) & 1, (k >> 2) & 1).
    """
    n = x.shape[0]
    table_size = 1 << config.log2_table_size
    xt = _clamped_t(x)
    idx, weights = [], []
    for level, (res, dense) in enumerate(_plan(config)):
        rows, frac = _corner_rows(xt, res, dense, config.log2_table_size)
        idx.append(rows.view(8, n).t().long() + level * table_size)
        weights.append(_trilinear(_axis_weights(frac)).t())
    return torch.stack(idx), torch.stack(weights)


class _GradBufferPool:
    """Reuses the table-gradient buffer from one backward to the next (CPU only).

    Why: the gradient of a 2^19 x 16 x 2 table is 64 MB. Above glibc's mmap threshold (at most
    32 MB, dynamic) every allocation is a fresh mmap, and touching it costs 16k page faults:
    50-100 ms in this VM, more than the whole rest of the backward. The pool keeps the memory of
    up to `keep` buffers per (shape, dtype) alive in numpy arrays and hands out torch tensors that
    borrow it (torch.from_numpy). A buffer is handed out again only when no tensor uses it any
    more: the tensor's storage holds the only other reference to the numpy array, so the array's
    reference count tells. The returned tensor is an ordinary tensor (autograd takes it as
    param.grad without a copy; the optimiser frees it with zero_grad(set_to_none=True), which
    returns its memory to the pool). Contents are uninitialised; callers zero what they use.
    Other devices and small buffers go through torch.empty.
    """

    MIN_BYTES = 32 << 20

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def empty_like(self, t: Tensor) -> Tensor:
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or nbytes < self.MIN_BYTES or t.dtype not in (torch.float32, torch.float64):
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        import numpy as np

        key = (tuple(t.shape), t.dtype)
        with self._lock:
            arrays = self._free.setdefault(key, [])
            for array in arrays:
                # References: the list, the loop variable and getrefcount's argument.
                if sys.getrefcount(array) == 3:
                    return torch.from_numpy(array)
            if len(arrays) >= self.keep:
                return torch.empty_like(t, memory_format=torch.contiguous_format)
            array = np.empty(tuple(t.shape), dtype=np.float32 if t.dtype == torch.float32 else np.float64)
            arrays.append(array)
            return torch.from_numpy(array)


_GRAD_POOL = _GradBufferPool()


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
