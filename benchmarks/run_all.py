"""Run every CPU benchmark in turn (./dev.sh bench). GPU figures: benchmarks/bench_gpu_nerf.py and
`bench_sds_step.py --device cuda` on a CUDA machine.

Each benchmark prints the machine it ran on. Figures are only meaningful on an otherwise idle
machine: other processes competing for the cores slow torch's threads down badly.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ["bench_hash_encoding.py"],
    ["bench_nerf_step.py"],
    ["bench_rasterizer.py"],
    ["bench_sds_step.py"],
    ["bench_mesh_pipeline.py"],  # about 10 minutes: both coarse-to-fine demos, GLBs scored
]


def main() -> int:
    failed = 0
    for args in BENCHMARKS:
        print(f"\n=== {' '.join(args)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / args[0]), *args[1:], *sys.argv[1:]])
        print(f"=== {args[0]}: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
