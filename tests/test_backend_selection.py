"""Backend selection for the NeRF hot ops: auto, forced, missing, unknown (CPU; no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distill3d.engine import backends
from distill3d.engine.backends import BackendUnavailable, choose, describe, resolve_op
from distill3d.representations.nerf import triton_backends

CPU = torch.device("cpu")
NERF_OPS = ("hash_encoding", "composite", "march")


@pytest.mark.parametrize("interpret", [False, True], ids=["plain", "TRITON_INTERPRET=1"])
@pytest.mark.parametrize("op", NERF_OPS)
def test_auto_on_cpu_is_torch(op, interpret, monkeypatch):
    """Even with the interpreter switched on, "auto" never runs a Triton kernel on CPU."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose(op, "auto", CPU) == "torch"
    reference = backends._OPS[op]["torch"].load()
    assert resolve_op(op, "auto", "cpu") is reference


def test_every_nerf_op_offers_the_accelerated_backends():
    assert set(backends.backends_for("hash_encoding")) >= {"torch", "triton", "tcnn"}
    assert set(backends.backends_for("composite")) >= {"torch", "triton", "nerfacc"}
    assert set(backends.backends_for("march")) >= {"torch", "triton", "nerfacc"}
    # On CUDA, "auto" reaches triton before torch; tcnn and the nerfacc marcher are explicit-only
    # (their functions differ from the reference), so they sit below torch.
    for op in NERF_OPS:
        order = backends.backends_for(op)
        assert order.index("triton") < order.index("torch")
    assert backends.backends_for("hash_encoding").index("tcnn") > backends.backends_for("hash_encoding").index("torch")
    assert backends.backends_for("march").index("nerfacc") > backends.backends_for("march").index("torch")


@pytest.mark.parametrize(
    "op, name, why",
    [
        ("composite", "nerfacc", "CUDA"),
        ("march", "nerfacc", "CUDA"),
        ("hash_encoding", "tcnn", "CUDA"),
        ("hash_encoding", "triton", "TRITON_INTERPRET=1"),
        ("composite", "triton", "TRITON_INTERPRET=1"),
        ("march", "triton", "TRITON_INTERPRET=1"),
    ],
)
def test_forced_missing_backend_is_a_clear_error(op, name, why, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable) as info:
        choose(op, name, CPU)
    message = str(info.value)
    assert repr(name) in message and repr(op) in message and why in message
    with pytest.raises(BackendUnavailable):
        resolve_op(op, name, "cpu")


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(BackendUnavailable) as info:
        choose("composite", "cuda-magic", CPU)
    message = str(info.value)
    assert "'cuda-magic'" in message and "'composite'" in message
    for name in ("triton", "nerfacc", "torch", "auto"):
        assert name in message


def test_forcing_through_the_module_switch():
    from distill3d.representations.nerf.hash_encoding import HashEncoding, HashEncodingConfig

    encoding = HashEncoding(HashEncodingConfig(levels=2, log2_table_size=8), backend="nerfacc")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nerfacc' for 'hash_encoding'"):
        encoding(torch.rand(4, 3))


def test_doctor_rows_show_choice_and_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = {op: (chosen, dict(status)) for op, chosen, status in describe(CPU)}
    for op in NERF_OPS:
        chosen, status = rows[op]
        assert chosen == "torch" and status["torch"] is None
        assert "CUDA" in status["triton"]
    assert "tiny-cuda-nn" in rows["hash_encoding"][1]["tcnn"]
    assert "nerfacc" in rows["composite"][1]["nerfacc"]


def test_tcnn_import_guard_catches_environment_error(tmp_path, monkeypatch):
    """tiny-cuda-nn raises EnvironmentError (not ImportError) at import without CUDA."""
    package = tmp_path / "tinycudann"
    package.mkdir()
    (package / "__init__.py").write_text('raise EnvironmentError("Unknown compute capability. Ensure PyTorch with CUDA support is installed.")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tinycudann", raising=False)
    triton_backends._tcnn_import_error.cache_clear()
    try:
        reason = triton_backends._tcnn_import_error()
    finally:
        triton_backends._tcnn_import_error.cache_clear()
        sys.modules.pop("tinycudann", None)
    assert reason is not None and "Unknown compute capability" in reason and "tiny-cuda-nn" in reason


def test_tcnn_is_configured_with_our_grid_settings():
    """The tcnn wrapper builds tiny-cuda-nn's HashGrid from our config (no GPU needed to check)."""
    from distill3d.representations.nerf.hash_encoding import HashEncodingConfig

    config = HashEncodingConfig()
    assert triton_backends.tcnn_encoding_config(config) == {
        "otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
        "base_resolution": 16, "per_level_scale": pytest.approx((4096 / 16) ** (1 / 15)),
    }
    small = HashEncodingConfig(levels=4, features=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0)
    assert triton_backends.tcnn_encoding_config(small) == {
        "otype": "HashGrid", "n_levels": 4, "n_features_per_level": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 2.0,
    }


def test_nerfacc_is_never_called_on_cpu_tensors():
    from distill3d.representations.nerf.rendering import Samples

    samples = Samples(torch.zeros(2, dtype=torch.long), torch.ones(2), torch.ones(2), 1)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        triton_backends.composite_nerfacc(torch.ones(2), torch.ones(2, 3), samples)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        triton_backends.march_nerfacc(torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1), torch.ones(1), 4, None, False)


def test_forced_triton_on_cpu_under_interpreter():
    """In a fresh process with TRITON_INTERPRET=1: "triton" can be forced on CPU (and computes the
    torch reference's function), while "auto" stays torch. This engine's register_backend takes
    `auto_devices`, so the interpreter must be offered for forcing (one branch only)."""
    pytest.importorskip("triton")
    assert triton_backends._ENGINE_HAS_AUTO_DEVICES
    script = textwrap.dedent(
        """
        import torch
        from distill3d.engine.backends import choose
        from distill3d.representations.nerf.hash_encoding import HashEncoding, HashEncodingConfig

        cpu = torch.device("cpu")
        for op in ("hash_encoding", "composite", "march"):
            assert choose(op, "auto", cpu) == "torch", op
            assert choose(op, "triton", cpu) == "triton", op
        config = HashEncodingConfig(levels=2, features=2, log2_table_size=8, base_resolution=4)
        module = HashEncoding(config, backend="triton")
        x = torch.rand(16, 3)
        ref = HashEncoding(config, backend="torch")
        ref.load_state_dict(module.state_dict())
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-6)
        print("FORCED-OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FORCED-OK" in proc.stdout
