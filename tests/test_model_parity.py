"""jisu's logits equal Hugging Face transformers' on the same weights, at the prefill and 16 decode steps."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from jisu import LLM, SamplingParams  # noqa: E402
from tiny_models import make_tiny_hf_model, write_gguf_from_hf  # noqa: E402

DECODE_STEPS = 16

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


def captured_logits(llm: LLM, prompt_ids: list[int], steps: int):
    """Greedy-generates `steps` tokens and records the logits the engine sampled from at each step."""
    seen = []
    runner = llm.engine.runner
    original = runner.execute

    def spy(step):
        logits = original(step)
        seen.append(logits.clone())
        return logits

    runner.execute = spy
    try:
        out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    finally:
        runner.execute = original
    return out.token_ids, [s[0] for s in seen]


def reference_logits(hf_dir, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_close_relative(mine: torch.Tensor, ref: torch.Tensor, what: str):
    scale = ref.abs().max().item()
    err = (mine - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max |diff| {err:.3g} exceeds 1e-4 x max |logit| {scale:.3g}"


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
