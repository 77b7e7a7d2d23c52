"""The offline coarse-to-fine demo end to end, as a user runs it, scored on the exported GLB.

    python benchmarks/bench_mesh_pipeline.py [--only default|textured-mesh] [--out DIR]

For each reference (the default analytic scene, and a textured GLB built the way the tests build
it), runs `distill3d demo --stages nerf,dmtet --reference REF`, then reloads the exported
mesh.glb from disk and scores it (benchmarks/eval_mesh.py): PSNR and mask IoU over the evaluation
views, Chamfer-L1 against the exact reference surface as a fraction of its bounding-box diagonal.
Targets (issue 4): Chamfer <= 0.02 of the diagonal, PSNR >= 25 dB, whole run <= 10 minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from eval_mesh import evaluate_mesh  # noqa: E402
from machine import machine_description  # noqa: E402


def run_demo(reference: str, out: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "distill3d.engine.cli", "demo", "--stages", "nerf,dmtet", "--reference", reference, "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["default", "textured-mesh"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temporary folder).")
    args = parser.parse_args()
    print(f"machine: {machine_description()}", flush=True)
    root = args.out or Path(tempfile.mkdtemp(prefix="distill3d-mesh-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    references = {"default": "default"}
    if args.only != "default":
        from tests.mesh_fixtures import make_textured_reference

        references["textured-mesh"] = str(make_textured_reference(root / "textured_reference.glb"))
    if args.only is not None:
        references = {args.only: references[args.only]}
    failed = False
    for name, reference in references.items():
        seconds = run_demo(reference, root / name)
        result = evaluate_mesh(root / name / "dmtet")
        nerf_eval = json.loads((root / name / "nerf" / "eval.json").read_text())
        dmtet_eval = json.loads((root / name / "dmtet" / "eval.json").read_text())
        result.update(
            reference=name,
            seconds=round(seconds, 1),
            nerf_psnr=nerf_eval["psnr"],
            dmtet_psnr=dmtet_eval["psnr"],
            dmtet_mask_iou=dmtet_eval["mask_iou"],
        )
        ok = result["chamfer_l1_over_diagonal"] <= 0.02 and result["psnr"] >= 25.0 and seconds <= 600
        failed |= not ok
        print(json.dumps(result, indent=2), flush=True)
        print(f"{name}: {'meets' if ok else 'MISSES'} the targets (Chamfer <= 0.02 diag, GLB PSNR >= 25 dB, <= 600 s)", flush=True)
    print(f"runs kept in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
