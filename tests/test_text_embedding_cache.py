"""The on-disk text-embedding cache: hits, misses, invalidation, atomic and robust files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from distill3d.guidance.priors.text_embeddings import (
    TextEmbeddingCache,
    ViewPromptTable,
    default_cache_root,
    encoder_fingerprint,
    load_text_embeddings,
    resolve_cache_root,
)
from distill3d.guidance.priors.loading import EmptyPromptError
from distill3d.guidance.priors.text_embeddings import check_prompt


class FakeEncoder:
    """Counts loads and encodes; embedding of a text = its length and first character code."""

    def __init__(self):
        self.loads = 0
        self.encoded: list[list[str]] = []

    def load(self):
        self.loads += 1
        return "tokenizer", "encoder"

    def encode(self, tokenizer, encoder, texts):
        assert (tokenizer, encoder) == ("tokenizer", "encoder")
        self.encoded.append(list(texts))
        return torch.stack([torch.tensor([[float(len(s)), float(ord(s[0]) if s else 0)]] * 3) for s in texts])


def test_miss_then_hit(tmp_path):
    cache, enc = TextEmbeddingCache(tmp_path), FakeEncoder()
    out = load_text_embeddings(["a cat", "ugly", "a cat"], cache, "model-A", enc.load, enc.encode)
    assert list(out) == ["a cat", "ugly"]
    assert out["a cat"].shape == (1, 3, 2) and out["a cat"][0, 0].tolist() == [5.0, 97.0]
    assert enc.loads == 1 and enc.encoded == [["a cat", "ugly"]]  # one load, one batch for all misses
    assert (cache.stats.hits, cache.stats.misses, cache.stats.encoder_loads) == (0, 2, 1)

    cache2, enc2 = TextEmbeddingCache(tmp_path), FakeEncoder()
    out2 = load_text_embeddings(["a cat", "ugly"], cache2, "model-A", enc2.load, enc2.encode)
    assert enc2.loads == 0, "a full hit must not load the text encoder"
    assert (cache2.stats.hits, cache2.stats.misses) == (2, 0)
    assert torch.equal(out2["a cat"], out["a cat"])


def test_partial_hit_encodes_only_the_missing_texts(tmp_path):
    enc = FakeEncoder()
    load_text_embeddings(["a cat"], TextEmbeddingCache(tmp_path), "m", enc.load, enc.encode)
    load_text_embeddings(["a cat", "a dog"], TextEmbeddingCache(tmp_path), "m", enc.load, enc.encode)
    assert enc.encoded == [["a cat"], ["a dog"]]


def test_key_depends_on_model_encoder_and_exact_text(tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    keys = {cache.key(m, s) for m in ("model-A", "model-B") for s in ("a cat", "a cat ", "A cat")}
    assert len(keys) == 6
    assert cache.key("model-A", "a cat") == TextEmbeddingCache(tmp_path / "other").key("model-A", "a cat")
    enc = FakeEncoder()
    load_text_embeddings(["a cat"], cache, "model-A", enc.load, enc.encode)
    load_text_embeddings(["a cat"], cache, "model-B", enc.load, enc.encode)
    assert enc.loads == 2


def test_files_are_safetensors_with_metadata_and_no_leftovers(tmp_path):
    from safetensors import safe_open

    cache = TextEmbeddingCache(tmp_path)
    path = cache.put("m", "a cat", torch.ones(1, 4, 2))
    assert path.parent == tmp_path / "text_embeddings" and path.suffix == ".safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["text"] == "a cat" and f.metadata()["encoder"] == "m"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed away
    assert torch.equal(cache.get("m", "a cat"), torch.ones(1, 4, 2))
    assert cache.get("m", "a dog") is None


def test_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path):
    cache, enc = TextEmbeddingCache(tmp_path), FakeEncoder()
    load_text_embeddings(["a cat"], cache, "m", enc.load, enc.encode)
    path = cache.path("m", "a cat")
    path.write_bytes(b"not a safetensors file")
    assert cache.get("m", "a cat") is None
    out = load_text_embeddings(["a cat"], cache, "m", enc.load, enc.encode)
    assert enc.loads == 2 and out["a cat"][0, 0].tolist() == [5.0, 97.0]
    assert cache.get("m", "a cat") is not None


def test_disabled_cache_always_encodes(tmp_path):
    cache, enc = TextEmbeddingCache(tmp_path, enabled=False), FakeEncoder()
    load_text_embeddings(["a"], cache, "m", enc.load, enc.encode)
    load_text_embeddings(["a"], cache, "m", enc.load, enc.encode)
    assert enc.loads == 2 and not (tmp_path / "text_embeddings").exists()


def test_unwritable_cache_does_not_stop_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache, enc = TextEmbeddingCache(blocker), FakeEncoder()  # its folder cannot be created
    out = load_text_embeddings(["a"], cache, "m", enc.load, enc.encode)
    assert "a" in out


def make_encoder_folder(root: Path) -> Path:
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "text_encoder" / "config.json").write_text('{"hidden_size": 32}')
    (root / "text_encoder" / "model.safetensors").write_bytes(b"0" * 100)
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    return root


def test_fingerprint_invalidation(tmp_path):
    root = make_encoder_folder(tmp_path / "model")
    fp = encoder_fingerprint(root)
    assert encoder_fingerprint(root) == fp
    # Config edited -> new key.
    (root / "text_encoder" / "config.json").write_text('{"hidden_size": 64}')
    fp2 = encoder_fingerprint(root)
    assert fp2 != fp
    # Weights replaced (same size, new modification time) -> new key.
    w = root / "text_encoder" / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp3 = encoder_fingerprint(root)
    assert fp3 != fp2
    # Tokenizer vocabulary edited -> new key.
    (root / "tokenizer" / "vocab.json").write_text('{"b": 0}')
    assert encoder_fingerprint(root) != fp3
    # Hugging Face cache blobs are identified by their (content-hash) name, not by time.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc123").write_bytes(b"1" * 10)
    w.unlink()
    w.symlink_to(blobs / "abc123")
    fp4 = encoder_fingerprint(root)
    os.utime(blobs / "abc123", ns=(time.time_ns(), time.time_ns() + 5 * 10**9))
    assert encoder_fingerprint(root) == fp4


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL3D_CACHE", str(tmp_path / "env"))  # the variable the README documents
    assert default_cache_root() == tmp_path / "env"
    assert resolve_cache_root(None, None) == tmp_path / "env"
    assert resolve_cache_root(None, tmp_path / "ctx") == tmp_path / "ctx"
    assert resolve_cache_root(tmp_path / "cfg", tmp_path / "ctx") == tmp_path / "cfg"
    monkeypatch.delenv("DISTILL3D_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "distill3d"


def test_prompt_table_texts_and_empty_prompt():
    table = ViewPromptTable("a cat", "ugly", {"back": "face", "side": "face"})
    assert table.texts() == [
        "a cat", "a cat, front view", "a cat, side view", "a cat, back view", "a cat, overhead view",
        "ugly", "ugly, face",
    ]
    assert ViewPromptTable("A Cat", "", preprocess=str.lower).texts()[:2] == ["a cat", "a cat, front view"]
    with pytest.raises(ValueError, match="unknown direction"):
        ViewPromptTable("a cat", "", {"bottom": "x"})
    for bad in ("", "   ", None):
        with pytest.raises(EmptyPromptError, match="prompt is empty"):
            check_prompt(bad, "Stable Diffusion")
    assert check_prompt("  a cat ", "x") == "a cat"
