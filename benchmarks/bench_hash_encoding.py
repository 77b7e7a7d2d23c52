"""Pure-torch multiresolution hash encoding: forward and forward+backward throughput.

2^16 random points in [0, 1]^3 through the default HashEncodingConfig (16 levels x 2 features,
2^19 rows per level, resolutions 16 -> 2048), gradient into the table (and, with --x-grad, into
the points as well). Prints the machine and the best and median points/s over repeated runs after
a warm-up. The project's target on the 2-core CPU machine is >= 0.25 M points/s forward+backward.

    python benchmarks/bench_hash_encoding.py                  # CPU, torch's thread count
    python benchmarks/bench_hash_encoding.py --threads 1
    python benchmarks/bench_hash_encoding.py --device cuda --points 1048576

Timings on a shared machine are noisy: the load average is printed, and after each line how
many cores other processes kept busy during its timed runs; the best run is the figure least
disturbed by them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

from distill3d.representations.nerf.hash_encoding import HashEncodingConfig, hash_encode_torch


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far; None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(fields) - fields[3] - fields[4]) / hz, t.user + t.system


def measure(fn, sync, warmup: int, repeats: int) -> tuple[list[float], float | None]:
    """Wall times of `repeats` runs, and how many cores other processes kept busy meanwhile."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    before, start_all = busy_seconds(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    after, elapsed = busy_seconds(), time.perf_counter() - start_all
    others = None
    if before and after:
        others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / elapsed
    return times, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=1 << 16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--x-grad", action="store_true", help="also time forward+backward with x.requires_grad (analytic normals)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    config = HashEncodingConfig()
    print("machine:", machine_description(str(device)))
    print(f"config:  {config}")
    print(f"points:  {args.points}, device {device}, {args.warmup} warm-up + {args.repeats} timed runs each")

    gen = torch.Generator().manual_seed(0)
    table_rows = config.levels << config.log2_table_size
    table = torch.empty(table_rows, config.features).uniform_(-config.init_std, config.init_std, generator=gen)
    table = torch.nn.Parameter(table.to(device))
    x = torch.rand(args.points, 3, generator=gen).to(device)
    grad_out = torch.randn(args.points, config.levels * config.features, generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward():
        with torch.no_grad():
            hash_encode_torch(x, table, config)

    def forward_backward():
        hash_encode_torch(x, table, config).backward(grad_out)
        table.grad = None  # as optimizer.zero_grad() does

    xg = x.clone().requires_grad_()

    def forward_backward_x():
        hash_encode_torch(xg, table, config).backward(grad_out)
        table.grad = None
        xg.grad = None

    cases = [("forward", forward), ("forward+backward", forward_backward)]
    if args.x_grad:
        cases.append(("forward+backward, x grad too", forward_backward_x))
    for name, fn in cases:
        times, others = measure(fn, sync, args.warmup, args.repeats)
        best, median = min(times), statistics.median(times)
        print(
            f"{name:30s} best {args.points / best / 1e6:6.3f} M points/s ({best * 1e3:7.1f} ms)   "
            f"median {args.points / median / 1e6:6.3f} M points/s ({median * 1e3:7.1f} ms)"
            + ("" if others is None else f"   [other processes busy: {others:.2f} cores]")
        )


if __name__ == "__main__":
    main()
