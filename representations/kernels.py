"""Registration of every hot-op backend with distill3d.engine.backends.

The torch backends are the references; faster ones register here with a reason when they cannot
run (missing package, no CUDA). Loaders import lazily so a missing accelerator never breaks an
import.
"""

from __future__ import annotations

from distill3d.engine.backends import register_backend


def _load_hash_torch():
    from distill3d.representations.nerf.hash_encoding import hash_encode_torch

    return hash_encode_torch


def _load_composite_torch():
    from distill3d.representations.nerf.rendering import composite_torch

    return composite_torch


register_backend("hash_encoding", "torch", _load_hash_torch, priority=0)
register_backend("composite", "torch", _load_composite_torch, priority=0)


def _load_march_torch():
    from distill3d.representations.nerf.rendering import march_torch

    return march_torch


register_backend("march", "torch", _load_march_torch, priority=0)

# Accelerated backends register themselves in their own modules.
from distill3d.representations.gaussians import backends as _gaussian_backends  # noqa: E402,F401
from distill3d.representations.mesh import backends as _mesh_backends  # noqa: E402,F401
from distill3d.representations.nerf import triton_backends as _nerf_backends  # noqa: E402,F401
