"""What `distill3d batch` costs over running the same jobs one by one by hand.

    python benchmarks/bench_batch.py [--jobs 4] [--steps 150] [--repeats 2] [--out DIR]

Runs N short oracle jobs (alternating the two shipped scenes, different seeds) twice: as N
`distill3d generate` commands one after another, and as one `distill3d batch --workers 1` of the
same jobs (which also writes summary.json and the gallery as each job ends). Prints both wall
times and the overhead of batch, and the batch's own time outside its job processes (its wall
time minus the jobs' times from job.json); the target (issue 13) is under 5%. With --repeats the two are
alternated and the median of each is used, since a loaded machine makes single timings noisy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_description  # noqa: E402

CLI = [sys.executable, "-m", "distill3d.engine.cli"]


def settings(steps: int) -> list[str]:
    quick = [f"trainer.steps={steps}", "trainer.resolution=32", f"trainer.checkpoint_every={max(steps // 2, 1)}",
             "trainer.eval_views=4", "trainer.eval_resolution=32", "trainer.video_frames=12", "trainer.video_resolution=64"]
    return sum((["--set", s] for s in quick), [])


def jobs(n: int) -> list[dict]:
    scenes = ["default", "two_cylinders"]
    return [{"name": f"job{i}", "prompt": f"oracle job {i}", "scene": scenes[i % 2], "seed": i} for i in range(n)]


def by_hand(job_list: list[dict], out: Path, steps: int) -> float:
    start = time.perf_counter()
    for job in job_list:
        cmd = CLI + ["generate", job["prompt"], "--recipe", "oracle-nerf", "--out", str(out / job["name"]),
                     "--scene", job["scene"], "--seed", str(job["seed"]), *settings(steps)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def driver_seconds(out: Path, wall: float) -> float:
    """The batch's own cost: its wall time minus the time its job processes ran (job.json)."""
    import json

    return wall - sum(json.loads((out / job / "job.json").read_text())["seconds"] for job in (p.name for p in out.iterdir() if p.is_dir()))


def batched(job_list: list[dict], out: Path, steps: int) -> float:
    import yaml

    out.mkdir(parents=True)
    jobs_file = out.parent / f"{out.name}.yaml"
    jobs_file.write_text(yaml.safe_dump(job_list))
    start = time.perf_counter()
    cmd = CLI + ["batch", str(jobs_file), "--recipe", "oracle-nerf", "--out", str(out), "--workers", "1", *settings(steps)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temporary folder).")
    args = parser.parse_args()
    print(f"machine: {machine_description()}", flush=True)
    root = args.out or Path(tempfile.mkdtemp(prefix="distill3d-batch-bench-"))
    job_list = jobs(args.jobs)
    hand, batch, driver = [], [], []
    for r in range(args.repeats):
        order = [("hand", by_hand), ("batch", batched)] if r % 2 == 0 else [("batch", batched), ("hand", by_hand)]
        for name, fn in order:
            seconds = fn(job_list, root / f"{name}{r}", args.steps)
            (hand if name == "hand" else batch).append(seconds)
            extra = ""
            if name == "batch":
                driver.append(driver_seconds(root / f"batch{r}", seconds))
                extra = f" (of which the batch itself, outside its jobs: {driver[-1]:.1f} s)"
            print(f"repeat {r}: {name:5s} {seconds:7.1f} s{extra}", flush=True)
    h, b = statistics.median(hand), statistics.median(batch)
    overhead = (b - h) / h
    print(f"{args.jobs} oracle jobs of {args.steps} steps: by hand {h:.1f} s, batch {b:.1f} s (median of {args.repeats}); "
          f"batch overhead {100 * overhead:+.1f}% of wall time (target < 5%)")
    d = statistics.median(driver)
    print(f"the batch's own time outside its jobs (start-up, summary, gallery): {d:.1f} s = {100 * d / h:.1f}% of the by-hand wall time "
          "(less sensitive to load than the difference of two noisy totals)")
    print(f"runs in {root}")
    return 0 if overhead < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
