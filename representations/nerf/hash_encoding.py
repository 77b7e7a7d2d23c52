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

How this is made fast on a CPU (2^16 points, 16 x 2 features, 2^19 rows: from ~0.1 M points/s
forward+backward to ~0.3-0.45 M/s on one core and ~0.5-0.65 M/s on two; see
benchmarks/bench_hash_encoding.py):
- One level at a time (points in chunks of `CHUNK`), so a level's 4 MB table slice and the
  per-level temporaries stay in cache, and no (L, N, 8) array is ever built.
- Structure of arrays, points innermost: corner rows and weights are (8, m) arrays built from
  per-axis (2, m) terms by outer-dimension broadcasts, which torch vectorises (broadcasts over an
  inner dimension of size 2 or 8 are 10-20x slower). Index arithmetic in int32: the low bits of
  an int32 product are those of the uint32 product, so the hash is exact. trunc == floor for
  pos >= 0. Every such array is written with out= into per-thread scratch (`_Scratch`).
- A row of two float32 features is viewed as one complex64 number, so a gather is a 1-D
  index_select and the backward one 1-D index_add_ (a plain serial loop in ATen) per level,
  instead of the 2-D index_add_ (a dispatched add per row, and 10x slower with int32 rows) or
  embedding_bag's sorting backward.
- Nothing is saved between forward and backward but x and the table: the backward recomputes the
  corners level by level (cheaper than keeping 64 MB of fresh indices and weights for 2^16
  points), zeroes each level's gradient slice just before scattering into it (so the scatter
  hits cache), and reuses the table-gradient buffer from call to call (`_GradBufferPool`): a
  freshly mmapped 64 MB costs 16k page faults, 50-100 ms in this VM, more than the rest of the
  backward.
- Levels run on torch.get_num_threads() worker threads, each a single OpenMP thread (see "Level
  parallelism on CPU" below): the gathers and scatters are serial loops, and OpenMP's per-op
  barriers make many small ops very slow on a busy machine.
- Gradient into x (analytic normals) is analytic, from the same per-level quantities. With
  create_graph=True the backward recomputes through plain differentiable torch ops instead, so
  double backward works (slowly).
Other devices take the same code with real feature columns instead of complex pairs, inline.
"""

from __future__ import annotations

import math
import os
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
    per_level_scale: float = 1.4472692374403782  # 16 levels from 16 to 4096
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


class _Scratch:
    """Named scratch arrays for one chunk of points, reused from call to call.

    Every array a level needs for a chunk is written with out= into these, so the hot loop
    allocates nothing: fresh multi-megabyte allocations cost page faults (glibc returns freed
    memory of worker-thread arenas to the kernel eagerly). One instance per CPU thread that runs
    levels (see `_scratch`), kept for the life of the thread: about 21 MB for CHUNK = 2^16 float32
    points (31 MB once an x-gradient was taken). On other devices every request allocates (no
    reuse across streams).
    """

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = torch.empty(max(numel, CHUNK * (math.prod(shape) // max(shape[-1], 1))), dtype=dtype, device=device)
            self.buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)


_THREAD = threading.local()


def _scratch(device: torch.device) -> _Scratch:
    if device.type != "cpu":
        return _Scratch(reuse=False)
    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        scratch = _THREAD.scratch = _Scratch(reuse=True)
    return scratch


def _corners(xt: Tensor, res: int, dense: bool, log2_table_size: int, scratch: _Scratch) -> tuple[Tensor, Tensor]:
    """Corner rows within the level's table slice, and per-axis weights, for clamped xt (3, m).

    Returns rows (8 * m,) int32 (int64 for tables over 2^30 rows), corner-major (corner k of
    point i at k * m + i, corner k = kx + 2 ky + 4 kz), and wt (2, 3, m) in xt's dtype: wt[0] =
    1 - frac, wt[1] = frac. Both are scratch arrays, valid until the next call.
    """
    m, device = xt.shape[1], xt.device
    wide = log2_table_size > 30
    itype = torch.int64 if wide else torch.int32
    wt = scratch.get("wt", (2, 3, m), xt.dtype, device)
    cell = scratch.get("cell", (3, m), itype, device)
    pos = torch.mul(xt, res, out=wt[1])
    cell.copy_(pos).clamp_max_(res - 1)  # pos >= 0, so truncation is floor
    frac = pos.sub_(cell)
    torch.neg(frac, out=wt[0]).add_(1)
    if dense:
        r1 = res + 1
        mult = (1, r1, r1 * r1)
    else:
        mult = PRIMES if wide else PRIMES_I32
    axes = scratch.get("axes", (3, 2, m), itype, device)  # per axis: term for offset 0, offset 1
    for a in range(3):
        torch.mul(cell[a], mult[a], out=axes[a, 0])
        torch.add(axes[a, 0], mult[a], out=axes[a, 1])
    ax, ay, az = axes
    zy = scratch.get("zy", (2, 2, m), itype, device)
    rows = scratch.get("rows", (2, 2, 2, m), itype, device)
    if dense:
        torch.add(az[:, None], ay[None, :], out=zy)
        torch.add(zy[:, :, None], ax[None, None, :], out=rows)
    else:
        mask = (1 << log2_table_size) - 1
        torch.bitwise_xor(az[:, None], ay[None, :], out=zy).bitwise_and_(mask)
        torch.bitwise_xor(zy[:, :, None], ax.bitwise_and_(mask)[None, None, :], out=rows)
    return rows.view(-1), wt


def _weights_zy(wt: Tensor, scratch: _Scratch) -> Tensor:
    """(2z, 2y, m) products of the z and y weights."""
    return torch.mul(wt[:, 2, None], wt[None, :, 1], out=scratch.get("wzy", (2, 2, wt.shape[-1]), wt.dtype, wt.device))


def _trilinear(wt: Tensor) -> Tensor:
    """(8, m) corner weights from per-axis weights (2, 3, m) (out of place: differentiable)."""
    wzy = wt[:, 2, None] * wt[None, :, 1]
    return (wzy[:, :, None] * wt[None, None, :, 0]).view(8, wt.shape[-1])


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
    device = emb.device
    xt = torch.empty(3, n, dtype=x.dtype, device=device)
    out_t = torch.empty(levels, ncol, n, dtype=cols.dtype, device=device)
    out = torch.empty(n, levels * config.features, dtype=emb.dtype, device=device)

    def transpose_x(rng):
        torch.clamp(x[rng].t(), 0.0, 1.0, out=xt[:, rng])

    def level_chunk(item):
        level, rng = item
        res, dense = plan[level]
        scratch = _scratch(device)
        rows, wt = _corners(xt[:, rng], res, dense, log2, scratch)
        m = wt.shape[-1]
        w = scratch.get("w", (2, 2, 2, m), wt.dtype, device)
        torch.mul(_weights_zy(wt, scratch)[:, :, None], wt[None, None, :, 0], out=w)
        w = w.view(8, m).to(emb.dtype)
        level_cols = cols[level * table_size : (level + 1) * table_size]
        vals = scratch.get("vals", (8, m), cols.dtype, device)
        for c in range(ncol):
            torch.index_select(level_cols[:, c], 0, rows, out=vals.view(-1))
            torch.sum(vals.mul_(w), 0, out=out_t[level, c, rng])

    def transpose_out(rng):
        block = out_t[:, :, rng]
        if paired:  # (L, C, m) complex -> (m, L, C, 2) real
            out[rng].view(-1, levels, ncol, 2).copy_(torch.view_as_real(block).permute(2, 0, 1, 3))
        else:
            out[rng].view(-1, levels, ncol).copy_(block.permute(2, 0, 1))

    parallel = n >= MIN_PARALLEL_POINTS
    _run(transpose_x, _ranges(n), device, parallel)
    _run(level_chunk, [(level, rng) for level in _costly_first(plan) for rng in _ranges(n, CHUNK)], device, parallel)
    _run(transpose_out, _ranges(n), device, parallel)
    return out


def _encode_backward(x: Tensor, emb: Tensor, grad_out: Tensor, config: HashEncodingConfig, need_x: bool, need_emb: bool):
    n = x.shape[0]
    levels, table_size, log2 = config.levels, 1 << config.log2_table_size, config.log2_table_size
    plan = _plan(config)
    cols, paired = _columns(emb)
    ncol = cols.shape[1]
    device = emb.device
    grad_out = grad_out.to(emb.dtype)
    xt = torch.empty(3, n, dtype=x.dtype, device=device)
    g_t = torch.empty(levels, ncol, n, dtype=cols.dtype, device=device)
    grad_emb = _GRAD_POOL.empty_like(emb) if need_emb else None
    grad_cols = _columns(grad_emb)[0] if need_emb else None
    grad_x = torch.empty(n, 3, dtype=x.dtype, device=device) if need_x else None

    def transpose_in(rng):
        torch.clamp(x[rng].t(), 0.0, 1.0, out=xt[:, rng])
        g = grad_out[rng].contiguous().view(-1, levels, ncol, 2 if paired else 1)
        g = torch.view_as_complex(g) if paired else g[..., 0]
        g_t[:, :, rng] = g.permute(1, 2, 0)

    def level_work(level):
        # One level, all points: the table-gradient slice of a level is only written here.
        res, dense = plan[level]
        sl = slice(level * table_size, (level + 1) * table_size)
        scratch = _scratch(device)
        if need_emb:
            grad_emb[sl].zero_()  # just before the scatter: the slice is then in cache
        level_grad_xt = torch.empty(3, n, dtype=x.dtype, device=device) if need_x else None
        for rng in _ranges(n, CHUNK):
            rows, wt = _corners(xt[:, rng], res, dense, log2, scratch)
            m = wt.shape[-1]
            wzy = _weights_zy(wt, scratch).to(emb.dtype)
            wx = wt[:, 0].to(emb.dtype)
            dot = None  # d loss / d (corner weight), (8, m)
            for c in range(ncol):
                g = g_t[level, c, rng]
                if need_emb:
                    # src = w * g = ((w_z w_y) g) w_x, without forming w.
                    wzyg = torch.mul(wzy, g, out=scratch.get("wzyg", (2, 2, m), cols.dtype, device))
                    src = scratch.get("src", (2, 2, 2, m), cols.dtype, device)
                    torch.mul(wzyg[:, :, None], wx[None, None], out=src)
                    grad_cols[sl, c].index_add_(0, rows, src.view(-1))
                if need_x:
                    vals = scratch.get("xvals" if dot is None else "xvals2", (8, m), cols.dtype, device)
                    torch.index_select(cols[sl, c], 0, rows, out=vals.view(-1))
                    term = vals.mul_(g.conj()).real if paired else vals.mul_(g)  # sum_f g_f v_f
                    dot = term if dot is None else dot.add_(term)
            if need_x:
                # d out / d frac_a = sum over corners of dot_k * (+-1 along a) * (weights of the
                # other two axes); d frac / d x = res.
                s = dot.to(x.dtype).view(2, 2, 2, m)  # [kz, ky, kx]
                diff = scratch.get("diff", (3, 2, 2, m), x.dtype, device)
                torch.sub(s[:, :, 1], s[:, :, 0], out=diff[0])  # along x: [kz, ky]
                torch.sub(s[:, 1], s[:, 0], out=diff[1])  # along y: [kz, kx]
                torch.sub(s[1], s[0], out=diff[2])  # along z: [ky, kx]
                other = scratch.get("other", (3, 2, 2, m), x.dtype, device)
                torch.mul(wt[:, 2, None], wt[None, :, 1], out=other[0])
                torch.mul(wt[:, 2, None], wt[None, :, 0], out=other[1])
                torch.mul(wt[:, 1, None], wt[None, :, 0], out=other[2])
                torch.sum(diff.mul_(other), (1, 2), out=level_grad_xt[:, rng]).mul_(res)
        return level_grad_xt

    def gather_grad_x(rng):
        # Summed in level order, so results do not depend on thread scheduling.
        acc = level_grads[0][:, rng].clone()
        for more in level_grads[1:]:
            acc += more[:, rng]
        xr = x[rng]
        torch.mul(acc.t(), (xr >= 0) & (xr <= 1), out=grad_x[rng])  # clamp passes gradient on [0, 1]

    parallel = n >= MIN_PARALLEL_POINTS
    _run(transpose_in, _ranges(n), device, parallel)
    level_grads = [None] * levels
    order = _costly_first(plan)
    for level, result in zip(order, _run(level_work, order, device, parallel)):
        level_grads[level] = result
    if need_x:
        _run(gather_grad_x, _ranges(n), device, parallel)
    return grad_x, grad_emb


def _ranges(n: int, size: int | None = None) -> list[slice]:
    """Point ranges: of `size` points, or by default a few per worker thread for the
    memory-bound transposes."""
    if size is None:
        size = max(4096, -(-n // 4))
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def _encode_differentiable(x: Tensor, emb: Tensor, config: HashEncodingConfig) -> Tensor:
    """The same encoding from plain differentiable torch ops (any order of derivatives, slow)."""
    n = x.shape[0]
    table_size = 1 << config.log2_table_size
    xt = x.t().clamp(0.0, 1.0)
    outs = []
    scratch = _Scratch(reuse=False)
    for level, (res, dense) in enumerate(_plan(config)):
        rows, _ = _corners(xt.detach().contiguous(), res, dense, config.log2_table_size, scratch)
        pos = xt * res
        frac = pos - pos.detach().floor().clamp_max(res - 1)
        w = _trilinear(torch.stack([1 - frac, frac])).to(emb.dtype)
        vals = emb[level * table_size : (level + 1) * table_size].index_select(0, rows).view(8, n, -1)
        outs.append((w[..., None] * vals).sum(0))
    return torch.cat(outs, 1) if outs else emb.new_zeros(n, 0)


def _costly_first(plan) -> list[int]:
    """Levels ordered for scheduling: hashed (large random footprint) first, finest first."""
    return sorted(range(len(plan)), key=lambda level: (plan[level][1], -plan[level][0]))


# ----------------------------------------------------------------------------------------------
# Level parallelism on CPU
# ----------------------------------------------------------------------------------------------
# Half of the work (the 1-D gathers and scatters) is a serial loop inside ATen, and the rest is
# ~25 small ops per level, each an OpenMP parallel region whose barrier waits for every thread:
# on a busy 2-core machine a descheduled OpenMP thread stalls every region (measured: 2-12 s per
# forward+backward with torch's 2 threads while other processes ran, against 0.4 s with 1). So
# on CPU the work items (levels, and point ranges for the transposes) go to
# torch.get_num_threads() Python worker threads, each pinned to one OpenMP thread
# (omp_set_num_threads sets the calling thread's value only; the caller keeps its setting), and
# the calling thread runs no OpenMP op during the encoding. torch releases the GIL inside ops;
# the items write disjoint slices, and results are combined in a fixed order, so they do not
# depend on scheduling.

_POOL_STATE: dict = {}
_POOL_LOCK = threading.Lock()
_IN_WORKER = threading.local()
PARALLEL_LEVELS = True  # spread levels over worker threads on CPU (see above)
MIN_PARALLEL_POINTS = 2048  # below this, thread hand-offs cost more than they save


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


def _executor(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    with _POOL_LOCK:
        if _POOL_STATE.get("threads") != threads:
            old = _POOL_STATE.get("pool")
            if old is not None:
                old.shutdown(wait=False)  # torch's thread count changed
            _POOL_STATE["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="hash-encoding", initializer=_worker_init)
            _POOL_STATE["threads"] = threads
        return _POOL_STATE["pool"]


def _after_fork_in_child():
    # Threads do not survive fork(): a child (e.g. a DataLoader worker) starts a pool of its own.
    global _POOL_LOCK
    _POOL_STATE.pop("pool", None)
    _POOL_STATE.pop("threads", None)
    _POOL_LOCK = threading.Lock()
    _GRAD_POOL._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _run(fn, items: list, device: torch.device, parallel: bool = True) -> list:
    """[fn(item) for item in items]: inline, or on CPU worker threads when torch may use several."""
    threads = torch.get_num_threads() if parallel and PARALLEL_LEVELS and device.type == "cpu" else 1
    if threads <= 1 or len(items) <= 1 or getattr(_IN_WORKER, "active", False) or _omp_set_num_threads() is None:
        return [fn(item) for item in items]
    inference = torch.is_inference_mode_enabled()

    def task(item):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(item)

    pool = _executor(threads)
    return [future.result() for future in [pool.submit(task, item) for item in items]]


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
    xt = x.detach().t().contiguous().clamp_(0.0, 1.0)
    idx, weights = [], []
    for level, (res, dense) in enumerate(_plan(config)):
        rows, wt = _corners(xt, res, dense, config.log2_table_size, _Scratch(reuse=False))
        idx.append(rows.view(8, n).t().long() + level * table_size)
        weights.append(_trilinear(wt).t())
    return torch.stack(idx), torch.stack(weights)


class _GradBufferPool:
    """Reuses the table-gradient buffer from one backward to the next (CPU only).

    Why: the gradient of a 2^19 x 16 x 2 table is 64 MB. Above glibc's mmap threshold (at most
    32 MB, dynamic) every allocation is a fresh mmap, and touching it costs 16k page faults:
    50-100 ms in this VM, more than the whole rest of the backward. (mallopt raising the
    threshold would do it too, but for the whole process.) The pool keeps the memory of up to
    `keep` buffers per (shape, dtype) alive in numpy arrays and hands out torch tensors that
    borrow it (torch.from_numpy). A buffer is handed out again only when no tensor uses it any
    more: the storage of such a tensor (and of all its views) holds the only other reference to
    the numpy array, so the array's reference count tells; the count of an array referenced by
    the pool alone is measured once, the same way (`_refs`). The returned tensor is an ordinary
    tensor: autograd takes it as param.grad without a copy, and the optimiser's
    zero_grad(set_to_none=True) frees it, which returns its memory to the pool. Contents are
    uninitialised; callers zero what they use. Other devices and small buffers use torch.empty.
    """

    MIN_BYTES = 32 << 20

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._arrays: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self._unused_refs = self._refs([object()], 0)

    @staticmethod
    def _refs(arrays: list, i: int) -> int:
        return sys.getrefcount(arrays[i])

    def empty_like(self, t: Tensor) -> Tensor:
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or nbytes < self.MIN_BYTES or t.dtype not in (torch.float32, torch.float64):
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        import numpy as np

        key = (tuple(t.shape), t.dtype)
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            for i in range(len(arrays)):
                if self._refs(arrays, i) <= self._unused_refs:
                    return torch.from_numpy(arrays[i])
            if len(arrays) >= self.keep:
                return torch.empty_like(t, memory_format=torch.contiguous_format)
            arrays.append(np.empty(tuple(t.shape), dtype=np.float32 if t.dtype == torch.float32 else np.float64))
            return torch.from_numpy(arrays[-1])


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
