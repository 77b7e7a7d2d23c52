"""DeepFloyd IF stage I as a score-distillation prior (registry name `deepfloyd-if`).

Pixel space: the render is resized to 64x64 (the UNet's sample size) and mapped to [-1, 1]; there
is no VAE. The UNet predicts 6 channels: the first 3 are the noise, the last 3 the learned variance
(ignored here). Text comes from a T5 encoder (T5-XXL for the released models, 4.7B parameters) and
its T5 tokenizer, with the IF pipeline's defaults: lower-cased text, 77 tokens with the attention
mask. Embeddings are cached on disk like Stable Diffusion's, so T5 is loaded only for new prompts
and released straight after.

The released weights (DeepFloyd/IF-I-XL-v1.0, -L-, -M-) are gated on the Hugging Face hub: a user
must accept the licence on the model page and log in before downloading; the error says so.
`variant: fp16` downloads and loads the half-size fp16 weight files the IF repositories ship.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.interfaces import Condition
from distill3d.guidance.priors.loading import Component, ModelLayout, PriorError, call_quietly, load_component
from distill3d.guidance.priors.stable_diffusion import (
    TEXT_MAX_LENGTH,
    TextDiffusionPrior,
    TextPriorConfig,
    model_output_to_epsilon,
)
from distill3d.guidance.priors.text_embeddings import tokenize_and_encode

IF_LAYOUT = ModelLayout(
    kind="DeepFloyd IF stage I",
    components=(
        Component("unet", (("config.json",),), needs_weights=True),
        Component("scheduler", (("scheduler_config.json",),)),
        Component("text_encoder", (("config.json",),), needs_weights=True, lazy_weights=True),
        Component("tokenizer", (("tokenizer.json",), ("spiece.model",))),
    ),
    example_id="DeepFloyd/IF-I-XL-v1.0",
    gated=True,
    hub_url="https://huggingface.co/DeepFloyd/IF-I-XL-v1.0",
)


@dataclass
class DeepFloydIFConfig(TextPriorConfig):
    model: str = "DeepFloyd/IF-I-XL-v1.0"


class DeepFloydIFPrior(TextDiffusionPrior):
    Config = DeepFloydIFConfig
    layout = IF_LAYOUT
    label = "deepfloyd-if"

    def oom_hints(self) -> list[str]:
        return [
            "trainer.batch_size (views per step)",
            "guidance.<i>.prior.half_precision: true (fp16 UNet; already the default on CUDA)",
            "guidance.<i>.prior.attention_slicing: true",
            "a smaller IF model: guidance.<i>.prior.model: DeepFloyd/IF-I-L-v1.0 or DeepFloyd/IF-I-M-v1.0",
            "the T5 text encoder needs about 10 GB in fp16 only on the first run of a prompt (its output is cached); "
            "encode once on a larger GPU or on CPU (device cpu) and reuse the cache",
        ]

    def preprocess_text(self, text: str) -> str:
        return text.lower().strip()  # IFPipeline's text preprocessing without caption cleaning

    def load_networks(self) -> None:
        from diffusers import UNet2DConditionModel

        c: DeepFloydIFConfig = self.config
        self.unet = call_quietly(
            lambda: load_component(UNet2DConditionModel, self.source, "unet", self.layout, dtype=self.dtype, variant=c.variant)
        )
        self.unet.to(self.device).eval().requires_grad_(False)
        if c.attention_slicing:
            self.unet.set_attention_slice("auto")
        self.image_channels = int(self.unet.config.in_channels)
        out_channels = int(self.unet.config.out_channels)
        if out_channels not in (self.image_channels, 2 * self.image_channels):
            raise PriorError(
                f"{c.model}: UNet has {out_channels} output channels for {self.image_channels} input channels; "
                "expected the same (noise) or twice as many (noise + learned variance)"
            )
        self.image_size = int(c.image_size or self.unet.config.sample_size)

    def load_text_encoder(self, source):
        from transformers import T5EncoderModel

        try:
            from transformers import T5Tokenizer
        except ImportError:  # pragma: no cover - very old transformers
            from transformers import AutoTokenizer as T5Tokenizer
        try:
            tokenizer = load_component(T5Tokenizer, source, "tokenizer", self.layout, library="transformers")
        except (PriorError, ImportError) as exc:
            if "sentencepiece" in str(exc).lower() or "protobuf" in str(exc).lower():
                raise PriorError(
                    f"the T5 tokenizer of {self.config.model} is a SentencePiece model (spiece.model): install the "
                    f"`sentencepiece` and `protobuf` packages to read it ({exc})"
                ) from exc
            raise
        encoder = load_component(
            T5EncoderModel, source, "text_encoder", self.layout, dtype=self.dtype, variant=self.config.variant, library="transformers"
        )
        return tokenizer, encoder

    def encode_texts(self, tokenizer, encoder, texts: list[str]) -> Tensor:
        return tokenize_and_encode(tokenizer, encoder, texts, TEXT_MAX_LENGTH, self.device, use_attention_mask=True)

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) in [-1, 1] (S = 64 for IF stage I), differentiable."""
        size = (self.image_size, self.image_size)
        x = rgb if tuple(rgb.shape[-2:]) == size else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
        return x.float() * 2 - 1

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return ((latents.float()[:, :3] + 1) / 2).clamp(0, 1)

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        out = self.unet_forward(x_t, t, condition)
        noise = out[:, : self.image_channels]
        return model_output_to_epsilon(noise, x_t.to(noise.device), t, self.alphas_cumprod, self.prediction_type)
