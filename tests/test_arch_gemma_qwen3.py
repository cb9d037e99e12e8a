"""Gemma 2, Gemma 3 and Qwen3 against transformers, from Hugging Face folders and GGUF."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from arch_harness import assert_engine_invariants, assert_logits_match, prompt_ids, save_tiny_hf, tiny_vocab  # noqa: E402

VOCAB, BOS, EOS = tiny_vocab("llama")


def _gemma3(tie=True):
    c = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    )
    c.architectures = ["Gemma3ForCausalLM"]
    return transformers.Gemma3ForCausalLM, c


def _gemma2(tie=True):
    c = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=5,
        query_pre_attn_scalar=20, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
        tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS,
    )
    c.architectures = ["Gemma2ForCausalLM"]
    return transformers.Gemma2ForCausalLM, c


def _qwen3(tie=False):
    c = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=BOS, eos_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    c.architectures = ["Qwen3ForCausalLM"]
    return transformers.Qwen3ForCausalLM, c


CASES = {"gemma3": _gemma3, "gemma3-untied": lambda: _gemma3(tie=False), "gemma2": _gemma2, "qwen3": _qwen3,
         "qwen3-tied": lambda: _qwen3(tie=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    cls, config = CASES[case]()
    hf = save_tiny_hf(cls, config, tmp_path / "hf")
    # Prompts longer than the sliding windows, so the windows are exercised at prefill and decode.
    assert_logits_match(hf, hf, prompt_ids(13), what=case)


@pytest.mark.parametrize("case", ["gemma3", "gemma2", "qwen3"])
def test_engine_invariants(case, tmp_path):
    cls, config = CASES[case]()
    hf = save_tiny_hf(cls, config, tmp_path / "hf")
    assert_engine_invariants(hf, prompt_len=21)
