"""GPT-2, Phi-3 (LongRoPE, partial rotary, sliding window) and SmolLM3 (NoPE layers) against transformers, from
Hugging Face folders and from GGUF files written the way llama.cpp's converter writes them; int8/int4 loads; Phi-3's
fused C++ decode against its eager layers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from arch_harness import (  # noqa: E402
    assert_close_relative,
    assert_engine_invariants,
    assert_logits_match,
    captured_logits,
    prompt_ids,
    reference_logits,
    save_tiny_hf,
    tiny_vocab,
)
from safetensors.torch import load_file  # noqa: E402
from tiny_models import _add_tensor, _add_tokenizer, permute_rows  # noqa: E402

from jisu import LLM  # noqa: E402
from jisu.errors import ModelConfigError  # noqa: E402
from jisu.loader.gguf import load_gguf  # noqa: E402
from jisu.loader.hf_folder import load_hf_folder  # noqa: E402
from jisu.models.config import ModelConfig  # noqa: E402
from jisu.models.fused_decode import layer_by_layer  # noqa: E402
from jisu.quant import calibration  # noqa: E402
from jisu.quant.formats import QuantizedTensor  # noqa: E402

VOCAB, BOS, EOS = tiny_vocab("llama")
ORIGINAL_CONTEXT = 16
"""Phi-3's original_max_position_embeddings in the LongRoPE models: prompt + decode steps cross it."""


def _gpt2(tie=True, wide=False):
    c = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64 if wide else 48, n_layer=2, n_head=4 if wide else 3, n_positions=64,
        n_inner=96 if wide else 72, tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS,
    )
    c.architectures = ["GPT2LMHeadModel"]
    return transformers.GPT2LMHeadModel, c


def _phi3(longrope=True, wide=False, window=None, tie=False):
    hidden, heads, kv = (64, 4, 2) if wide else (48, 3, 1)
    rotary_pairs = (hidden // heads) * 3 // 4 // 2  # partial rotary: 3/4 of each head turns (Phi-4-mini's)
    extra = {}
    if longrope:
        extra = dict(
            partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL_CONTEXT,
            rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(rotary_pairs)],
                          "long_factor": [2.0 + 0.7 * i for i in range(rotary_pairs)]},
        )
    c = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96 if wide else 72, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, sliding_window=window,
        tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, **extra,
    )
    c.architectures = ["Phi3ForCausalLM"]
    return transformers.Phi3ForCausalLM, c


def _smollm3(no_rope_layers=None, bias=False, wide=False):
    hidden, heads = (64, 4) if wide else (40, 5)
    c = transformers.SmolLM3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96 if wide else 56, num_hidden_layers=4,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=64, no_rope_layers=no_rope_layers,
        attention_bias=bias, mlp_bias=bias, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    c.architectures = ["SmolLM3ForCausalLM"]
    return transformers.SmolLM3ForCausalLM, c


CASES = {
    "gpt2": _gpt2,
    "gpt2-untied": lambda: _gpt2(tie=False),
    "phi3-longrope": _phi3,  # partial rotary, GQA, untied
    "phi3-window": lambda: _phi3(longrope=False, window=5, tie=True),
    "smollm3": lambda: _smollm3(bias=True),  # the default interval: layer 3 applies no RoPE
    "smollm3-list": lambda: _smollm3(no_rope_layers=[1, 0, 1, 0]),
    "gpt2-wide": lambda: _gpt2(wide=True),
    "phi3-wide": lambda: _phi3(wide=True),
    "smollm3-wide": lambda: _smollm3(wide=True),
}
"""The -wide models have widths that are multiples of 32, for Q8_0 files and int4 groups."""


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            cls, config = CASES[case]()
            made[case] = save_tiny_hf(cls, config, tmp_path_factory.mktemp(case))
        return made[case]

    return get


# ----------------------------------------------------------------------------- GGUF, as llama.cpp converts


def write_gguf(hf_dir: Path, out: Path, tensor_type: str = "F32") -> Path:
    """The folder's model as the GGUF llama.cpp's convert_hf_to_gguf.py writes for it (gpt2, phi3, smollm3)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"GPT2LMHeadModel": "gpt2", "Phi3ForCausalLM": "phi3", "SmolLM3ForCausalLM": "smollm3"}[
        cfg["architectures"][0]]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type({"F32": 0, "Q8_0": 7}[tensor_type])
    tensors = load_file(str(hf_dir / "model.safetensors"))
    if arch == "gpt2":
        _gpt2_metadata(w, cfg)
        named = _gpt2_tensors(tensors)
    else:
        named = _llama_like(w, cfg, tensors, arch)
    _add_tokenizer(w, json.loads((hf_dir / "tokenizer.json").read_text()),
                   json.loads((hf_dir / "tokenizer_config.json").read_text()))
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for name, a in named.items():
        if name.startswith("rope_factors"):
            w.add_tensor(name, a)
        else:
            _add_tensor(w, name, a, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _gpt2_metadata(w, cfg: dict) -> None:
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(cfg["n_inner"] or 4 * cfg["n_embd"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])


_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gpt2_tensors(tensors: dict) -> dict[str, np.ndarray]:
    top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight", "ln_f.weight": "output_norm.weight",
           "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
    out = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name in top:
            out[top[name]] = t.float().numpy()
            continue
        _, n, rest = name.split(".", 2)
        module, _, attr = rest.rpartition(".")
        a = t.float()
        if attr == "weight" and module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            a = a.t()  # Conv1D's [in, out] -> [out, in]
        out[f"blk.{n}.{_GPT2_NAMES[module]}.{attr}"] = np.ascontiguousarray(a.numpy())
    return out


_LLAMA_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_like(w, cfg: dict, tensors: dict, arch: str) -> dict[str, np.ndarray]:
    heads, kv_heads, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    rope = cfg.get("rope_parameters") or {}
    head_dim = hidden // heads
    rotary = int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(rotary)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    out = {}
    if arch == "phi3":
        orig = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = cfg["max_position_embeddings"] / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            out["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
            out["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in tensors.items():
        a = t.float().numpy()
        if name in top:
            out[top[name]] = a
            continue
        _, _, n, rest = name.split(".", 3)
        module, _, attr = rest.rpartition(".")
        if arch == "smollm3" and module == "self_attn.q_proj":  # converted as a Llama: q/k rows permuted
            a = permute_rows(a, heads)
        elif arch == "smollm3" and module == "self_attn.k_proj":
            a = permute_rows(a, kv_heads)
        out[f"blk.{n}.{_LLAMA_NAMES[module]}.{attr}"] = a
    assert head_dim % 2 == 0
    return out


# ----------------------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("case", ["gpt2", "gpt2-untied", "phi3-longrope", "phi3-window", "smollm3", "smollm3-list"])
def test_logits_match_transformers(case, hf_dirs):
    hf = hf_dirs(case)
    # 13 prompt tokens + 16 decode steps: past Phi-3's sliding window (5) and its original context (16); LongRoPE's
    # long factors apply throughout, as transformers applies them to a sequence that long.
    assert_logits_match(hf, hf, prompt_ids(13), what=case)


def test_longrope_short_factors_within_the_original_context(hf_dirs):
    # A context window no longer than original_max_position_embeddings: the short factors, as transformers uses for
    # a sequence within it.
    hf = hf_dirs("phi3-longrope")
    assert_logits_match(hf, hf, prompt_ids(8), steps=8, what="phi3 short", max_model_len=ORIGINAL_CONTEXT)


# llama.cpp's SmolLM3 skips RoPE on every 4th layer, whatever the config said: the default-interval model.
@pytest.mark.parametrize("case", ["gpt2", "phi3-longrope", "smollm3"])
def test_gguf_logits_match_transformers(case, hf_dirs, tmp_path):
    hf = hf_dirs(case)
    path = write_gguf(hf, tmp_path / f"{case}.gguf")
    mine, theirs = load_gguf(path).config, load_hf_folder(hf).config
    assert dataclasses.replace(mine, rope_scaling=None) == dataclasses.replace(theirs, rope_scaling=None)
    if theirs.rope_scaling:  # LongRoPE's factors come back from float32 tensors
        for key in ("short_factor", "long_factor", "attention_factor"):
            want = theirs.rope_scaling.get(key) or 1.5**0.5  # sqrt(1 + ln 4 / ln 16)
            assert np.allclose(mine.rope_scaling[key], want, rtol=1e-6), key
    assert_logits_match(path, hf, prompt_ids(13), what=f"{case} gguf")


@pytest.mark.parametrize("case", ["gpt2-wide", "phi3-wide", "smollm3-wide"])
def test_gguf_q8_0(case, hf_dirs, tmp_path):
    """Q8_0 matrices (fused ones too) load as int8 blocks under their projections' own names, equal to the float
    originals within Q8_0's rounding, and run."""
    hf = hf_dirs(case)
    path = write_gguf(hf, tmp_path / f"{case}-q8.gguf", "Q8_0")
    original = load_hf_folder(hf).tensors
    blocks = load_gguf(path, keep_blocks=True).tensors
    assert set(blocks) == set(original)
    for name, t in blocks.items():
        if name.endswith(("_proj.weight", "embed_tokens.weight")):
            assert isinstance(t, QuantizedTensor) and t.bits == 8, name
        got = t.dequantize() if isinstance(t, QuantizedTensor) else t
        assert torch.allclose(got.float(), original[name].float(), atol=2e-3), name
    llm = LLM(model=str(path), block_size=4)
    layer = llm.engine.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight_format.startswith("int8")
    prompt = prompt_ids(9)
    tokens, logits = captured_logits(llm, prompt, 6)
    ref = reference_logits(hf, prompt + tokens)
    for i, got in enumerate(logits):  # Q8_0's rounding of the weights, not a misread
        assert_close_relative(got, ref[len(prompt) - 1 + i], f"{case} Q8_0 step {i}", rel=3e-2)


# ----------------------------------------------------------------------------- engine, formats, fused decode


@pytest.mark.parametrize("case", ["gpt2", "phi3-window", "smollm3"])
def test_engine_invariants(case, hf_dirs):
    assert_engine_invariants(hf_dirs(case), prompt_len=13)  # past Phi-3's window (5)


# SmolLM3's matrices carry Llama's names as stored; GPT-2's and Phi-3's are renamed and split from fused ones.
@pytest.mark.parametrize("case", ["gpt2-wide", "phi3-wide"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_int8_int4(case, weights, hf_dirs, monkeypatch):
    hf = hf_dirs(case)
    # Calibration (int8's outlier columns, int4's grids) on two short texts: this checks what is quantized, not how
    # well; the eager GPT-2 would spend minutes on the built-in prompts. The function's code is swapped, so every
    # module that imported it by name calibrates on these.
    short = lambda: ["the quick brown fox", "a lazy dog jumps over"]  # noqa: E731
    monkeypatch.setattr(calibration.calibration_texts, "__code__", short.__code__)
    llm = LLM(model=str(hf), weights=weights, block_size=4)
    model = llm.engine.model
    for layer in model.model.layers:
        mlp = layer.mlp
        linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, mlp.down_proj,
                   mlp.gate_up_proj if hasattr(mlp, "gate_up_proj") else mlp.up_proj]
        for lin in linears:
            assert lin.weight_format.startswith(weights), lin.weight_format
    prompt = prompt_ids(9)
    tokens, logits = captured_logits(llm, prompt, 6)
    assert len(tokens) == 6
    ref = reference_logits(hf, prompt + tokens)
    tol = {"int8": 3e-2, "int4": 0.25}[weights]  # the rounding of the weights, not a misread matrix
    for i, got in enumerate(logits):
        assert_close_relative(got, ref[len(prompt) - 1 + i], f"{case} {weights} step {i}", rel=tol)


def test_phi3_runs_the_fused_decode_stack(hf_dirs):
    """Phi-3 (partial rotary and LongRoPE are only its rotation table) qualifies for the fused C++ decode step,
    which equals its eager layers."""
    llm = LLM(model=str(hf_dirs("phi3-longrope")), block_size=4)
    model = llm.engine.model
    if model.fused_decode is None:
        from jisu.kernels.build import cpu_linear_kernels

        if cpu_linear_kernels() is None:
            pytest.skip("jisu's C++ kernels are unavailable")
        pytest.fail("Phi-3 did not get the fused decode stack")
    prompt = prompt_ids(13)
    tokens, fused = captured_logits(llm, prompt, 16)
    with layer_by_layer(model):
        eager_tokens, eager = captured_logits(llm, prompt, 16)
    assert tokens == eager_tokens
    for i, (a, b) in enumerate(zip(fused, eager)):
        assert_close_relative(a, b, f"fused vs eager step {i}", rel=1e-5)


# ----------------------------------------------------------------------------- config checks


def _config(case: str, **changes) -> dict:
    _, c = CASES[case]()
    d = c.to_dict()
    d.update(changes)
    return d


def test_config_fields():
    gpt2 = ModelConfig.from_hf_dict(_config("gpt2"))
    assert (gpt2.norm_type, gpt2.gated_mlp, gpt2.learned_positions, gpt2.hidden_act) == ("layer", False, True,
                                                                                            "gelu_tanh")
    assert gpt2.tie_word_embeddings and gpt2.o_bias and gpt2.mlp_bias and gpt2.intermediate_size == 72
    phi = ModelConfig.from_hf_dict(_config("phi3-longrope"))
    assert phi.rotary_dim == 12 and phi.rope_type == "longrope"
    assert phi.rope_scaling["original_max_position_embeddings"] == ORIGINAL_CONTEXT
    assert ModelConfig.from_hf_dict(_config("phi3-window")).sliding_window == 5
    smol = ModelConfig.from_hf_dict(_config("smollm3"))
    assert smol.rope_layers == (True, True, True, False)
    assert ModelConfig.from_hf_dict(_config("smollm3", no_rope_layers=[1, 1, 1, 1])).rope_layers == ()


@pytest.mark.parametrize("case, changes, field", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("smollm3", {"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ("smollm3", {"no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval"),
    ("phi3-longrope", {"partial_rotary_factor": 0.5}, "short_factor"),
])
def test_config_errors_name_the_field(case, changes, field):
    d = _config(case, **changes)
    if case.startswith("phi3"):  # the factors' length no longer fits the rotary dims
        d["rope_parameters"] = dict(d["rope_parameters"], partial_rotary_factor=0.5)
    with pytest.raises(ModelConfigError, match=field):
        ModelConfig.from_hf_dict(d)
