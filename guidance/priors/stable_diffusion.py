"""Stable Diffusion as a score-distillation prior (registry name `stable-diffusion`).

Any Stable-Diffusion-architecture model in diffusers format, by hub id or local folder: SD 1.5,
SD 2.1-base (the default) and SD 2.1 (v-prediction; its output is converted to noise). Components
are loaded one by one (UNet2DConditionModel, AutoencoderKL, the scheduler's config for the noise
schedule and prediction type, CLIPTextModel + CLIPTokenizer); see loading.py for how a model is
found and the errors when it is not.

- Precision: fp16 on CUDA (turn off with half_precision: false), fp32 on CPU.
- Text: every prompt the run needs (the prompt, "<prompt>, <direction> view" for front, side, back
  and overhead, the negative prompt and its per-view variants) is encoded once, cached on disk
  (text_embeddings.py) and the text encoder is released before the UNet and VAE are loaded.
- conditions(): per camera, the view-dependent prompt embedding (view_dependent_prompts: true) or
  the plain prompt; the unconditional branch is the negative prompt (+ its per-view extra text).
- encode_images(): resize the render to image_size (512 for SD 2.1-base), map to [-1, 1], VAE
  encode with gradient (a posterior sample), scale by the VAE's scaling factor (0.18215).
  rgb_as_latents: the render itself is the latent, resized to the latent size (an RGB render
  gets its opacity as the 4th channel, as stable-dreamfusion's latent mode does).
- view_conditions() serves Perp-Neg (guidance/perp_neg.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import BuildContext, Condition, Prior, RenderOutput
from distill3d.guidance.priors.loading import (
    Component,
    ModelLayout,
    OOMAdvice,
    PriorError,
    call_quietly,
    load_component,
    oom_guard,
    pick_dtype,
    resolve_model,
    source_with_weights,
)
from distill3d.guidance.priors.text_embeddings import (
    TextEmbeddingCache,
    ViewPromptTable,
    check_prompt,
    encoder_fingerprint,
    load_text_embeddings,
    resolve_cache_root,
    tokenize_and_encode,
)
from distill3d.guidance.view_prompts import DirectionThresholds, ViewConditions

log = logging.getLogger(__name__)

SD_LAYOUT = ModelLayout(
    kind="Stable Diffusion",
    components=(
        Component("unet", (("config.json",),), needs_weights=True),
        Component("vae", (("config.json",),), needs_weights=True),
        Component("scheduler", (("scheduler_config.json",),)),
        Component("text_encoder", (("config.json",),), needs_weights=True, lazy_weights=True),
        Component("tokenizer", (("vocab.json", "merges.txt"), ("tokenizer.json",))),
    ),
    example_id="stabilityai/stable-diffusion-2-1-base",
)

TEXT_MAX_LENGTH = 77


def model_output_to_epsilon(output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """Noise prediction from a model trained to predict epsilon, v or x0.

    With x_t = a x0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)):
      v = a eps - s x0  =>  eps = a v + s x_t ;   x0 given  =>  eps = (x_t - a x0) / s.
    """
    if prediction_type == "epsilon":
        return output
    abar = alphas_cumprod.to(output.device)[t.to(output.device)].view(-1, *([1] * (output.dim() - 1))).to(output.dtype)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "v_prediction":
        return a * output + s * x_t.to(output.dtype)
    if prediction_type == "sample":
        return (x_t.to(output.dtype) - a * output) / s.clamp_min(1e-8)
    raise PriorError(f"unsupported prediction_type {prediction_type!r}; supported: epsilon, v_prediction, sample")


@dataclass
class TextPriorConfig:
    """Settings shared by the text-conditioned priors (Stable Diffusion, DeepFloyd IF)."""

    model: str = ""
    revision: str | None = None
    variant: str | None = None  # weight-file variant, e.g. "fp16" (half the download for IF)
    # None: use the local cache when complete, else download (unless HF_HUB_OFFLINE=1).
    # true: never touch the network.
    local_files_only: bool | None = None
    # null: the run's prompt / negative prompt (recipe top level, --prompt, --negative).
    prompt: str | None = None
    negative_prompt: str | None = None
    view_dependent_prompts: bool = True
    # Extra negative text per view direction, appended to the negative prompt, e.g.
    # {back: "face", side: "face", overhead: "face"} (stable-dreamfusion's suppress_face).
    view_negative_prompts: dict[str, str] = field(default_factory=dict)
    overhead_elevation: float = 60.0
    front_azimuth: float = 45.0
    back_azimuth: float = 135.0
    # fp16 UNet/VAE/text encoder on CUDA (always fp32 on CPU). null: follow the run's mixed
    # precision (trainer.mixed_precision, on by default); true/false force it.
    half_precision: bool | None = None
    attention_slicing: bool = False  # lower peak memory in attention, a little slower
    image_size: int | None = None  # null: the model's native size
    cache_dir: Path | None = None  # text-embedding cache root (null: the run's cache folder)
    cache_text_embeddings: bool = True


@dataclass
class StableDiffusionConfig(TextPriorConfig):
    model: str = "stabilityai/stable-diffusion-2-1-base"
    vae_slicing: bool = False  # encode a batch one image at a time
    vae_fp32: bool = False  # keep the VAE in fp32 under half precision (for VAEs that overflow in fp16)
    rgb_as_latents: bool = False  # the render is the latent (resized to the latent size, mapped to [-1, 1])


class TextDiffusionPrior(Prior):
    """What the diffusers text-to-image priors share: prompts, embeddings, noise schedule."""

    layout: ModelLayout
    label = "text"
    condition_key = "encoder_hidden_states"
    # Pretrained networks stay out of checkpoints (Prior.FROZEN; reloaded from the model on resume).
    FROZEN = ("unet", "vae")

    def __init__(self, config: TextPriorConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        prompt = check_prompt(config.prompt if config.prompt is not None else ctx.prompt, self.layout.kind)
        negative = config.negative_prompt if config.negative_prompt is not None else (ctx.negative_prompt or "")
        self.device = torch.device(ctx.device)
        self.dtype = pick_dtype(self.device, config.half_precision, ctx.half_precision)
        self.source = resolve_model(config.model, self.layout, config.local_files_only, config.revision)
        self.oom = OOMAdvice(self.layout.kind, config.model, self.oom_hints())
        self.prompts = ViewPromptTable(
            prompt,
            negative,
            config.view_negative_prompts,
            config.view_dependent_prompts,
            DirectionThresholds(config.overhead_elevation, config.front_azimuth, config.back_azimuth),
            self.condition_key,
            self.preprocess_text,
        )
        # Text first: the encoder is loaded only on a cache miss and released before the UNet.
        self.embedding_cache = TextEmbeddingCache(resolve_cache_root(config.cache_dir, ctx.cache_dir), config.cache_text_embeddings)
        embeddings = load_text_embeddings(
            self.prompts.texts(), self.embedding_cache, self.encoder_key(), self._load_text_encoder_checked, self.encode_texts
        )
        self.prompts.fill(embeddings, self.dtype, self.device)

        from diffusers import DDPMScheduler

        scheduler = call_quietly(lambda: load_component(DDPMScheduler, self.source, "scheduler", self.layout))
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PriorError(f"{config.model}: unsupported prediction_type {self.prediction_type!r}")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().to(self.device), persistent=False)
        with oom_guard(self.oom, "model loading"):
            self.load_networks()

    # -- subclass hooks ---------------------------------------------------------------------
    def oom_hints(self) -> list[str]:
        return []

    def preprocess_text(self, text: str) -> str:
        return text

    def load_networks(self) -> None:
        raise NotImplementedError

    def load_text_encoder(self, source) -> tuple:
        raise NotImplementedError

    def encode_texts(self, tokenizer, encoder, texts: list[str]) -> Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def encoder_key(self) -> str:
        """Identity of the text encoder for the embedding cache (see text_embeddings.py)."""
        src = self.source
        fingerprint = "hub" if src.hub_id else encoder_fingerprint(src.folder)
        return f"{self.label}|{src.identity}|{fingerprint}|{str(self.dtype).replace('torch.', '')}|{TEXT_MAX_LENGTH}"

    def _load_text_encoder_checked(self):
        source = source_with_weights(
            self.source, self.layout, "text_encoder", "to encode prompts that are not in the embedding cache", self.config.local_files_only
        )
        with oom_guard(self.oom, "text encoder"):
            tokenizer, encoder = call_quietly(lambda: self.load_text_encoder(source))
            return tokenizer, encoder.to(self.device).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.children():  # frozen networks stay in eval mode
            if module is not self.prompts:
                module.eval()
        return self

    def conditions(self, cameras: Cameras, out: RenderOutput | None = None) -> tuple[Condition, Condition]:
        return self.prompts.conditions(cameras)

    def view_conditions(self, cameras: Cameras, out: RenderOutput | None = None) -> ViewConditions:
        return self.prompts.view_conditions(cameras)

    def unet_forward(self, x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        emb = condition[self.condition_key].to(self.device, self.dtype)
        with torch.no_grad(), oom_guard(self.oom, "UNet"):
            return self.unet(x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=emb).sample.float()


class StableDiffusionPrior(TextDiffusionPrior):
    Config = StableDiffusionConfig
    layout = SD_LAYOUT
    label = "stable-diffusion"

    def oom_hints(self) -> list[str]:
        return [
            "trainer.batch_size (views per step)",
            "trainer.resolution (the render size)",
            "guidance.<i>.prior.half_precision: true (fp16 UNet and VAE; already the default on CUDA)",
            "guidance.<i>.prior.attention_slicing: true and guidance.<i>.prior.vae_slicing: true",
            "guidance.<i>.prior.image_size: 256 (the VAE encodes a smaller image; lower quality)",
        ]

    def load_networks(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        c: StableDiffusionConfig = self.config
        vae_dtype = torch.float32 if c.vae_fp32 else self.dtype
        self.unet = call_quietly(
            lambda: load_component(UNet2DConditionModel, self.source, "unet", self.layout, dtype=self.dtype, variant=c.variant)
        )
        self.vae = call_quietly(lambda: load_component(AutoencoderKL, self.source, "vae", self.layout, dtype=vae_dtype, variant=c.variant))
        for net in (self.unet, self.vae):
            net.to(self.device).eval().requires_grad_(False)
        self.vae_dtype = vae_dtype
        if c.attention_slicing:
            self.unet.set_attention_slice("auto")
        if c.vae_slicing:
            self.vae.enable_slicing()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)
        self.image_size = int(c.image_size or self.unet.config.sample_size * self.vae_scale_factor)
        self.latent_size = self.image_size // self.vae_scale_factor
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215) or 0.18215)

    def load_text_encoder(self, source):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = load_component(CLIPTokenizer, source, "tokenizer", self.layout, library="transformers")
        encoder = load_component(
            CLIPTextModel, source, "text_encoder", self.layout, dtype=self.dtype, variant=self.config.variant, library="transformers"
        )
        return tokenizer, encoder

    def encode_texts(self, tokenizer, encoder, texts: list[str]) -> Tensor:
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        return tokenize_and_encode(tokenizer, encoder, texts, TEXT_MAX_LENGTH, self.device, use_mask)

    def encode_render(self, out) -> Tensor:
        """rgb_as_latents with an RGB render: RGB plus opacity are the 4 latent channels
        (stable-dreamfusion's latent mode); otherwise the RGB through encode_images."""
        rgb = out.rgb_bchw()
        if self.config.rgb_as_latents and rgb.shape[1] == 3 and self.latent_channels == 4:
            rgb = torch.cat([rgb, out.opacity.permute(0, 3, 1, 2)], dim=1)
        return self.encode_images(rgb)

    def encode_images(self, rgb: Tensor) -> Tensor:
        if self.config.rgb_as_latents:
            if rgb.shape[1] != self.latent_channels:
                raise PriorError(
                    f"rgb_as_latents treats the render as the UNet's {self.latent_channels}-channel latent, but the render has "
                    f"{rgb.shape[1]} channels; render latent features (Latent-NeRF style) or set rgb_as_latents: false"
                )
            size = (self.latent_size, self.latent_size)
            x = rgb if tuple(rgb.shape[-2:]) == size else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
            return x.float() * 2 - 1
        size = (self.image_size, self.image_size)
        x = rgb if tuple(rgb.shape[-2:]) == size else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
        x = (x * 2 - 1).to(self.device, self.vae_dtype)
        with oom_guard(self.oom, "VAE encoder"):
            posterior = self.vae.encode(x).latent_dist
            latents = posterior.sample() * self.scaling_factor
        return latents.float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """VAE latents -> [0, 1] images (rgb_as_latents: the latent's first three channels as RGB)."""
        if self.config.rgb_as_latents:
            return ((latents.float()[:, :3] + 1) / 2).clamp(0, 1)
        x = (latents / self.scaling_factor).to(self.device, self.vae_dtype)
        with oom_guard(self.oom, "VAE decoder"):
            images = self.vae.decode(x).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        out = self.unet_forward(x_t, t, condition)
        return model_output_to_epsilon(out, x_t.to(out.device), t, self.alphas_cumprod, self.prediction_type)
