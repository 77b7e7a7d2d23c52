"""Run-directory files: atomic writes, checkpoints, the run lock and the metrics log.

Nothing is ever half-written under its final name. A checkpoint holds the model, optimizer, scaler
and every RNG state, so a resumed run continues exactly where the checkpoint left off
(bit-identical on CPU). Checkpoints hold tensors and plain data only (RNG states included) and are
read with `torch.load(weights_only=True)`: a crafted pickle dropped into a run directory cannot
run code on resume or export. A checkpoint that does not read falls back to the previous one.

The trainer holds `lock_run_dir(run_dir)` while it writes into a run, so two processes cannot
write one run; taking the lock also sweeps temporary files a killed process left behind.
OS errors on writing (no space, read-only, name too long) become one clear UserError line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from distill3d.engine.errors import UserError

CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt$")
# atomic_path's temporary names: ".<stem>.<random>.tmp<suffix>".
TEMPORARY_RE = re.compile(r"^\..+\.tmp(\.[^.]+)?$")
LOCK_NAME = ".lock"


class RunDirectoryError(UserError):
    """A run directory that cannot be written or read: full disk, read-only, locked, corrupt."""


class RunLockedError(RunDirectoryError):
    """Another process is writing into this run directory."""


# ----- OS errors as one clear line ------------------------------------------------------------

_OS_ERROR_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space (or pick another --out), then `distill3d resume` the run",
    errno.EDQUOT: "the disk quota is exceeded; free some space (or pick another --out), then `distill3d resume` the run",
    errno.EROFS: "the file system is read-only; pick a writable --out",
    errno.EACCES: "permission denied; pick a directory you can write (--out)",
    errno.EPERM: "operation not permitted; pick a directory you can write (--out)",
    errno.ENAMETOOLONG: "the file name is too long for the file system; use a shorter --out or run name",
}


def describe_os_error(exc: OSError, what: str = "") -> str | None:
    """One line for the OS errors a user can fix, else None."""
    advice = _OS_ERROR_ADVICE.get(exc.errno)
    if advice is None:
        return None
    target = what or exc.filename or "a file"
    return f"could not write {target}: {advice}"


@contextlib.contextmanager
def clear_os_errors(what: str = "") -> Iterator[None]:
    """Wrap writes: a disk-full / read-only / name-too-long OSError becomes a RunDirectoryError."""
    try:
        yield
    except OSError as exc:
        message = describe_os_error(exc, what)
        if message is None:
            raise
        raise RunDirectoryError(message) from exc


# ----- atomic files -----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place."""
    final = Path(final)
    with clear_os_errors(str(final)):
        final.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name keeps the suffix: writers such as ffmpeg pick the format from it.
        fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; final files get normal permissions
    try:
        with clear_os_errors(str(final)):
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sweep_temporary_files(run_dir: Path) -> list[Path]:
    """Remove atomic_path leftovers of a killed process (call only while holding the run lock)."""
    removed = []
    for path in Path(run_dir).rglob(".*.tmp*"):
        if path.is_file() and TEMPORARY_RE.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ----- the run lock -----------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory (an OS file lock on RUN/.lock, released when the
    process ends, even by SIGKILL: a stale lock never blocks a resume)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fh = None

    def acquire(self) -> "RunLock":
        with clear_os_errors(str(self.path)):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
        try:
            _lock_file(fh)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLockedError(
                f"{self.run_dir} is in use by another distill3d process ({holder}); wait for it to end, "
                "or pick another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        sweep_temporary_files(self.run_dir)
        return self

    def release(self) -> None:
        if self._fh is not None:
            _unlock_file(self._fh)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock `run_dir` for writing (raises RunLockedError if another process holds it) and sweep its
    leftover temporary files. Use as `with lock_run_dir(d): ...` or keep it and call .release()."""
    return RunLock(run_dir).acquire()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock_file(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_file(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----- RNG state as plain data ------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it to the GPU
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write step_XXXXXXX.pt atomically, then drop all but the newest `keep` checkpoints.

    Checkpoints past `step` belong to a timeline this run abandoned (it resumed from an earlier
    one, e.g. after a corrupt newest checkpoint) and are removed too."""
    path = Path(directory) / f"step_{step:07d}.pt"
    # Serialise in memory first: torch.save on a full disk fails with an unreadable message,
    # a plain write fails with ENOSPC, which clear_os_errors turns into one line.
    buffer = io.BytesIO()
    torch.save({"step": step, **payload, "rng": rng_state()}, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
    found = list_checkpoints(directory)
    stale = [p for p in found if _step_of(p) > step]
    current = [p for p in found if _step_of(p) <= step]
    for old in stale + (current[:-keep] if keep > 0 else []):
        old.unlink(missing_ok=True)
    return path


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.search(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


class CheckpointError(RunDirectoryError):
    """A checkpoint file that cannot be read safely (truncated, corrupt, or not plain data)."""


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint as tensors and plain data only (never runs pickled code)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = "holds objects other than tensors and plain data" if "weights_only" in str(exc) else "is truncated or corrupt"
        raise CheckpointError(f"checkpoint {path} {reason} ({type(exc).__name__}: {first[:200]})") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a distill3d checkpoint (no step)")
    return state


def load_latest_checkpoint(directory: Path, device: torch.device | str = "cpu", warn=None) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint that reads; newer ones that do not are named through
    `warn` (default: a line on stderr). None when there is no checkpoint; CheckpointError when
    none of them reads."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    found = list_checkpoints(directory)
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, device)
        except CheckpointError as exc:
            problems.append(str(exc))
            warn(f"warning: {exc}; falling back to the previous checkpoint")
            continue
        return path, state
    if problems:
        raise CheckpointError(f"no checkpoint in {directory} can be read: {'; '.join(problems)}")
    return None


# ----- metrics.jsonl ----------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; lines torn by a kill or a full disk are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run logs each step once), dropping torn lines."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
