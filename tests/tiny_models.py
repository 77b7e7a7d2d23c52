"""Tiny random-weight diffusion models written to disk in the diffusers layout, built offline.

They go through exactly the loading path a user's downloaded model takes (from_pretrained on a
folder). Nothing is downloaded: the tokenizers are built from hand-made vocabularies.

  build_tiny_sd(dir, prediction_type="epsilon")  UNet (32, 64), VAE (32, 64), CLIP text model
      (hidden 32), CLIPTokenizer from a byte-level BPE vocab.json + merges.txt, PNDM scheduler
      config (as SD ships it). Image size 32 (latent 4x16x16).
  build_tiny_if(dir)  pixel-space UNet (3 in, 6 out; IF's ResNet/SimpleCrossAttn blocks, text
      projection and text time-embedding), T5 encoder (d_model 32), a T5 tokenizer (Unigram
      vocabulary, tokenizer.json), DDPM scheduler (squaredcos_cap_v2, learned_range). Image 16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WORDS = [
    "a", "an", "the", "of", "and", "photo", "cat", "dog", "hamburger", "chair", "front", "side", "back",
    "overhead", "view", "ugly", "blurry", "face", "low", "quality", "delicious", "red", "wooden", "dslr",
]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet (256 printable stand-ins for the byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path) -> int:
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs) with whole-word merges for TINY_WORDS.
    Returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in TINY_WORDS:
        # Merge left to right: "c a", "ca t</w>" ... so whole words become single tokens.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{cur} {nxt}"
            if merge not in merges:
                merges.append(merge)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special})
    )
    return len(vocab)


def build_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion (diffusers layout) to folder; returns the folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
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
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
            }
        )
    )
    return folder


def write_t5_tokenizer(folder: Path) -> int:
    """A T5 tokenizer (Unigram, tokenizer.json) over TINY_WORDS and single letters; returns its size."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in TINY_WORDS]
    vocab += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def build_tiny_if(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny DeepFloyd-IF-stage-I-like model (diffusers layout) to folder; returns the folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_t5_tokenizer(folder / "tokenizer")
    d_model = 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=6,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32,
        encoder_hid_dim=d_model,
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    )
    text = T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, variance_type="learned_range", prediction_type="epsilon"
    )
    unet.save_pretrained(folder / "unet")
    text.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "IFPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return folder
