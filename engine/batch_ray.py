"""Batch jobs as Ray tasks: `distill3d batch ... --ray` (a local Ray started on the fly) or
`--ray ADDRESS` (an existing cluster). Each job is one task running `batch.run_job`, which writes
into the shared output directory; when a worker dies mid-job Ray runs the task again and
`run_job` resumes from the job's last checkpoint.

Ray is optional: `pip install "distill3d[ray]"`.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from distill3d.engine.batch import BatchState, Job, JobResult, is_finished, run_job
from distill3d.engine.errors import UserError

LOCAL = "local"  # `--ray` without an address
CONNECT_TIMEOUT_S = 10.0  # TCP connect to the head
INIT_TIMEOUT_S = 30.0  # ray.init against it
RETRIES = 3  # times a job is run again after its worker died


class RayUnavailableError(UserError):
    """Ray is not installed, or the cluster cannot be reached."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            "--ray needs Ray, which is not installed: pip install \"distill3d[ray]\" (or pip install ray); "
            "without --ray the batch runs on this machine"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast with a clear message instead of letting ray.init retry for minutes."""
    if address in (LOCAL, "auto"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"--ray {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check the address and that the head node "
            "runs (`ray start --head` prints it), or use --ray without an address for a local Ray"
        ) from None


def connect(address: str, workers: int):
    ray = import_ray()
    _check_reachable(address)
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address == LOCAL:
        # A private local Ray with one CPU slot per worker: --workers N runs N jobs at a time.
        ray.init(num_cpus=max(1, workers), **kwargs)
        return ray
    # Something that accepts TCP but is no Ray head (or a stuck one) would keep ray.init retrying
    # for minutes: give it a bounded time in a daemon thread and stop with a clear message.
    outcome: dict = {}

    def init() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below as one clear line
            outcome["error"] = exc

    thread = threading.Thread(target=init, daemon=True)
    thread.start()
    thread.join(INIT_TIMEOUT_S)
    if "ok" in outcome:
        return ray
    why = f"{type(outcome['error']).__name__}: {outcome['error']}" if "error" in outcome else f"no answer within {INIT_TIMEOUT_S:.0f} s"
    raise RayUnavailableError(
        f"cannot connect to a Ray cluster at {address} ({why}); is a Ray head running there (`ray start --head` prints "
        "its address)? Without an address, --ray starts a local Ray"
    )


def _needs_gpu(recipe: str, overrides: list[str], ray) -> float:
    """A GPU per task when the recipe's device asks for CUDA, or is `auto` and the cluster has GPUs."""
    from distill3d.engine.recipe import load_recipe_data

    try:
        device = str(load_recipe_data(recipe, overrides).get("trainer", {}).get("device", "auto"))
    except Exception:  # noqa: BLE001 - a bad recipe fails in each job with its own message
        device = "auto"
    if device.startswith("cuda"):
        return 1.0
    return 1.0 if device == "auto" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _run_task(job: Job, run_dir: str, recipe: str, overrides: list[str]) -> JobResult:
    env = {}
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # Ray gives each task one CPU
    return run_job(job, Path(run_dir), recipe, overrides, env)


def run_ray(jobs: list[Job], state: BatchState, address: str) -> None:
    options = state.options
    ray = connect(address, options.workers)
    try:
        gpus = _needs_gpu(options.recipe, options.overrides, ray)
        task = ray.remote(_run_task).options(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)
        pending = {}
        for job in jobs:
            run_dir = state.out / job.name
            if is_finished(run_dir):
                state.mark_result(run_job(job, run_dir, options.recipe, options.overrides))
                continue
            pending[task.remote(job, str(run_dir), options.recipe, options.overrides)] = job
            state.mark_running(job.name, "submitted")  # counted as running: Ray decides when it starts
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - retries exhausted, or the task could not run
                    result = JobResult(job.name, "failed", error=f"Ray could not finish the job: {type(exc).__name__}: {exc}")
                state.mark_result(result)
    finally:
        ray.shutdown()

