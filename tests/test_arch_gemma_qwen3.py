"""Gemma 2, Gemma 3 and Qwen3 against transformers, from Hugging Face folders and GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from arch_harness import (  # noqa: E402
    assert_engine_invariants, assert_logits_match, prompt_ids, save_tiny_hf, tiny_gemma3, tiny_vocab,
)
from safetensors.torch import load_file  # noqa: E402
from tiny_models import _add_tensor, _add_tokenizer  # noqa: E402

VOCAB, BOS, EOS = tiny_vocab("llama")


def _gemma3(tie=True):
    return tiny_gemma3(tie)


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


def _gemma3_llama_cpp_layout(tie=True):
    """A Gemma 3 that llama.cpp's GGUF can describe: its fixed layout (5 sliding layers, then a global one), query
    scale 1/sqrt(head_dim), sliding layers at RoPE base 10000."""
    cls, c = _gemma3(tie)
    c.num_hidden_layers = 6
    c.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    c.query_pre_attn_scalar = c.head_dim
    c.rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    return cls, c


def _gemma2_llama_cpp_layout(tie=True):
    cls, c = _gemma2(tie)
    c.query_pre_attn_scalar = c.head_dim
    return cls, c


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


# ----------------------------------------------------------------------------- GGUF, as llama.cpp's converter writes it

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(hf_dir: Path, out: Path, tensor_type: str = "F32") -> Path:
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"Gemma3ForCausalLM": "gemma3", "Gemma2ForCausalLM": "gemma2", "Qwen3ForCausalLM": "qwen3"}[
        cfg["architectures"][0]]
    gemma = arch.startswith("gemma")
    qtype = gguf.GGMLQuantizationType[tensor_type]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(float((rope.get("full_attention") or rope)["rope_theta"]))
    if gemma:
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    _add_tokenizer(w, json.loads((hf_dir / "tokenizer.json").read_text()),
                   json.loads((hf_dir / "tokenizer_config.json").read_text()))
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        a = t.float().numpy()
        if gemma and name.endswith("norm.weight"):
            a = a + 1  # llama.cpp stores Gemma's norms as 1 + w
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            n, rest = name.removeprefix("model.layers.").split(".", 1)
            module, _, attr = rest.rpartition(".")
            leaf = (_GEMMA_NORMS.get(module) if gemma else None) or _GGUF_NAMES.get(module) or (
                "ffn_norm" if module == "post_attention_layernorm" else None)
            gname = f"blk.{n}.{leaf}.{attr}"
        _add_tensor(w, gname, np.ascontiguousarray(a), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


GGUF_CASES = {"gemma3": _gemma3_llama_cpp_layout, "gemma3-untied": lambda: _gemma3_llama_cpp_layout(tie=False),
              "gemma2": _gemma2_llama_cpp_layout, "qwen3": _qwen3}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_logits_match_transformers(case, tmp_path):
    cls, config = GGUF_CASES[case]()
    hf = save_tiny_hf(cls, config, tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "m.gguf")
    assert_logits_match(path, hf, prompt_ids(13), what=f"{case}/gguf")


@pytest.mark.parametrize("case", ["gemma3", "qwen3"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_low_bit_weights_follow_float(case, weights, tmp_path):
    """--weights int8 / int4 run every matrix of the new architectures on the C++ kernels, close to float32."""
    import torch

    from jisu import LLM, SamplingParams

    cls, config = CASES[case]()
    # every matrix's inputs a multiple of int4's group of 32
    config.hidden_size, config.intermediate_size = 64, 96
    config.head_dim, config.num_attention_heads = 32, 2
    hf = save_tiny_hf(cls, config, tmp_path / "hf")
    ids = prompt_ids(13)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0)
    ref = LLM(model=str(hf), weights="float32")
    low = LLM(model=str(hf), weights=weights)
    formats = {m.weight_format for m in low.engine.model.modules() if hasattr(m, "weight_format")}
    # (int4 keeps the output layer int8, as for every architecture)
    assert any(f.startswith(weights) for f in formats) and all(f.startswith("int") for f in formats), formats
    spy = []
    runner = low.engine.runner
    original = runner.execute
    runner.execute = lambda step: spy.append(original(step)) or spy[-1]
    low.generate([ids], params)
    runner.execute = original
    spy_ref = []
    runner = ref.engine.runner
    original = runner.execute
    runner.execute = lambda step: spy_ref.append(original(step)) or spy_ref[-1]
    ref.generate([ids], params)
    p, q = torch.log_softmax(spy_ref[0][0], -1), torch.log_softmax(spy[0][0], -1)
    kl = float((p.exp() * (p - q)).sum())
    assert kl < (0.02 if weights == "int8" else 0.2), kl
