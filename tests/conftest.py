"""Shared test setup: offline, deterministic, small."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches written by tests (text embeddings) stay out of the user's home.
os.environ.setdefault("DISTILL3D_CACHE", tempfile.mkdtemp(prefix="distill3d-test-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _runs_in_interpreter_subprocess(item) -> bool:
    marker = item.get_closest_marker("skipif")
    return bool(marker and marker.args and marker.args[0] is True and "TRITON_INTERPRET=1 subprocess" in marker.kwargs.get("reason", ""))


def pytest_collection_modifyitems(config, items):
    # Triton kernel tests run (and are counted) inside test_kernels_under_interpreter's
    # TRITON_INTERPRET=1 subprocess; in this process they are deselected, not reported as skipped.
    deselected = [item for item in items if _runs_in_interpreter_subprocess(item)]
    if deselected:
        items[:] = [item for item in items if not _runs_in_interpreter_subprocess(item)]
        config.hook.pytest_deselected(items=deselected)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
