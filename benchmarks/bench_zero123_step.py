"""Zero123 SDS step benchmark: the zero123 recipe's guidance step (render -> VAE -> UNet on
[uncond; cond] -> SDS loss -> backward), without the NeRF.

The prior is built with random weights, saved in the Zero123Pipeline diffusers layout and loaded
through the same code path as a user's folder (Zero123Prior):
  full  the published Zero123 / Zero123-XL architecture: SD 1.5's UNet with 8 input channels and
        768-d cross-attention (859M parameters), the SD VAE (84M), a CLIP ViT-L/14 image encoder
        (303M; run once for the input view, not per step) and the Linear(772, 768) camera projection;
        image 256, latents 4x32x32.
  tiny  the test-suite's tiny Zero123 (tests/tiny_zero123.py).
The render is a learnable (B, 256, 256, 3) image. Recipe settings (zero123): CFG 3, t in [0.2, 0.85].

    python benchmarks/bench_zero123_step.py                  # CPU: tiny model
    python benchmarks/bench_zero123_step.py --device cuda    # GPU: full architecture, fp16, batch 4 at 256x256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_zero123.py
from machine import machine_description  # noqa: E402

SD15_UNET_8 = dict(
    sample_size=32,
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
    scaling_factor=0.18215,
)
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14,
    projection_dim=768, hidden_act="quick_gelu",
)


def build_full_zero123(folder: Path, device: torch.device) -> Path:
    """The Zero123 architecture with random weights, in the Zero123Pipeline layout (fp16 on CUDA)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_8).to(dtype)
        vae = AutoencoderKL(**SD_VAE).to(dtype)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14)).to(dtype)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    encoder.save_pretrained(folder / "image_encoder")
    del unet, vae, encoder
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    proj = torch.nn.Linear(772, 768)
    (folder / "clip_camera_projection").mkdir(parents=True)
    (folder / "clip_camera_projection" / "config.json").write_text(
        json.dumps({"_class_name": "CLIPCameraProjection", "additional_embeddings": 4, "embedding_dim": 768})
    )
    save_file({"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone()},
              str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Zero123Pipeline"}))
    return folder


def write_input_image(path: Path) -> Path:
    import imageio.v3 as iio
    import numpy as np

    image = np.zeros((256, 256, 4), np.uint8)
    image[60:200, 80:180] = [200, 90, 40, 255]
    iio.imwrite(path, image)
    return path


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, choices=["tiny", "full"], help="default: full on cuda, tiny on cpu")
    parser.add_argument("--resolution", type=int, default=256, help="render size (Zero123: 256)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--fp32", action="store_true", help="no half precision on CUDA")
    parser.add_argument("--attention-slicing", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here; run `python benchmarks/bench_zero123_step.py` for the CPU (tiny model) figure")
    model = args.model or ("full" if device.type == "cuda" else "tiny")

    from distill3d.engine.cameras import CameraSampler, CameraSamplerConfig
    from distill3d.engine.interfaces import BuildContext, RenderOutput
    from distill3d.guidance.sds import SDSConfig, SDSGuidance
    from distill3d.guidance.timesteps import TimestepConfig, sds_loss_from_grad
    from tiny_zero123 import build_tiny_zero123

    print(f"machine: {machine_description(args.device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = build_tiny_zero123(tmp / "model") if model == "tiny" else build_full_zero123(tmp / "model", device)
        build_s = time.perf_counter() - t0
        view = {"image": str(write_input_image(tmp / "input.png")), "elevation": 0.0, "distance": 3.8, "fovy": 20.0}
        spec = {"name": "zero123", "model": str(folder), "attention_slicing": args.attention_slicing, "reference_view": view}
        if args.fp32:
            spec["half_precision"] = False
        ctx = BuildContext(device=device, half_precision=not args.fp32, total_steps=600, run_dir=tmp / "run")
        t0 = time.perf_counter()
        guidance = SDSGuidance(SDSConfig(prior=spec, guidance_scale=args.guidance_scale, timesteps=TimestepConfig(t_min=0.2, t_max=0.85)), ctx)
        load_s = time.perf_counter() - t0
        prior = guidance.prior
        print(
            f"prior: {model} Zero123 (unet {count(prior.unet):.1f}M, vae {count(prior.vae):.1f}M params), {prior.dtype}, image {prior.image_size}, "
            f"built in {build_s:.1f} s, loaded in {load_s:.1f} s; render {args.resolution}x{args.resolution}, batch {args.batch}, CFG {args.guidance_scale:g}",
            flush=True,
        )
        b, r = args.batch, args.resolution
        logits = torch.zeros(b, r, r, 3, device=device).normal_(0, 0.5).requires_grad_(True)
        sampler = CameraSampler(CameraSamplerConfig(elevation=(-10, 80), distance=(3.8, 3.8), fovy=(20, 20)))
        gen = torch.Generator().manual_seed(0)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def step(i):
            cams = sampler.sample(b, i, gen).to(device)
            logits.grad = None
            sync()
            t0 = time.perf_counter()
            rgb = torch.sigmoid(logits)
            out = RenderOutput(rgb=rgb, opacity=torch.ones_like(rgb[..., :1]), depth=torch.ones_like(rgb[..., :1]), background=torch.ones_like(rgb))
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda" and not args.fp32):
                latents = prior.encode_render(out)
                grad = guidance.sds_grad(latents, cams, out, i)
                loss = sds_loss_from_grad(latents, grad)
            loss.backward()
            sync()
            assert logits.grad is not None and torch.isfinite(logits.grad).all()
            return time.perf_counter() - t0

        for i in range(args.warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        totals = [step(args.warmup + i) for i in range(args.steps)]
        result = {
            "model": model, "device": str(device), "machine": machine_description(args.device), "dtype": str(prior.dtype),
            "resolution": r, "batch": b, "steps": args.steps,
            "median_ms": 1e3 * statistics.median(totals), "best_ms": 1e3 * min(totals),
        }
        line = f"Zero123 SDS step: median {result['median_ms']:.1f} ms, best {result['best_ms']:.1f} ms over {args.steps}"
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            line += f"; peak memory {result['peak_memory_gib']:.2f} GiB allocated, {result['peak_reserved_gib']:.2f} GiB reserved"
        print(line, flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
