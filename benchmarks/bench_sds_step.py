"""SDS step benchmark: the dreamfusion-sd guidance step (render -> prior -> SDS loss -> backward).

The prior is built with random weights and saved to a temporary folder, then loaded through the
same code path as a user's model (StableDiffusionPrior / DeepFloydIFPrior from a folder):
  tiny       the test-suite's tiny SD (UNet (32, 64), VAE (32, 64); image 32, latents 4x16x16)
  sd21-base  the published Stable Diffusion 2.1-base architecture (UNet 866M parameters, VAE 84M;
             image 512, latents 4x64x64). Its text encoder is reduced to one layer of the real
             width (1024): text embeddings are computed once and cached, so the encoder plays no
             part in a step.
  tiny-if    the test-suite's tiny DeepFloyd IF (pixel space).
The render is a learnable (B, H, W, 3) image (the NeRF is not part of this measurement). One step:
encode (VAE with gradient, or resize for IF), one batched UNet call [uncond; cond] (or Perp-Neg's
[uncond; pos; negs]), w(t)(eps_hat - eps), target-trick loss, backward to the render.
Recipe settings (dreamfusion-sd): render 64x64, batch 1, CFG 100, t in [0.02, 0.98], weighting sds.

    python benchmarks/bench_sds_step.py                  # CPU: tiny prior
    python benchmarks/bench_sds_step.py --device cuda    # GPU: SD 2.1-base architecture, fp16
    python benchmarks/bench_sds_step.py --device cuda --perp-neg --batch 4
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_models.py (the test-suite's model builders)

SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
    upcast_attention=False,
)
SD21_BASE_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD21_BASE_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def build_sd21_base(folder: Path, device: torch.device) -> Path:
    """SD 2.1-base UNet + VAE from the published configs, random weights (saved in fp16 on CUDA)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import write_clip_tokenizer

    torch.manual_seed(0)
    save_dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # random init on the GPU is much faster
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        vae = AutoencoderKL(**SD21_BASE_VAE)
    if save_dtype != torch.float32:  # half the bytes to write and read back
        unet, vae = unet.to(save_dtype), vae.to(save_dtype)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    del unet, vae
    vocab = write_clip_tokenizer(folder / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                       max_position_embeddings=77, hidden_act="gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    )
    text.save_pretrained(folder / "text_encoder")
    PNDMScheduler(**SD21_BASE_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, choices=["tiny", "sd21-base", "tiny-if"], help="default: sd21-base on cuda, tiny on cpu")
    parser.add_argument("--resolution", type=int, default=64, help="render size (recipe: 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=100.0)
    parser.add_argument("--perp-neg", action="store_true", help="Perp-Neg guidance (2 to 4 prompts per view in the UNet batch)")
    parser.add_argument("--fp32", action="store_true", help="no half precision on CUDA")
    parser.add_argument("--attention-slicing", action="store_true")
    parser.add_argument("--vae-slicing", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    model = args.model or ("sd21-base" if device.type == "cuda" else "tiny")

    from distill3d.engine.cameras import CameraSampler
    from distill3d.engine.interfaces import BuildContext, RenderOutput
    from distill3d.guidance.perp_neg import PerpNegSDSConfig, PerpNegSDSGuidance
    from distill3d.guidance.sds import SDSConfig, SDSGuidance
    from distill3d.guidance.timesteps import sds_loss_from_grad
    from tiny_models import build_tiny_if, build_tiny_sd

    print(f"machine: {machine_description(args.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if model == "tiny":
            folder, prior_name = build_tiny_sd(tmp / "model"), "stable-diffusion"
        elif model == "tiny-if":
            folder, prior_name = build_tiny_if(tmp / "model"), "deepfloyd-if"
        else:
            folder, prior_name = build_sd21_base(tmp / "model", device), "stable-diffusion"
        build_s = time.perf_counter() - t0
        ctx = BuildContext(device=device, half_precision=not args.fp32, total_steps=10000, prompt="a delicious hamburger", negative_prompt="", cache_dir=tmp / "cache")
        prior_spec = {"name": prior_name, "model": str(folder), "attention_slicing": args.attention_slicing}
        if prior_name == "stable-diffusion":
            prior_spec["vae_slicing"] = args.vae_slicing
        if args.fp32:
            prior_spec["half_precision"] = False
        t0 = time.perf_counter()
        if args.perp_neg:
            guidance = PerpNegSDSGuidance(PerpNegSDSConfig(prior=prior_spec, guidance_scale=args.guidance_scale), ctx)
        else:
            guidance = SDSGuidance(SDSConfig(prior=prior_spec, guidance_scale=args.guidance_scale), ctx)
        load_s = time.perf_counter() - t0
        prior = guidance.prior
        nets = {"unet": count(prior.unet)}
        if hasattr(prior, "vae"):
            nets["vae"] = count(prior.vae)
        print(
            f"prior: {model} ({', '.join(f'{k} {v:.1f}M params' for k, v in nets.items())}), {prior.dtype}, image {prior.image_size}, "
            f"built in {build_s:.1f} s, loaded in {load_s:.1f} s; render {args.resolution}x{args.resolution}, batch {args.batch}, "
            f"{'Perp-Neg' if args.perp_neg else 'CFG'} {args.guidance_scale:g}"
        )

        b, r = args.batch, args.resolution
        logits = torch.zeros(b, r, r, 3, device=device).normal_(0, 0.5).requires_grad_(True)
        sampler = CameraSampler()
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
            out = RenderOutput(rgb=rgb, opacity=torch.ones_like(rgb[..., :1]), depth=torch.ones_like(rgb[..., :1]), background=torch.zeros_like(rgb))
            latents = prior.encode_images(out.rgb_bchw())
            sync()
            t1 = time.perf_counter()
            grad = guidance.sds_grad(latents, cams, out, i)
            sync()
            t2 = time.perf_counter()
            loss = sds_loss_from_grad(latents, grad)
            loss.backward()
            sync()
            t3 = time.perf_counter()
            assert logits.grad is not None and torch.isfinite(logits.grad).all()
            return t3 - t0, (t1 - t0, t2 - t1, t3 - t2)

        for i in range(args.warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        totals, phases = [], []
        for i in range(args.steps):
            total, ph = step(args.warmup + i)
            totals.append(total)
            phases.append(ph)
        result = {
            "model": model,
            "device": str(device),
            "machine": machine_description(args.device),
            "dtype": str(prior.dtype),
            "resolution": r,
            "batch": b,
            "perp_neg": args.perp_neg,
            "steps": args.steps,
            "median_ms": 1e3 * statistics.median(totals),
            "best_ms": 1e3 * min(totals),
            "phases_median_ms": {
                k: 1e3 * statistics.median(p[j] for p in phases) for j, k in enumerate(("encode", "unet+sds_grad", "loss+backward"))
            },
        }
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        ph = ", ".join(f"{k} {v:.1f}" for k, v in result["phases_median_ms"].items())
        line = f"SDS step: median {result['median_ms']:.1f} ms, best {result['best_ms']:.1f} ms over {args.steps} (median phases ms: {ph})"
        if device.type == "cuda":
            line += f"; peak memory {result['peak_memory_gib']:.2f} GiB allocated, {result['peak_reserved_gib']:.2f} GiB reserved"
        print(line)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
