"""One algorithm, several kernels: the run-time switch for hot operations.

Each op (e.g. "hash_encoding", "composite") has a pure-torch implementation that runs everywhere
and is the reference, plus optional faster backends. A backend is registered with a function
saying whether it can run on a device and a loader returning the callable. `resolve_op(op,
"auto", device)` picks the first available backend in priority order; naming a backend that is
missing raises BackendUnavailable with the reason. `distill3d doctor` prints `describe()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from distill3d.engine.errors import UserError


class BackendUnavailable(UserError):
    pass


@dataclass
class Backend:
    name: str
    # Returns None when usable on the device, else a short reason why not.
    unavailable_reason: Callable[[torch.device], str | None]
    load: Callable[[], Callable]
    priority: int  # higher wins under "auto"
    # Device types where "auto" may pick it (None: any device where it is available). The Triton
    # interpreter can run on CPU when forced, but auto must never choose it there.
    auto_devices: tuple[str, ...] | None = None


_OPS: dict[str, dict[str, Backend]] = {}


def register_backend(
    op: str, name: str, load: Callable[[], Callable], unavailable_reason=None, priority: int = 0, auto_devices: tuple[str, ...] | None = None
) -> None:
    _OPS.setdefault(op, {})[name] = Backend(name, unavailable_reason or (lambda device: None), load, priority, auto_devices)
    _resolve.cache_clear()


def ops() -> list[str]:
    _ensure_builtin()
    return sorted(_OPS)


def backends_for(op: str) -> list[str]:
    _ensure_builtin()
    return sorted(_OPS.get(op, {}), key=lambda n: -_OPS[op][n].priority)


def resolve_op(op: str, backend: str, device: torch.device | str) -> Callable:
    """The callable implementing `op` with `backend` ("auto" for the fastest available)."""
    return _resolve(op, backend, torch.device(device).type)


@lru_cache(maxsize=None)
def _resolve(op: str, backend: str, device_type: str) -> Callable:
    name = choose(op, backend, torch.device(device_type))
    return _OPS[op][name].load()


def choose(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that `backend` resolves to for this op on this device."""
    _ensure_builtin()
    if op not in _OPS:
        raise BackendUnavailable(f"unknown op {op!r}; known ops: {', '.join(sorted(_OPS))}")
    table = _OPS[op]
    if backend == "auto":
        for name in backends_for(op):
            entry = table[name]
            if entry.auto_devices is not None and device.type not in entry.auto_devices:
                continue
            if entry.unavailable_reason(device) is None:
                return name
        raise BackendUnavailable(f"no backend for {op!r} can run on {device}")
    if backend not in table:
        raise BackendUnavailable(f"unknown backend {backend!r} for {op!r}; available: {', '.join(backends_for(op))} (or 'auto')")
    reason = table[backend].unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} for {op!r} cannot run on {device}: {reason}. Use 'auto' or 'torch'.")
    return backend


def describe(device: torch.device) -> list[tuple[str, str, list[tuple[str, str | None]]]]:
    """(op, chosen backend, [(backend, reason unavailable or None)]) for every op."""
    rows = []
    for op in ops():
        status = [(name, _OPS[op][name].unavailable_reason(device)) for name in backends_for(op)]
        rows.append((op, choose(op, "auto", device), status))
    return rows


_BUILTIN_LOADED = False


def _ensure_builtin() -> None:
    """Register the project's own backends once (kept lazy so importing is cheap)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from distill3d.representations import kernels  # noqa: F401  (registers on import)
