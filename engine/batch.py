"""Batch generation: many jobs (prompts, images, or a YAML/JSONL list), each one run of the ordinary
CLI in a subprocess, so a crash, a NaN or a bad input in one job cannot take the others down.

A job's run directory is OUT/<job name>. Next to its usual outputs the batch keeps
  job.json   status (running, done, failed, interrupted), attempts, time, error, eval figures
  job.log    the CLI's output, every attempt appended
so running the same batch again skips finished jobs and resumes interrupted ones from their
checkpoints (`distill3d resume`). OUT/summary.json lists every job; OUT/index.html is the gallery.
The same `run_job` runs a job locally (a thread per worker) and inside a Ray task (batch_ray.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from distill3d.engine.checkpoint import atomic_write_text
from distill3d.engine.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JOB_KEYS = ("name", "prompt", "image", "elevation", "seed", "scene", "negative", "set")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class JobsFileError(UserError):
    """The jobs file (or folder) cannot be turned into a list of jobs."""


@dataclass
class Job:
    """One asset to make. `source` says where it came from ("line 3", "entry 2") for messages."""

    name: str
    prompt: str = ""
    image: str | None = None  # image-to-3D input photo (generate --image)
    elevation: float | None = None  # of the photo's camera (generate --elevation)
    seed: int | None = None
    scene: str | None = None  # scene/mesh for oracle recipes and evaluation (generate --scene)
    negative: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set key=value, after the batch's own
    source: str = ""


# ----- jobs files ---------------------------------------------------------------------------------
def slugify(text: str, limit: int = 48) -> str:
    """A directory name from a prompt or file name: lower case, [a-z0-9-], at most `limit` long."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "job"


def _job_from_entry(entry, where: str, base: Path) -> Job:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise JobsFileError(f"{where}: expected a prompt string or a mapping with keys {', '.join(JOB_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(JOB_KEYS))
    if unknown:
        raise JobsFileError(f"{where}: unknown key {unknown[0]!r}; a job has {', '.join(JOB_KEYS)}")
    prompt = entry.get("prompt") or ""
    image = entry.get("image")
    if not isinstance(prompt, str) or (image is not None and not isinstance(image, str)):
        raise JobsFileError(f"{where}: 'prompt' and 'image' must be strings")
    if not prompt.strip() and not image:
        raise JobsFileError(f"{where}: a job needs a 'prompt' or an 'image'")
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise JobsFileError(f"{where}: 'seed' must be an integer, got {seed!r}")
    elevation = entry.get("elevation")
    if elevation is not None and (isinstance(elevation, bool) or not isinstance(elevation, (int, float))):
        raise JobsFileError(f"{where}: 'elevation' must be a number (degrees), got {elevation!r}")
    overrides = entry.get("set") or []
    if isinstance(overrides, dict):  # {key: value} reads better in YAML; values stay YAML
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise JobsFileError(f"{where}: 'set' must be a list of 'key=value' strings or a mapping")
    # Relative files are relative to the jobs file, not to wherever the batch was started.
    resolve = lambda p: str((base / p).resolve()) if p and not Path(p).is_absolute() and (base / p).exists() else p  # noqa: E731
    image = resolve(image)
    scene = resolve(entry.get("scene"))
    name = entry.get("name")
    if name is None:
        name = slugify(prompt if prompt.strip() else Path(image).stem)
        if seed is not None:
            name += f"-seed{seed}"
    name = str(name)
    if not NAME_RE.match(name):
        raise JobsFileError(f"{where}: job name {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '-'")
    return Job(name, prompt, image, elevation, seed, scene, entry.get("negative"), list(overrides), where)


def load_jobs(path: Path) -> list[Job]:
    """Jobs from a text file (a prompt a line; blank lines and '# ...' skipped), a folder of images,
    a YAML list (or {jobs: [...]}) or a JSONL file (an object or a string a line)."""
    path = Path(path)
    if not path.exists():
        raise JobsFileError(f"jobs file {path} does not exist")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        jobs = [_job_from_entry({"image": str(p.resolve())}, f"image {p.name}", path) for p in images]
        if not jobs:
            raise JobsFileError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}): the jobs list is empty")
    elif path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise JobsFileError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if isinstance(data, dict) and "jobs" in data:
            data = data["jobs"]
        if data is None:
            data = []
        if not isinstance(data, list):
            raise JobsFileError(f"{path}: expected a list of jobs (or a mapping with a 'jobs' list), got {type(data).__name__}")
        jobs = [_job_from_entry(entry, f"{path.name} entry {i + 1}", path.parent) for i, entry in enumerate(data)]
    elif path.suffix == ".jsonl":
        jobs = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JobsFileError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
            jobs.append(_job_from_entry(entry, f"{path.name} line {number}", path.parent))
    else:
        lines = path.read_text().splitlines()
        jobs = [
            _job_from_entry(line.strip(), f"{path.name} line {n}", path.parent)
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not jobs:
        raise JobsFileError(f"{path}: the jobs list is empty; put one prompt a line, or a YAML/JSONL list of jobs")
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.name in seen:
            raise JobsFileError(
                f"{path}: {seen[job.name].source} and {job.source} both make job {job.name!r}; "
                "remove one, or give them different 'name' or 'seed' values (YAML/JSONL)"
            )
        seen[job.name] = job
    return jobs


# ----- one job ------------------------------------------------------------------------------------
@dataclass
class JobResult:
    name: str
    status: str  # done | failed | interrupted | skipped (already done before this batch)
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 0
    resumed_from: int | None = None  # checkpoint step the last attempt resumed from
    eval: dict | None = None
    host: str | None = None


def job_state(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "job.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(Path(run_dir) / "job.json", json.dumps(state, indent=2))


def is_finished(run_dir: Path) -> bool:
    return job_state(run_dir).get("status") == "done"


def _cli() -> list[str]:
    return [sys.executable, "-m", "distill3d.engine.cli"]


def job_command(job: Job, recipe: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """The `distill3d generate` command line of a job that has not started yet."""
    cmd = _cli() + ["generate"]
    if job.prompt.strip():
        cmd.append(job.prompt)
    cmd += ["--recipe", recipe, "--out", str(run_dir)]
    if job.image:
        cmd += ["--image", job.image]
    if job.elevation is not None:
        cmd += ["--elevation", str(job.elevation)]
    if job.seed is not None:
        cmd += ["--seed", str(job.seed)]
    if job.scene:
        cmd += ["--scene", job.scene]
    if job.negative:
        cmd += ["--negative", job.negative]
    for text in list(overrides) + job.overrides:
        cmd += ["--set", text]
    return cmd


def _started(run_dir: Path) -> bool:
    """A run (config.yaml) or a staged run (pipeline.yaml) is there: `distill3d resume` continues
    it from its checkpoints, finished stages kept; anything else starts with `generate`."""
    return (run_dir / "config.yaml").exists() or (run_dir / "pipeline.yaml").exists()


def _die_with_parent() -> None:
    """Runs in the child before exec: if the process that started it dies (a killed Ray worker, a
    killed batch), the job dies too instead of writing into a directory its retry is using."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _error_from_log(text: str, returncode: int) -> str:
    lines = text.rstrip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            return "\n".join([line[len("error: "):]] + lines[i + 1:])[-2000:]
    if returncode == 130:  # Ctrl-C: the run stopped at a checkpoint and says where
        stopped = [line for line in lines if line.startswith("stopped at step")]
        return (stopped[-1] if stopped else "interrupted") + "; run the same batch command again to resume"
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exited with code {returncode}"
    tail = "\n".join(lines[-5:])
    return f"the job's process {how}" + (f"; last output:\n{tail}" if tail else "")


def run_job(job: Job, run_dir: Path, recipe: str, overrides: list[str], env: dict[str, str] | None = None) -> JobResult:
    """Run (or resume) one job to its end in a subprocess and record the outcome in RUN/job.json."""
    import socket

    run_dir = Path(run_dir).resolve()
    state = job_state(run_dir)
    if state.get("status") == "done":
        return JobResult(job.name, "skipped", state.get("seconds", 0.0), None, state.get("attempts", 1), state.get("resumed_from"), state.get("eval"), state.get("host"))
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = _started(run_dir)
    cmd = _cli() + ["resume", str(run_dir)] if resuming else job_command(job, recipe, run_dir, overrides)
    attempts = int(state.get("attempts", 0)) + 1
    host = socket.gethostname()
    started = time.time()
    _write_state(run_dir, {"name": job.name, "status": "running", "attempts": attempts, "pid": os.getpid(), "host": host,
                           "started": started, "command": cmd})
    log_path = run_dir / "job.log"
    with open(log_path, "a") as log:
        log.write(f"=== attempt {attempts} on {host} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
    with open(log_path) as fh:
        fh.seek(offset)
        output = fh.read()
    resumed = re.findall(r"^resuming at step (\d+)", output, flags=re.M)
    resumed_from = int(resumed[0]) if resumed else None
    seconds = time.time() - started + (float(state.get("seconds") or 0.0) if resuming else 0.0)
    if proc.returncode == 0:
        status, error = "done", None
    else:
        error = _error_from_log(output, proc.returncode)
        status = "interrupted" if proc.returncode == 130 else "failed"
    from distill3d.engine.pipeline import final_run_dir

    eval_path = final_run_dir(run_dir) / "eval.json"  # a staged run's result is its last stage
    figures = None
    if status == "done" and eval_path.exists():
        data = json.loads(eval_path.read_text())
        figures = {k: data[k] for k in ("psnr", "mask_iou") if k in data}
    _write_state(run_dir, {"name": job.name, "status": status, "attempts": attempts, "host": host, "seconds": round(seconds, 2),
                           "resumed_from": resumed_from, "error": error, "eval": figures, "command": cmd})
    return JobResult(job.name, status, round(seconds, 2), error, attempts, resumed_from, figures, host)


# ----- the batch ----------------------------------------------------------------------------------
@dataclass
class BatchOptions:
    recipe: str
    out: Path
    overrides: list[str] = field(default_factory=list)
    workers: int = 1
    report: bool = True  # write OUT/index.html as jobs end


class BatchState:
    """Every job's record; OUT/summary.json (and the gallery) rewritten whenever one changes."""

    def __init__(self, jobs: list[Job], options: BatchOptions, on_event: Callable[[str, dict], None] | None = None):
        self.options = options
        self.out = Path(options.out).resolve()
        self.lock = threading.Lock()
        self.on_event = on_event
        self.records: dict[str, dict] = {}
        for job in jobs:
            self.records[job.name] = {"name": job.name, "prompt": job.prompt, "image": job.image, "seed": job.seed,
                                      "run_dir": job.name, "status": "pending", "seconds": None, "error": None,
                                      "attempts": 0, "resumed_from": None, "eval": None}
        self.started = time.time()

    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "failed": 0, "pending": 0, "interrupted": 0}
        for r in self.records.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def mark_running(self, name: str, event: str = "running") -> None:
        """`event` "submitted": handed to Ray, which starts it when a worker is free."""
        with self.lock:
            self.records[name]["status"] = "running"
            self._save()
        self._emit(event, self.records[name])

    def mark_result(self, result: JobResult) -> None:
        with self.lock:
            record = self.records[result.name]
            record.update({k: v for k, v in asdict(result).items() if k != "name"})
            record["skipped"] = result.status == "skipped"
            if result.status == "skipped":
                record["status"] = "done"
            self._save()
        self._emit("ended", record)
        if self.options.report:
            from distill3d.engine.report import write_batch_report

            with self.lock:
                write_batch_report(self.out, self.summary(), changed=[result.name])

    def summary(self) -> dict:
        return {"recipe": self.options.recipe, "overrides": self.options.overrides, "started": self.started,
                "updated": time.time(), "counts": self.counts(), "jobs": list(self.records.values())}

    def _save(self) -> None:
        atomic_write_text(self.out / "summary.json", json.dumps(self.summary(), indent=2))

    def _emit(self, event: str, record: dict) -> None:
        if self.on_event is not None:
            self.on_event(event, dict(record))


def visible_gpus() -> list[str]:
    """GPU ids a worker can be pinned to: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable torch CUDA: CPU workers
        return []


def worker_env(slot: int, workers: int, gpus: list[str]) -> dict[str, str]:
    """Worker `slot` gets GPU gpus[slot % len]; on CPU the cores are shared out between workers."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    return {}


def run_local(jobs: list[Job], state: BatchState) -> None:
    """Jobs one after another, or `workers` at a time, each worker pinned to its own GPU if any."""
    options = state.options
    workers = max(1, min(options.workers, len(jobs)))
    gpus = visible_gpus()
    slots = list(range(workers))
    slot_lock = threading.Lock()

    def work(job: Job) -> JobResult:
        with slot_lock:
            slot = slots.pop()
        try:
            state.mark_running(job.name)
            result = run_job(job, state.out / job.name, options.recipe, options.overrides, worker_env(slot, workers, gpus))
        except Exception as exc:  # noqa: BLE001 - a broken job is recorded, the batch goes on
            result = JobResult(job.name, "failed", error=f"{type(exc).__name__}: {exc}")
        state.mark_result(result)  # before this worker takes the next job, so the counts add up
        with slot_lock:
            slots.append(slot)
        return result

    todo = []
    for job in jobs:
        if is_finished(state.out / job.name):
            state.mark_result(run_job(job, state.out / job.name, options.recipe, options.overrides))
        else:
            todo.append(job)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for future in [pool.submit(work, job) for job in todo]:
            future.result()
    finally:
        # Ctrl-C: running jobs got the SIGINT too and stop at a checkpoint; queued ones never start.
        pool.shutdown(wait=True, cancel_futures=True)
