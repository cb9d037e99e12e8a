"""jisu's logits equal Hugging Face transformers' on the same weights, at the prefill and 16 decode steps."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from jisu import LLM  # noqa: E402
from arch_harness import DECODE_STEPS, assert_close_relative, captured_logits, reference_logits  # noqa: E402
from tiny_models import make_tiny_hf_model, write_gguf_from_hf  # noqa: E402

CASES = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "llama-tied-mha": dict(arch="llama", num_kv_heads=4, tie=True),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    "mistral-mqa": dict(arch="mistral", num_kv_heads=1),
    "llama3-rope": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn-rope": dict(arch="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, fmt, tmp_path):
    kw = CASES[case]
    hf_dir = make_tiny_hf_model(tmp_path / "hf", **kw)
    path = hf_dir if fmt == "hf" else write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "F32")
    # Small blocks so the prompt and the decode steps cross several block boundaries.
    llm = LLM(model=str(path), block_size=4, num_kv_blocks=64)
    prompt = [int(t) for t in torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(1))]
    tokens, logits = captured_logits(llm, prompt, DECODE_STEPS)
    assert len(logits) == DECODE_STEPS
    ref = reference_logits(hf_dir, prompt + tokens)
    for i, got in enumerate(logits):
        assert_close_relative(got, ref[len(prompt) - 1 + i], f"{case}/{fmt} step {i}")
