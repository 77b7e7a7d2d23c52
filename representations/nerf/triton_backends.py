"""Backend registrations for fused NeRF kernels: Triton (ours), tiny-cuda-nn and nerfacc.

op "hash_encoding" (signature of hash_encoding.hash_encode_torch):
- "triton" (priority 20): triton_kernels.hash_encode_triton. Same parameter layout and the same
  function as torch, so checkpoints move freely between torch and triton. Available on CUDA
  tensors; on CPU only under TRITON_INTERPRET=1 (the interpreter: slow, for tests), and "auto"
  never picks it there.
- "tcnn" (priority -10, never picked by "auto"): tiny-cuda-nn's HashGrid. Its grid is a different
  function (vertices offset by half a cell, its own per-level resolutions, per-level table sizes
  rounded to multiples of 8), so there is no exact conversion: checkpoints do NOT move between
  tcnn and torch/triton. It uses the first n_params entries of the same `embeddings` tensor as its
  parameter vector (the rest stay unused) so that the module, optimizer and checkpoint code are
  unchanged. Only when named explicitly; tiny-cuda-nn must be built by the user (it is on no
  package registry) and its import raises EnvironmentError without CUDA: both are caught.

op "composite" (signature of rendering.composite_torch):
- "triton" (priority 20): triton_kernels.composite_triton, same results and gradients.
- "nerfacc" (priority 10): nerfacc's packed render_weight_from_density + accumulate_along_rays.
  Same function (t_starts = 0, t_ends = deltas, so the intervals are exactly the deltas). CUDA
  tensors only: nerfacc's packed ops JIT-build a CUDA extension and are never called on CPU.

op "march" (signature of rendering.march_torch):
- "triton" (priority 20): triton_kernels.march_triton, the same Samples as march_torch for a grid
  occupancy (OccupancyGrid) or none, given the same jitter (or the same seed).
- "nerfacc" (priority -10, never picked by "auto"): nerfacc.traverse_grids over the same grid.
  A different sampler (fixed step 2 radius / n_samples from near, jittered by one random offset
  per ray), so it does not reproduce march_torch's samples. CUDA only.

"auto" prefers triton on CUDA, torch on CPU. Priorities are static; keeping "auto" off Triton's CPU
interpreter uses engine.backends' `auto_devices` when the engine has it (see _register).
"""

from __future__ import annotations

import inspect
import os
from functools import lru_cache

import torch

from distill3d.engine.backends import register_backend

TRITON_PRIORITY = 20
NERFACC_COMPOSITE_PRIORITY = 10
FORCED_ONLY_PRIORITY = -10  # below torch, which runs everywhere: "auto" never gets here

_ENGINE_HAS_AUTO_DEVICES = "auto_devices" in inspect.signature(register_backend).parameters


def _register(op: str, name: str, load, unavailable_reason, priority: int, auto_devices=None) -> None:
    if _ENGINE_HAS_AUTO_DEVICES:
        register_backend(op, name, load, unavailable_reason, priority, auto_devices=auto_devices)
    else:
        register_backend(op, name, load, unavailable_reason, priority)


# ----- Triton ------------------------------------------------------------------------------------


def _triton_unavailable(device: torch.device) -> str | None:
    from distill3d.representations.nerf.triton_kernels import triton_unavailable_reason

    device = torch.device(device)
    if device.type != "cuda" and not _ENGINE_HAS_AUTO_DEVICES:
        # Without auto_devices in the engine, offering the interpreter would let "auto" pick it.
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "Triton needs CUDA (this engine cannot keep 'auto' off the CPU interpreter, so it is not offered)"
        return "Triton needs CUDA (set TRITON_INTERPRET=1 to run the interpreter on CPU, slow)"
    return triton_unavailable_reason(device)


def _load_triton(name: str):
    def load():
        from distill3d.representations.nerf import triton_kernels

        return getattr(triton_kernels, name)

    return load


for _op, _fn in (("hash_encoding", "hash_encode_triton"), ("composite", "composite_triton"), ("march", "march_triton")):
    _register(_op, "triton", _load_triton(_fn), _triton_unavailable, TRITON_PRIORITY, auto_devices=("cuda",))


# ----- tiny-cuda-nn --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tcnn_import_error() -> str | None:
    try:
        import tinycudann  # noqa: F401
    except (ImportError, EnvironmentError, OSError) as exc:  # EnvironmentError: no CUDA at import
        return f"tiny-cuda-nn does not import ({type(exc).__name__}: {exc}); it is built from source (github.com/NVlabs/tiny-cuda-nn), not on a package registry"
    except Exception as exc:  # a broken build can raise anything at import
        return f"tiny-cuda-nn does not import ({type(exc).__name__}: {exc})"
    return None


def _tcnn_unavailable(device: torch.device) -> str | None:
    if torch.device(device).type != "cuda":
        return "tiny-cuda-nn needs a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _tcnn_import_error()


def tcnn_encoding_config(config) -> dict:
    return {
        "otype": "HashGrid",
        "n_levels": config.levels,
        "n_features_per_level": config.features,
        "log2_hashmap_size": config.log2_table_size,
        "base_resolution": config.base_resolution,
        "per_level_scale": float(config.per_level_scale),
    }


class TcnnHashEncoding:
    """tiny-cuda-nn's HashGrid behind hash_encode_torch's signature (parameters from `embeddings`)."""

    def __init__(self):
        import tinycudann

        self.tcnn = tinycudann
        self._modules: dict = {}

    def module(self, config, device):
        key = (config.levels, config.features, config.log2_table_size, config.base_resolution, float(config.per_level_scale), str(device))
        if key not in self._modules:
            with torch.cuda.device(device):
                self._modules[key] = self.tcnn.Encoding(3, tcnn_encoding_config(config), dtype=torch.float32)
        return self._modules[key]

    def n_params(self, config, device) -> int:
        return self.module(config, device).params.numel()

    def __call__(self, x, embeddings, config):
        from tinycudann.modules import _module_function

        enc = self.module(config, x.device)
        n_params = enc.params.numel()
        if n_params > embeddings.numel():
            raise ValueError(f"tiny-cuda-nn wants {n_params} parameters, the table has {embeddings.numel()}")
        params = embeddings.reshape(-1)[:n_params].float().contiguous()
        n = x.shape[0]
        native = getattr(getattr(self.tcnn, "modules", None), "_C", None)
        granularity = int(native.batch_size_granularity()) if hasattr(native, "batch_size_granularity") else 128
        padded = (n + granularity - 1) // granularity * granularity
        xf = x.float().contiguous()
        if padded != n:
            xf = torch.nn.functional.pad(xf, (0, 0, 0, padded - n))
        out = _module_function.apply(enc.native_tcnn_module, xf, params, enc.loss_scale)
        return out[:n, : config.levels * config.features].float()


_register("hash_encoding", "tcnn", TcnnHashEncoding, _tcnn_unavailable, FORCED_ONLY_PRIORITY, auto_devices=())


# ----- nerfacc -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _nerfacc_import_error() -> str | None:
    try:
        import nerfacc  # noqa: F401  (importing builds nothing; only its CUDA ops JIT-build)
    except Exception as exc:
        return f"nerfacc does not import ({type(exc).__name__}: {exc}); `pip install nerfacc`"
    return None


def _nerfacc_unavailable(device: torch.device) -> str | None:
    if torch.device(device).type != "cuda":
        return "nerfacc's packed ops need CUDA tensors (on CPU they try to JIT-build a CUDA extension)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _nerfacc_import_error()


def composite_nerfacc(sigmas, rgbs, samples, normals=None):
    """composite_torch through nerfacc's packed CUDA ops (CUDA tensors only)."""
    if not sigmas.is_cuda:  # checked before importing: never let nerfacc JIT-build on CPU
        raise RuntimeError("composite_nerfacc runs on CUDA tensors only")
    import nerfacc

    from distill3d.representations.nerf.rendering import Composited
    idx, n_rays = samples.ray_indices, samples.n_rays
    starts = torch.zeros_like(samples.deltas)
    weights, _, _ = nerfacc.render_weight_from_density(starts, samples.deltas, sigmas, ray_indices=idx, n_rays=n_rays)

    def accumulate(values):
        return nerfacc.accumulate_along_rays(weights, values, ray_indices=idx, n_rays=n_rays)

    rgb = accumulate(rgbs)
    opacity = accumulate(None)
    depth = accumulate(samples.t_mid[:, None])
    normal = accumulate(normals) if normals is not None else None
    return Composited(weights, rgb, opacity, depth, normal)


def march_nerfacc(origins, dirs, near, far, n_samples, occupied, jitter):
    """nerfacc's grid traversal: fixed step 2 radius / n_samples; NOT march_torch's samples."""
    if not origins.is_cuda:  # checked before importing: never let nerfacc JIT-build on CPU
        raise RuntimeError("march_nerfacc runs on CUDA tensors only")
    import nerfacc

    from distill3d.representations.nerf.rendering import Samples
    from distill3d.representations.nerf.triton_kernels import occupancy_grid_of
    grid_info = occupancy_grid_of(occupied) if occupied is not None else None
    if occupied is not None and grid_info is None:
        raise ValueError("the nerfacc march backend needs a grid occupancy (an OccupancyGrid) or None")
    if grid_info is not None:
        grid, radius = grid_info
        step = 2.0 * radius / n_samples
    else:
        # No grid: one always-occupied cell spanning every ray's [near, far].
        extent = float(torch.maximum(near.abs().max(), far.abs().max())) + float(origins.abs().max())
        grid, radius = torch.ones(1, 1, 1, dtype=torch.bool, device=origins.device), max(extent, 1e-6)
        step = float((far - near).clamp_min(0).max()) / n_samples
    aabb = torch.tensor([-radius] * 3 + [radius] * 3, dtype=torch.float32, device=origins.device)
    near_planes = near.float().clone()
    if isinstance(jitter, torch.Tensor):
        near_planes = near_planes + jitter[:, 0].to(near_planes) * step
    elif jitter:
        near_planes = near_planes + torch.rand_like(near_planes) * step
    intervals, samples, _ = nerfacc.traverse_grids(
        origins.float().contiguous(), dirs.float().contiguous(), grid[None].bool().contiguous(), aabb[None],
        near_planes=near_planes, far_planes=far.float().contiguous(), step_size=step, cone_angle=0.0,
    )
    t_starts = intervals.vals[intervals.is_left]
    t_ends = intervals.vals[intervals.is_right]
    return Samples(samples.ray_indices.long(), (t_starts + t_ends) * 0.5, t_ends - t_starts, origins.shape[0])


_register("composite", "nerfacc", lambda: composite_nerfacc, _nerfacc_unavailable, NERFACC_COMPOSITE_PRIORITY, auto_devices=("cuda",))
_register("march", "nerfacc", lambda: march_nerfacc, _nerfacc_unavailable, FORCED_ONLY_PRIORITY, auto_devices=())
