"""Tiny random-weight Zero123 folders in both public diffusers layouts, built offline.

  build_tiny_zero123(dir, layout="Zero123Pipeline" | "Zero1to3StableDiffusionPipeline")
      unet/ (UNet2DConditionModel, 8 input channels, cross-attention 32), vae/ (2 blocks: image 32,
      latent 4x16x16), image_encoder/ (CLIPVisionModelWithProjection, 32x32 input, 32-d embeds),
      feature_extractor/preprocessor_config.json, scheduler/ (DDIM as Zero123 ships it), and the
      camera projection Linear(36, 32): clip_camera_projection/ with proj.* weights (safetensors)
      or cc_projection/ with projection.* weights (a pickled .bin, as kxic's folders have).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROJECTIONS = {
    "Zero123Pipeline": ("clip_camera_projection", "proj", "CLIPCameraProjection"),
    "Zero1to3StableDiffusionPipeline": ("cc_projection", "projection", "CCProjection"),
}


def build_tiny_zero123(folder: str | Path, layout: str = "Zero123Pipeline", seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dim = 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, projection_dim=dim
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    encoder.save_pretrained(folder / "image_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "feature_extractor").mkdir(exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "crop_size": 32})
    )
    sub, prefix, cls = PROJECTIONS[layout]
    linear = torch.nn.Linear(dim + 4, dim)
    state = {f"{prefix}.weight": linear.weight.detach().clone(), f"{prefix}.bias": linear.bias.detach().clone()}
    (folder / sub).mkdir(exist_ok=True)
    if layout == "Zero123Pipeline":
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": cls, "additional_embeddings": 4, "embedding_dim": dim}))
        save_file(state, str(folder / sub / "diffusion_pytorch_model.safetensors"))
    else:
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": cls, "in_channel": dim + 4, "out_channel": dim}))
        torch.save(state, folder / sub / "diffusion_pytorch_model.bin")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": layout,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                sub: ["zero123" if layout == "Zero123Pipeline" else "pipeline_zero1to3", cls],
            }
        )
    )
    return folder
