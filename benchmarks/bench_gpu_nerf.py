"""GPU figures for the fused NeRF kernels: torch backend vs Triton (and tiny-cuda-nn / nerfacc).

One command, from the repository root on a CUDA machine:

    python benchmarks/bench_gpu_nerf.py            # add --json out.json to keep the numbers

It prints the device name and versions, then, each against the torch backend in the same run:

1. Hash encoding forward + backward (table gradient), 2^20 points, 16 levels x 2 features,
   table 2^19: points/s for torch, triton, tcnn (if importable). Target: triton >= 10x torch.
   Also the analytic-normals variant (gradient into x as well).
2. A NeRF training step, 128 x 128, batch 4 (65,536 rays; sphere bounds, 64 samples per ray,
   64^3 occupancy grid, march + hash encoding + 2x64 MLP + composite + backward, no prior):
   ms/step with every op on torch vs every op on triton. Target: >= 5x faster. The same step
   through the engine's HashGridNeRF.render is timed too when it can be built.
3. With diffusers installed: a DreamFusion-SD step with random-weight full-size Stable Diffusion
   1.5 (UNet + VAE, fp16): render 64 x 64 x 4 views, upsample to 512, VAE-encode, UNet with CFG,
   SDS gradient, backward. Reports the rendering (+ its backward) share of the step. Target:
   at most 15%.

Without CUDA it says so, runs a tiny Triton-interpreter smoke test against torch, and exits 0.
Works from a plain checkout: if `distill3d` is not installed it is imported from this tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_distill3d() -> None:
    """Import distill3d from this checkout when it is not installed (editable installs map it)."""
    try:
        import distill3d.engine.backends  # noqa: F401

        return
    except ImportError:
        pass
    package = types.ModuleType("distill3d")
    package.__path__ = []
    sys.modules["distill3d"] = package
    for sub in ("engine", "representations", "guidance", "plugins"):
        init = ROOT / sub / "__init__.py"
        if not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"distill3d.{sub}", init, submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"distill3d.{sub}"] = module
        spec.loader.exec_module(module)
        setattr(package, sub, module)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


DEVICE = torch.device("cuda")  # --cpu-dry-run switches every section to tiny CPU runs


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of fn() (CUDA events on the current stream; wall clock on CPU)."""
    if DEVICE.type != "cuda":
        fn()
        times = []
        for _ in range(max(1, min(iters, 2))):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def backend_fn(op: str, name: str):
    """resolve_op, except that a CPU dry run may call the Triton kernels directly (interpreter)."""
    from distill3d.engine.backends import BackendUnavailable, resolve_op

    try:
        return resolve_op(op, name, DEVICE)
    except BackendUnavailable:
        if DEVICE.type == "cpu" and name == "triton":
            from distill3d.representations.nerf import triton_kernels as tk

            if tk.interpreter_active():
                return {"hash_encoding": tk.hash_encode_triton, "composite": tk.composite_triton, "march": tk.march_triton}[op]
        raise


def versions() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "nerfacc", "tinycudann", "diffusers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # tinycudann raises EnvironmentError without CUDA
            info[name] = f"unavailable ({type(exc).__name__})"
    return info


# --------------------------------------------------------------------------------------------------
# 1. Hash encoding
# --------------------------------------------------------------------------------------------------


def bench_hash(results: dict, n_points: int, iters: int) -> None:
    from distill3d.engine.backends import BackendUnavailable
    from distill3d.representations.nerf.hash_encoding import HashEncodingConfig

    device = DEVICE
    log2_t = 19 if device.type == "cuda" else 12
    config = HashEncodingConfig(levels=16, features=2, log2_table_size=log2_t, base_resolution=16)
    table = torch.nn.Parameter(torch.empty((1 << log2_t) * 16, 2, device=device).uniform_(-1e-4, 1e-4))
    x = torch.rand(n_points, 3, device=device)
    grad = torch.randn(n_points, 32, device=device)
    print(f"\n[1] hash encoding fwd+bwd: {n_points:,} points, 16 levels x 2, table 2^{log2_t}")
    rows = {}
    for name in ("torch", "triton", "tcnn"):
        try:
            encode = backend_fn("hash_encoding", name)
        except BackendUnavailable as exc:
            print(f"  {name:7s} skipped: {exc}")
            continue
        for with_x in (False, True):
            xin = x.clone().requires_grad_(with_x)

            def step():
                table.grad = None
                out = encode(xin, table, config)
                out.backward(grad)

            try:
                seconds = cuda_time(step, iters=iters)
            except Exception as exc:  # report and go on (e.g. a tcnn build mismatch)
                print(f"  {name:7s} failed: {type(exc).__name__}: {exc}")
                break
            key = f"{name}{'+x' if with_x else ''}"
            rows[key] = {"ms": seconds * 1e3, "points_per_s": n_points / seconds}
    base = rows.get("torch")
    for key, row in rows.items():
        ref = rows.get("torch+x" if key.endswith("+x") else "torch")
        speedup = ref["ms"] / row["ms"] if ref else float("nan")
        note = "  (grad into x too)" if key.endswith("+x") else ""
        print(f"  {key:9s} {row['ms']:9.2f} ms  {row['points_per_s'] / 1e6:9.1f} M points/s  {speedup:6.1f}x torch{note}")
    if base and "triton" in rows:
        speedup = base["ms"] / rows["triton"]["ms"]
        print(f"  target triton >= 10x torch: {'MET' if speedup >= 10 else 'NOT MET'} ({speedup:.1f}x)")
    results["hash_encoding"] = rows


# --------------------------------------------------------------------------------------------------
# 2. NeRF training step
# --------------------------------------------------------------------------------------------------


def orbit_rays(batch: int, height: int, width: int, distance: float = 3.0, fovy_deg: float = 40.0):
    """Rays of `batch` cameras on a circle around the origin, looking at it."""
    device = DEVICE
    az = torch.linspace(0, 2 * math.pi, batch + 1, device=device)[:-1]
    elev = torch.full_like(az, math.radians(15.0))
    eye = torch.stack([torch.cos(elev) * torch.sin(az), torch.sin(elev), torch.cos(elev) * torch.cos(az)], -1) * distance
    forward = torch.nn.functional.normalize(-eye, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(forward, torch.tensor([0.0, 1.0, 0.0], device=device).expand_as(forward), dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    tan = math.tan(math.radians(fovy_deg) / 2)
    v, u = torch.meshgrid(torch.linspace(1, -1, height, device=device), torch.linspace(-1, 1, width, device=device), indexing="ij")
    d = forward[:, None, None] + (u * tan * width / height)[None, ..., None] * right[:, None, None] + (v * tan)[None, ..., None] * up[:, None, None]
    dirs = torch.nn.functional.normalize(d, dim=-1).reshape(-1, 3)
    origins = eye[:, None, None].expand(-1, height, width, -1).reshape(-1, 3)
    return origins.contiguous(), dirs.contiguous()


class BenchField(torch.nn.Module):
    """HashGridNeRF's field: 16x2 hash grid (16 -> 2048), 2x64 ReLU MLP, softplus density + blob."""

    def __init__(self):
        super().__init__()
        from distill3d.representations.nerf.hash_encoding import HashEncodingConfig, per_level_scale_for

        self.config = HashEncodingConfig(levels=16, features=2, log2_table_size=19, base_resolution=16, per_level_scale=per_level_scale_for(16, 2048, 16))
        self.table = torch.nn.Parameter(torch.empty((1 << 19) * 16, 2).uniform_(-1e-4, 1e-4))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def forward(self, encode, points):
        h = self.mlp(encode((points + 1) * 0.5, self.table, self.config))
        blob = 10.0 * (1 - points.norm(dim=-1) / 0.5)
        return torch.nn.functional.softplus(h[:, 0] + blob), torch.sigmoid(h[:, 1:])


def bench_nerf_step(results: dict, iters: int, height: int = 128, width: int = 128, batch: int = 4, samples_per_ray: int = 64) -> None:
    from distill3d.engine.backends import BackendUnavailable
    from distill3d.representations.nerf.occupancy import OccupancyConfig, OccupancyGrid
    from distill3d.representations.nerf.rendering import ray_sphere_bounds

    device = DEVICE
    torch.manual_seed(0)
    field = BenchField().to(device)
    origins, dirs = orbit_rays(batch, height, width)
    near, far, _ = ray_sphere_bounds(origins, dirs, 1.0)
    grid = OccupancyGrid(OccupancyConfig(resolution=64), radius=1.0).to(device)
    centres = (torch.stack(torch.meshgrid(*(torch.arange(64, device=device),) * 3, indexing="ij"), -1) + 0.5) / 64 * 2 - 1
    grid.occupied.copy_(centres.norm(dim=-1) < 0.6)  # a trained object's grid: a ball of radius 0.6
    target = torch.rand(origins.shape[0], 3, device=device)
    print(f"\n[2] NeRF training step: {batch} x {height} x {width} rays, {samples_per_ray} samples/ray, 64^3 grid ({grid.occupied_fraction():.0%} occupied)")
    rows = {}
    for name in ("torch", "triton"):
        try:
            ops = {op: backend_fn(op, name) for op in ("march", "hash_encoding", "composite")}
        except BackendUnavailable as exc:
            print(f"  {name:7s} skipped: {exc}")
            continue
        n_samples = []

        def step():
            field.zero_grad(set_to_none=True)
            samples = ops["march"](origins, dirs, near, far, samples_per_ray, grid, True)
            idx = samples.ray_indices
            points = origins[idx] + dirs[idx] * samples.t_mid[:, None]
            sigma, rgb = field(ops["hash_encoding"], points)
            out = ops["composite"](sigma, rgb, samples)
            loss = (out.rgb - target).square().mean() + 1e-3 * out.opacity.mean()
            loss.backward()
            n_samples.append(idx.numel())

        seconds = cuda_time(step, iters=iters)
        rows[name] = {"ms_per_step": seconds * 1e3, "samples": n_samples[-1]}
    for name, row in rows.items():
        speedup = rows["torch"]["ms_per_step"] / row["ms_per_step"] if "torch" in rows else float("nan")
        print(f"  {name:7s} {row['ms_per_step']:9.2f} ms/step  ({row['samples']:,} samples)  {speedup:6.1f}x torch")
    if "torch" in rows and "triton" in rows:
        speedup = rows["torch"]["ms_per_step"] / rows["triton"]["ms_per_step"]
        print(f"  target triton >= 5x torch: {'MET' if speedup >= 5 else 'NOT MET'} ({speedup:.1f}x)")
    results["nerf_step"] = rows
    bench_engine_model(results, iters, height, width, batch)


def _engine_model(backend: str):
    from distill3d.engine.interfaces import BuildContext
    from distill3d.representations.nerf.model import HashGridNeRF, NeRFConfig

    config = NeRFConfig(hash_encoding_backend=backend, composite_backend=backend, march_backend=backend)
    model = HashGridNeRF(config, BuildContext(device=DEVICE, total_steps=1000))
    g = model.occupancy.occupied.shape[0]
    centres = (torch.stack(torch.meshgrid(*(torch.arange(g, device=DEVICE),) * 3, indexing="ij"), -1) + 0.5) / g * 2 - 1
    model.occupancy.occupied.copy_(centres.norm(dim=-1) < 0.6)
    model.occupancy.initialized.fill_(True)
    return model


def bench_engine_model(results: dict, iters: int, height: int, width: int, batch: int) -> None:
    """The same step through the engine's HashGridNeRF.render (best effort: its API may move)."""
    rows = {}
    for backend in ("torch", "triton"):
        try:
            from distill3d.engine.cameras import orbit_cameras
            from distill3d.engine.interfaces import RenderSettings

            cameras = orbit_cameras(batch)
            cameras = cameras.to(DEVICE) if hasattr(cameras, "to") else cameras
            settings = RenderSettings(height=height, width=width, shading="albedo", training=True)
            model = _engine_model(backend)

            def step():
                model.zero_grad(set_to_none=True)
                out = model.render(cameras, settings)
                (out.rgb.square().mean() + 1e-3 * out.opacity.mean()).backward()

            rows[backend] = {"ms_per_step": cuda_time(step, iters=iters) * 1e3}
            print(f"  engine HashGridNeRF.render + backward, {backend:6s}: {rows[backend]['ms_per_step']:9.2f} ms/step")
        except Exception as exc:
            print(f"  engine HashGridNeRF step with {backend} skipped: {type(exc).__name__}: {exc}")
    if len(rows) == 2:
        print(f"  engine step speedup: {rows['torch']['ms_per_step'] / rows['triton']['ms_per_step']:.1f}x")
    results["engine_nerf_step"] = rows


# --------------------------------------------------------------------------------------------------
# 3. DreamFusion-SD step share
# --------------------------------------------------------------------------------------------------


def bench_sds_share(results: dict, iters: int, render_res: int = 64, batch: int = 4) -> None:
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except Exception as exc:
        print(f"\n[3] DreamFusion-SD step skipped: diffusers is not importable ({type(exc).__name__})")
        return
    from distill3d.representations.nerf.occupancy import OccupancyConfig, OccupancyGrid
    from distill3d.representations.nerf.rendering import ray_sphere_bounds

    device = DEVICE
    full = device.type == "cuda"
    dtype = torch.float16 if full else torch.float32
    size = 512 if full else 64  # image size the VAE sees (latents size / 8)
    width = 768 if full else 32
    what = "random-weight SD 1.5 UNet + VAE (fp16)" if full else "tiny random SD (CPU dry run)"
    print(f"\n[3] DreamFusion-SD step: {what}, {batch} views at {render_res}^2 -> {size}^2")
    with torch.device(device):
        if full:
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
            )
        unet = unet.to(dtype).eval().requires_grad_(False)
        vae = vae.to(dtype).eval().requires_grad_(False)
    text = torch.randn(2 * batch, 77, width, device=device, dtype=dtype)
    alphas = torch.linspace(0.9991, 0.0047, 1000, device=device)  # SD's alphas_cumprod, roughly

    field = BenchField().to(device)
    origins, dirs = orbit_rays(batch, render_res, render_res)
    near, far, _ = ray_sphere_bounds(origins, dirs, 1.0)
    grid = OccupancyGrid(OccupancyConfig(resolution=64), radius=1.0).to(device)
    centres = (torch.stack(torch.meshgrid(*(torch.arange(64, device=device),) * 3, indexing="ij"), -1) + 0.5) / 64 * 2 - 1
    grid.occupied.copy_(centres.norm(dim=-1) < 0.6)

    rows = {}
    for name in ("torch", "triton"):
        try:
            ops = {op: backend_fn(op, name) for op in ("march", "hash_encoding", "composite")}
        except Exception as exc:
            print(f"  {name:7s} skipped: {exc}")
            continue

        def render():
            s = ops["march"](origins, dirs, near, far, 64, grid, True)
            pts = origins[s.ray_indices] + dirs[s.ray_indices] * s.t_mid[:, None]
            sigma, rgb = field(ops["hash_encoding"], pts)
            out = ops["composite"](sigma, rgb, s)
            image = out.rgb + (1 - out.opacity)  # white background
            return image.view(batch, render_res, render_res, 3).permute(0, 3, 1, 2)

        def render_only():
            field.zero_grad(set_to_none=True)
            render().square().mean().backward()

        def full_step():
            field.zero_grad(set_to_none=True)
            image = render()
            up = torch.nn.functional.interpolate(image, (size, size), mode="bilinear", align_corners=False)
            latents = vae.encode((up * 2 - 1).to(dtype)).latent_dist.sample() * 0.18215
            t = torch.randint(20, 980, (batch,), device=device)
            noise = torch.randn_like(latents)
            a = alphas[t].view(-1, 1, 1, 1).to(dtype)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            with torch.no_grad():
                eps = unet(torch.cat([noisy] * 2), torch.cat([t] * 2), encoder_hidden_states=text).sample
                eps_uncond, eps_text = eps.chunk(2)
                grad = (1 - a) * (eps_uncond + 100.0 * (eps_text - eps_uncond) - noise)
            (latents.float() * grad.float()).sum().backward()

        r = cuda_time(render_only, iters=iters)
        f = cuda_time(full_step, warmup=2, iters=max(3, iters // 2))
        rows[name] = {"render_ms": r * 1e3, "step_ms": f * 1e3, "render_share": r / f}
        print(f"  {name:7s} step {f * 1e3:8.1f} ms, rendering+backward {r * 1e3:7.2f} ms = {r / f:5.1%} of the step")
    if "triton" in rows:
        share = rows["triton"]["render_share"]
        print(f"  target rendering+backward <= 15% of the step: {'MET' if share <= 0.15 else 'NOT MET'} ({share:.1%})")
    results["sds_step"] = rows


# --------------------------------------------------------------------------------------------------
# CPU: interpreter smoke test
# --------------------------------------------------------------------------------------------------


def cpu_smoke() -> None:
    from distill3d.representations.nerf import triton_kernels as tk
    from distill3d.representations.nerf.hash_encoding import HashEncodingConfig, hash_encode_torch
    from distill3d.representations.nerf.rendering import Samples, composite_torch, march_torch

    if not tk.interpreter_active():
        print("Triton interpreter not active (triton missing, or imported before TRITON_INTERPRET=1): nothing to run.")
        return
    t0 = time.time()
    config = HashEncodingConfig(levels=4, features=2, log2_table_size=10, base_resolution=4, per_level_scale=2.0)
    x = torch.rand(256, 3)
    table = torch.randn((1 << 10) * 4, 2)
    err_hash = (tk.hash_encode_triton(x, table, config) - hash_encode_torch(x, table, config)).abs().max().item()
    counts = torch.tensor([3, 0, 7, 1, 12])
    idx = torch.repeat_interleave(torch.arange(5), counts)
    samples = Samples(idx, torch.rand(idx.numel()) * 3, torch.rand(idx.numel()) * 0.2, 5)
    sig, rgb = torch.rand(idx.numel()) * 5, torch.rand(idx.numel(), 3)
    err_comp = (tk.composite_triton(sig, rgb, samples).rgb - composite_torch(sig, rgb, samples).rgb).abs().max().item()
    o, d = torch.zeros(8, 3) + torch.tensor([0, 0, 2.5]), torch.nn.functional.normalize(torch.randn(8, 3) * 0.2 + torch.tensor([0, 0, -1.0]), dim=-1)
    near, far = torch.full((8,), 1.5), torch.full((8,), 3.5)
    torch.manual_seed(0)
    a = tk.march_triton(o, d, near, far, 16, None, True)
    torch.manual_seed(0)
    b = march_torch(o, d, near, far, 16, None, True)
    same = torch.equal(a.t_mid, b.t_mid) and torch.equal(a.ray_indices, b.ray_indices)
    print(f"interpreter smoke test ({time.time() - t0:.1f} s): hash max err {err_hash:.2e}, composite max err {err_comp:.2e}, march identical: {same}")


def dry_run(args) -> int:
    """Every section at toy sizes on CPU: checks the benchmark code, not the speed."""
    global DEVICE
    DEVICE = torch.device("cpu")
    if args.iters == 10:
        args.iters = 1
    print("CPU dry run: toy sizes, timings meaningless; the triton rows run through the interpreter"
          " and are only offered when engine.backends has auto_devices")
    results: dict = {"device": "cpu (dry run)"}
    bench_hash(results, min(args.points, 256), args.iters)
    bench_nerf_step(results, args.iters, height=8, width=8, batch=2, samples_per_ray=8)
    if not args.no_sd:
        bench_sds_share(results, args.iters, render_res=8, batch=2)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1 << 20, help="hash encoding points (default 2^20)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--no-sd", action="store_true", help="skip the Stable Diffusion step")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every section tiny on CPU (torch + Triton interpreter) to check the script itself")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the interpreter
    _import_distill3d()
    if args.cpu_dry_run:
        return dry_run(args)
    info = versions()
    device_name = torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)"
    print(f"device: {device_name}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if not cuda:
        print("No CUDA device: the GPU benchmark needs one. Running the Triton interpreter smoke test instead.")
        cpu_smoke()
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 is set, Triton kernels run through the interpreter; unset it for figures")
    torch.backends.cuda.matmul.allow_tf32 = True  # same MLP precision on both sides
    results: dict = {"device": device_name, "versions": info}
    bench_hash(results, args.points, args.iters)
    bench_nerf_step(results, args.iters)
    if not args.no_sd:
        bench_sds_share(results, args.iters)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
