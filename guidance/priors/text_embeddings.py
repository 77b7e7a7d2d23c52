"""Text embeddings for text-conditioned priors: computed once per prompt, cached on disk.

A prior lists every text it will need (the prompt, its four view-dependent variants, the negative
prompt and its per-view variants) at construction. `load_text_embeddings` looks each one up in the
on-disk cache; only on a miss is the text encoder loaded, run once over all missing texts, and
released (deleted, memory given back) before the prior goes on. A second run with the same model
and prompts never loads the text encoder (T5-XXL for DeepFloyd IF is 4.7B parameters).

Cache key: sha256 over (format version, model identity, text-encoder fingerprint, encoder dtype,
max length, the exact text). The fingerprint covers the text encoder's and tokenizer's small files
(config, vocabulary) by content and its weight files by identity: the blob hash in a Hugging Face
cache snapshot, size and modification time in a plain folder. Editing or replacing the encoder
therefore misses and re-encodes. Files are safetensors with the text in their metadata, written
atomically (temporary file + rename), so concurrent runs and interrupted writes never leave a
corrupt entry; an unreadable entry is treated as a miss and rewritten.

Cache folder: the prior's `cache_dir` setting, else the run's cache folder (BuildContext.cache_dir),
else $DISTILL3D_CACHE (as the README says), else $XDG_CACHE_HOME/distill3d (~/.cache/distill3d); embeddings go in
its `text_embeddings/` subfolder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import Condition
from distill3d.guidance.priors.loading import EmptyPromptError, release_memory
from distill3d.guidance.view_prompts import (
    DIRECTIONS,
    DirectionThresholds,
    ViewConditions,
    camera_directions,
    join_prompts,
    view_prompt,
)

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
SMALL_FILE_LIMIT = 64 * 1024 * 1024  # hash small files (configs, vocabularies) by content
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def default_cache_root() -> Path:
    env = os.environ.get("DISTILL3D_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "distill3d"


def resolve_cache_root(config_dir: Path | str | None, ctx_dir: Path | str | None) -> Path:
    for d in (config_dir, ctx_dir):
        if d:
            return Path(d).expanduser()
    return default_cache_root()


def _file_identity(path: Path) -> str:
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs":  # Hugging Face cache: the blob name is the content hash
        return f"blob:{real.name}"
    st = real.stat()
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def encoder_fingerprint(model_folder: Path | None, subfolders: Sequence[str] = ("text_encoder", "tokenizer")) -> str:
    """Hash of a text encoder's identity in a model folder (see the module docstring)."""
    h = hashlib.sha256()
    if model_folder is None:
        return "none"
    for sub in subfolders:
        folder = Path(model_folder) / sub
        if not folder.is_dir():
            h.update(f"{sub}:absent".encode())
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            h.update(f"{sub}/{path.name}".encode())
            if path.name.endswith(WEIGHT_SUFFIXES) or path.stat().st_size > SMALL_FILE_LIMIT:
                h.update(_file_identity(path).encode())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encoder_loads: int = 0


class TextEmbeddingCache:
    """Files `<root>/text_embeddings/<sha256>.safetensors`, one per (model, encoder, text)."""

    def __init__(self, root: Path | str, enabled: bool = True):
        self.root = Path(root).expanduser()
        self.folder = self.root / "text_embeddings"
        self.enabled = enabled
        self.stats = CacheStats()

    @staticmethod
    def key(encoder_key: str, text: str) -> str:
        payload = json.dumps({"v": CACHE_FORMAT_VERSION, "encoder": encoder_key, "text": text}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, encoder_key: str, text: str) -> Path:
        return self.folder / f"{self.key(encoder_key, text)}.safetensors"

    def get(self, encoder_key: str, text: str) -> Tensor | None:
        if not self.enabled:
            return None
        path = self.path(encoder_key, text)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("text") != text or meta.get("encoder") != encoder_key:
                    return None
                return f.get_tensor("embedding")
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is a miss
            log.warning("ignoring unreadable text-embedding cache file %s (%s)", path, exc)
            return None

    def put(self, encoder_key: str, text: str, embedding: Tensor) -> Path | None:
        if not self.enabled:
            return None
        from safetensors.torch import save_file

        path = self.path(encoder_key, text)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=self.folder)
            os.close(fd)
            try:
                save_file(
                    {"embedding": embedding.detach().to("cpu").contiguous()},
                    tmp,
                    metadata={"text": text, "encoder": encoder_key, "version": str(CACHE_FORMAT_VERSION)},
                )
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:  # a read-only cache folder must not stop a run
            log.warning("could not write the text-embedding cache %s (%s); continuing without it", path, exc)
            return None
        return path


EncoderLoader = Callable[[], tuple[Any, Any]]  # () -> (tokenizer, text_encoder)
EncodeFn = Callable[[Any, Any, list[str]], Tensor]  # (tokenizer, encoder, texts) -> (N, L, D)


def load_text_embeddings(
    texts: Sequence[str], cache: TextEmbeddingCache, encoder_key: str, load_encoder: EncoderLoader, encode: EncodeFn
) -> dict[str, Tensor]:
    """Embeddings (1, L, D) float32 on CPU for every text; the encoder is loaded only on a miss
    and released before returning."""
    unique = list(dict.fromkeys(texts))
    found: dict[str, Tensor] = {}
    missing: list[str] = []
    for text in unique:
        emb = cache.get(encoder_key, text)
        if emb is None:
            missing.append(text)
        else:
            found[text] = emb.float()
    cache.stats.hits += len(found)
    cache.stats.misses += len(missing)
    if missing:
        tokenizer, encoder = load_encoder()
        cache.stats.encoder_loads += 1
        try:
            with torch.no_grad():
                embs = encode(tokenizer, encoder, missing)
        finally:
            del tokenizer, encoder
            release_memory()
        for text, emb in zip(missing, embs):
            emb = emb.detach().float().cpu().unsqueeze(0)
            found[text] = emb
            cache.put(encoder_key, text, emb)
    return {text: found[text] for text in unique}


def tokenize_and_encode(
    tokenizer: Any,
    encoder: Any,
    texts: list[str],
    max_length: int,
    device: torch.device,
    use_attention_mask: bool,
    batch_size: int = 8,
) -> Tensor:
    """Shared prompt encoding: pad to max_length, encoder's last hidden state (N, L, D)."""
    outs = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        tokens = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        kwargs = {}
        if use_attention_mask and "attention_mask" in tokens:
            kwargs["attention_mask"] = tokens["attention_mask"].to(device)
        hidden = encoder(tokens["input_ids"].to(device), **kwargs)[0]
        outs.append(hidden.float().cpu())
    return torch.cat(outs)


def check_prompt(prompt: str | None, prior: str) -> str:
    if prompt is None or not str(prompt).strip():
        raise EmptyPromptError(
            f"the text prompt is empty: the {prior} prior needs a description of the object "
            "(recipe key `prompt`, or `--prompt \"a ...\"` on the command line)"
        )
    return str(prompt).strip()


class ViewPromptTable(nn.Module):
    """The cached embeddings of one prompt and negative prompt, by view direction.

    Buffers (not saved in checkpoints) so they follow the prior across devices:
      base      (1, L, D)  the prompt as written
      positive  (4, L, D)  "<prompt>, <direction> view" for DIRECTIONS
      negative  (4, L, D)  negative prompt + per-view extra negative text for DIRECTIONS
    """

    def __init__(
        self,
        prompt: str,
        negative_prompt: str,
        view_negative_prompts: dict[str, str] | None = None,
        view_dependent: bool = True,
        thresholds: DirectionThresholds = DirectionThresholds(),
        condition_key: str = "encoder_hidden_states",
        preprocess: Callable[[str], str] | None = None,
    ):
        super().__init__()
        view_negative_prompts = dict(view_negative_prompts or {})
        unknown = [k for k in view_negative_prompts if k not in DIRECTIONS]
        if unknown:
            raise ValueError(f"view_negative_prompts: unknown direction {unknown[0]!r}; directions: {', '.join(DIRECTIONS)}")
        pre = preprocess or (lambda s: s)
        self.prompt = prompt
        self.negative_prompt = negative_prompt or ""
        self.view_dependent = view_dependent
        self.thresholds = thresholds
        self.condition_key = condition_key
        self.base_text = pre(prompt)
        self.positive_texts = [pre(view_prompt(prompt, d)) for d in DIRECTIONS]
        self.negative_texts = [pre(join_prompts(self.negative_prompt, view_negative_prompts.get(d, ""))) for d in DIRECTIONS]

    def texts(self) -> list[str]:
        return list(dict.fromkeys([self.base_text, *self.positive_texts, *self.negative_texts]))

    def fill(self, embeddings: dict[str, Tensor], dtype: torch.dtype, device: torch.device | str) -> None:
        def stack(texts):
            return torch.cat([embeddings[t] for t in texts]).to(device=device, dtype=dtype)

        self.register_buffer("base", stack([self.base_text]), persistent=False)
        self.register_buffer("positive", stack(self.positive_texts), persistent=False)
        self.register_buffer("negative", stack(self.negative_texts), persistent=False)

    def directions(self, cameras: Cameras) -> Tensor:
        return camera_directions(cameras, self.thresholds)

    def conditions(self, cameras: Cameras) -> tuple[Condition, Condition]:
        """(conditional, unconditional) per camera."""
        d = self.directions(cameras).to(self.positive.device)
        if self.view_dependent:
            cond = self.positive[d]
        else:
            cond = self.base.expand(len(d), *self.base.shape[1:])
        return {self.condition_key: cond}, {self.condition_key: self.negative[d]}

    def view_conditions(self, cameras: Cameras) -> ViewConditions:
        d = self.directions(cameras).to(self.positive.device)
        return ViewConditions({self.condition_key: self.positive}, {self.condition_key: self.negative[d]}, d)
