"""Mixtral and Qwen3-MoE (jisu/models/moe.py) against transformers, from Hugging Face folders and from GGUF files
written as llama.cpp's converter writes them (experts stacked per layer, or one tensor per expert in older files);
int8 / int4 weights and GGUF Q8_0 / Q4_0 blocks on the experts; a decode step runs only the routed experts."""

from __future__ import annotations

import json
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
    save_tiny_hf,
    tiny_vocab,
)
from tiny_models import _add_tensor, _add_tokenizer, permute_rows  # noqa: E402

VOCAB, BOS, EOS = tiny_vocab("llama")


def _mixtral(tie=False, hidden=36, inter=44):
    c = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    c.architectures = ["MixtralForCausalLM"]
    return transformers.MixtralForCausalLM, c


def _qwen3_moe(tie=False, norm=True, layers=2, hidden=40, moe_inter=24, head_dim=16, **kw):
    c = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=56, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=5, num_key_value_heads=1, head_dim=head_dim, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=norm, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=BOS, eos_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw,
    )
    c.architectures = ["Qwen3MoeForCausalLM"]
    return transformers.Qwen3MoeForCausalLM, c


CASES = {
    "mixtral": _mixtral,
    "mixtral-tied": lambda: _mixtral(tie=True),
    "qwen3moe": _qwen3_moe,
    "qwen3moe-tied-unnormalised-dense-layer": lambda: _qwen3_moe(tie=True, norm=False, layers=3, mlp_only_layers=[1]),
    "qwen3moe-sparse-step": lambda: _qwen3_moe(layers=4, decoder_sparse_step=2),
}


def _save(case: str, folder: Path) -> Path:
    cls, config = CASES[case]()
    return save_tiny_hf(cls, config, folder)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = _save(case, tmp_path / "hf")
    assert_logits_match(hf, hf, prompt_ids(13), what=case)


def test_dense_layers_where_transformers_has_them(tmp_path):
    from jisu import LLM
    from jisu.models.layers import GatedMLP
    from jisu.models.moe import SparseMoE

    hf = _save("qwen3moe-sparse-step", tmp_path / "hf")
    layers = LLM(model=str(hf), num_kv_blocks=8, block_size=4).engine.model.model.layers
    assert [type(layer.mlp) for layer in layers] == [GatedMLP, SparseMoE, GatedMLP, SparseMoE]


@pytest.mark.parametrize("case", ["mixtral", "qwen3moe"])
def test_engine_invariants(case, tmp_path):
    assert_engine_invariants(_save(case, tmp_path / "hf"), prompt_len=13)


def test_fused_stacked_experts_are_split(tmp_path):
    """transformers >= 5 holds experts as stacked 3-D tensors; a checkpoint saved that way loads too."""
    from safetensors.torch import load_file, save_file

    hf = _save("qwen3moe", tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    for n in range(2):
        p = f"model.layers.{n}.mlp.experts"
        gate = [tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(6)]
        up = [tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(6)]
        down = [tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(6)]
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        tensors[f"{p}.down_proj"] = torch.stack(down)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert_logits_match(hf, hf, steps=4, what="stacked experts")


# ----------------------------------------------------------------------------- GGUF, as llama.cpp writes it

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
# An expert's matrix (Qwen3-MoE's name, Mixtral's) -> llama.cpp's stacked tensor.
_EXPERT_NAMES = {"gate_proj": "ffn_gate", "w1": "ffn_gate", "up_proj": "ffn_up", "w3": "ffn_up",
                 "down_proj": "ffn_down", "w2": "ffn_down"}


def write_moe_gguf(hf_dir: Path, out: Path, tensor_type: str = "F32", stacked: bool = True) -> Path:
    """The folder's Mixtral ("llama" with expert counts, q/k rows permuted) or Qwen3-MoE ("qwen3moe") as GGUF:
    experts stacked [experts, rows, cols] per layer (ffn_*_exps), or one tensor each (ffn_gate.E, older files).
    Routers and 1-D tensors stay F32, as llama.cpp's converter keeps them; in a 4-bit file the embedding and
    output matrices are Q8_0 (llama.cpp's 4-bit types give them more bits too)."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    mixtral = cfg["architectures"] == ["MixtralForCausalLM"]
    arch = "llama" if mixtral else "qwen3moe"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    qtype = gguf.GGMLQuantizationType[tensor_type]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if not mixtral:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    _add_tokenizer(w, json.loads((hf_dir / "tokenizer.json").read_text()),
                   json.loads((hf_dir / "tokenizer_config.json").read_text()))

    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        a = t.float().numpy()
        parts = name.split(".")
        if "experts" in parts:  # model.layers.N.<mlp|block_sparse_moe>.experts.E.<matrix>.weight
            n, e, matrix = int(parts[2]), int(parts[5]), parts[6]
            experts.setdefault((n, _EXPERT_NAMES[matrix]), {})[e] = a
            continue
        if mixtral and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = permute_rows(a, heads if "q_proj" in name else kv_heads)
        if name in _GGUF_NAMES:
            gguf_name = _GGUF_NAMES[name]
        else:
            _, _, n, rest = name.split(".", 3)
            gguf_name = f"blk.{n}.{_GGUF_NAMES[rest]}"
        _add_tensor(w, gguf_name, a, _kept_type(gguf_name, qtype))
    for (n, kind), by_expert in sorted(experts.items()):
        mats = [by_expert[e] for e in sorted(by_expert)]
        if stacked:
            _add_tensor(w, f"blk.{n}.{kind}_exps.weight", np.stack(mats), qtype)
        else:
            for e, m in enumerate(mats):
                _add_tensor(w, f"blk.{n}.{kind}.{e}.weight", m, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _kept_type(gguf_name: str, qtype):
    Q = gguf.GGMLQuantizationType
    if "gate_inp" in gguf_name:
        return Q.F32
    if gguf_name in ("token_embd.weight", "output.weight") and qtype == Q.Q4_0:
        return Q.Q8_0
    return qtype


@pytest.mark.parametrize("case,stacked", [("mixtral", True), ("mixtral-tied", False), ("qwen3moe", True)])
def test_gguf_logits_match_transformers(case, stacked, tmp_path):
    hf = _save(case, tmp_path / "hf")
    path = write_moe_gguf(hf, tmp_path / "m.gguf", stacked=stacked)
    assert_logits_match(path, hf, prompt_ids(13), what=f"{case} GGUF")


def test_gguf_llama_without_experts_stays_llama(tmp_path):
    from jisu.models.arch import for_gguf

    assert for_gguf("llama").hf_name == "LlamaForCausalLM"
    assert for_gguf("llama", {"llama.expert_count": 0}).hf_name == "LlamaForCausalLM"
    assert for_gguf("llama", {"llama.expert_count": 8}).hf_name == "MixtralForCausalLM"


# ----------------------------------------------------------------------------- low-bit experts


def _expert_linears(llm):
    """(layer, expert, gate_up_proj, down_proj) of every expert of `llm`."""
    from jisu.models.moe import SparseMoE

    for n, layer in enumerate(llm.engine.model.model.layers):
        if isinstance(layer.mlp, SparseMoE):
            for e, expert in enumerate(layer.mlp.experts):
                yield n, e, expert.gate_up_proj, expert.down_proj


def _matrix(linear) -> torch.Tensor:
    """The float32 matrix a Linear multiplies by, as its kernels hold it."""
    return linear.kernels.qweight_dequantize(linear.kernel_weight, None)


def _agreement(llm, reference, prompt) -> tuple[float, float]:
    """(share of 8 greedy tokens equal to the float model's, KL(float || llm) at the first step)."""
    tokens, logits = captured_logits(llm, prompt, 8)
    ref_tokens, ref_logits = captured_logits(reference, prompt, 8)
    same = sum(a == b for a, b in zip(tokens, ref_tokens)) / len(tokens)
    p, q = torch.log_softmax(ref_logits[0], -1), torch.log_softmax(logits[0], -1)
    return same, float((p.exp() * (p - q)).sum())


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory):
    """(folder, its float tensors, the float LLM) of a Qwen3-MoE whose rows are whole 32-blocks (GGUF blocks, int4
    groups). Its experts are scaled up (x2) and its output layer too (x10), so that the experts move the logits
    and the distribution is not flat: greedy tokens then mean something. (A random model is still fragile: a
    4-bit rounding moves its first-step distribution about as much as swapping two experts does, so the exact
    per-expert matrices are checked first, the logits only loosely.)"""
    from safetensors.torch import load_file, save_file

    from jisu import LLM

    cls, config = _qwen3_moe(hidden=64, moe_inter=32, head_dim=32)
    hf = save_tiny_hf(cls, config, tmp_path_factory.mktemp("quant") / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    for name in tensors:
        tensors[name] *= 2 if ".experts." in name else 10 if name == "lm_head.weight" else 1
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return hf, tensors, LLM(model=str(hf), num_kv_blocks=16, block_size=4)


def _float_expert(tensors, n: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = f"model.layers.{n}.mlp.experts.{e}"
    gate_up = torch.cat([tensors[f"{p}.gate_proj.weight"], tensors[f"{p}.up_proj.weight"]])
    return gate_up, tensors[f"{p}.down_proj.weight"]


@pytest.mark.parametrize("weights,error,min_same,max_kl", [("int8", 0.01, 0.99, 2e-3), ("int4", 0.12, 0.0, 0.1)])
def test_int8_int4_weights_quantize_each_expert(quant_model, weights, error, min_same, max_kl, monkeypatch):
    import jisu.engine
    from jisu import LLM

    # Calibration (int8's outlier columns, int4's fitted grids) runs the model over its texts token by token; a
    # sentence is enough to route through the experts here.
    monkeypatch.setattr(jisu.engine, "calibration_texts", lambda: ["The quick brown fox jumps over the lazy dog."])
    hf, tensors, reference = quant_model
    llm = LLM(model=str(hf), weights=weights, num_kv_blocks=16, block_size=4)
    for n, e, gate_up, down in _expert_linears(llm):
        for linear, want in zip((gate_up, down), _float_expert(tensors, n, e)):
            assert linear.weight_format.startswith(weights)
            rel = float((_matrix(linear) - want).norm() / want.norm())
            assert rel <= error, f"layer {n} expert {e}: {weights} matrix off by {rel:.3f} of its norm"
    assert llm.engine.model.model.layers[0].mlp.gate.weight_format == "float"  # routing stays float32
    same, kl = _agreement(llm, reference, prompt_ids(9))
    assert same >= min_same and kl <= max_kl, (same, kl)


@pytest.mark.parametrize("qtype,bits,min_same,max_kl", [("Q8_0", "int8", 0.99, 2e-3), ("Q4_0", "int4", 0.0, 0.1)])
def test_gguf_blocks_kept_per_expert(quant_model, qtype, bits, min_same, max_kl, tmp_path):
    """Stacked Q8_0 / Q4_0 experts load one matrix per expert, each holding its slice of the stack's blocks as in
    the file (not requantized, not dequantized)."""
    from gguf.quants import dequantize

    from jisu import LLM

    hf, _, reference = quant_model
    path = write_moe_gguf(hf, tmp_path / "m.gguf", qtype)
    llm = LLM(model=str(path), num_kv_blocks=16, block_size=4)
    stacks = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def from_file(kind: str, n: int, e: int) -> torch.Tensor:
        t = stacks[f"blk.{n}.{kind}_exps.weight"]
        return torch.from_numpy(dequantize(np.asarray(t.data[e]), t.tensor_type))

    for n, e, gate_up, down in _expert_linears(llm):
        assert gate_up.weight_format.startswith(bits) and gate_up.quantized.origin == qtype
        assert torch.equal(_matrix(gate_up), torch.cat([from_file("ffn_gate", n, e), from_file("ffn_up", n, e)]))
        assert torch.equal(_matrix(down), from_file("ffn_down", n, e))
    same, kl = _agreement(llm, reference, prompt_ids(9))
    assert same >= min_same and kl <= max_kl, (same, kl)


# ----------------------------------------------------------------------------- only the routed experts run


def _record_experts(model) -> tuple[list, list]:
    """Hooks on every MoE layer of `model`: events (layer, 'route', experts chosen per token) and (layer, expert,
    rows) for each expert product, gate_up and down, in the order they ran; and the hook handles."""
    from jisu.models.moe import SparseMoE

    events: list[tuple] = []
    handles = []
    for n, layer in enumerate(model.model.layers):
        moe = layer.mlp
        if not isinstance(moe, SparseMoE):
            continue
        handles.append(moe.gate.register_forward_hook(
            lambda m, inp, out, n=n, moe=moe: events.append((n, "route", out.float().topk(moe.top_k).indices))))
        for e, expert in enumerate(moe.experts):
            for linear in (expert.gate_up_proj, expert.down_proj):
                handles.append(linear.register_forward_hook(
                    lambda m, inp, out, n=n, e=e: events.append((n, e, inp[0].shape[0]))))
    return events, handles


def _expert_runs(events) -> list[tuple[list[list[int]], list[tuple[int, int]]]]:
    """Per MoE forward: (each token's chosen experts, the (expert, rows) products that followed)."""
    runs = []
    for n, what, detail in events:
        if what == "route":
            runs.append((detail.tolist(), []))
        else:
            runs[-1][1].append((what, detail))
    return runs


def _last_step_events(llm, prompts) -> list[tuple]:
    """The expert events of the last step of generating 3 tokens for each of `prompts`."""
    from jisu import SamplingParams

    events, handles = _record_experts(llm.engine.model)
    runner = llm.engine.runner
    execute = runner.execute

    def step(s):
        events.clear()
        return execute(s)

    runner.execute = step
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        return list(events)
    finally:
        runner.execute = execute
        for h in handles:
            h.remove()


def test_decode_step_runs_only_the_top_k_experts(quant_model):
    """At a decode step each MoE layer runs exactly the router's top-k experts, one product each for gate_up and
    down, one row each: only their matrices are read."""
    _, _, llm = quant_model
    runs = _expert_runs(_last_step_events(llm, [prompt_ids(9)]))
    assert len(runs) == 2  # one decode token, two MoE layers
    for chosen, products in runs:
        assert len(chosen) == 1 and len(chosen[0]) == 2
        assert sorted(products) == sorted((e, 1) for e in chosen[0] for _ in ("gate_up", "down"))


def test_batched_step_runs_each_chosen_expert_once(quant_model):
    """Rows in one forward (deterministic=False lets a decode batch share it): each chosen expert runs one product
    over all the tokens routed to it."""
    from jisu import LLM

    hf, _, _ = quant_model
    llm = LLM(model=str(hf), num_kv_blocks=16, block_size=4, deterministic=False)
    runs = _expert_runs(_last_step_events(llm, [prompt_ids(9, seed=2), prompt_ids(7, seed=3), prompt_ids(5)]))
    assert len(runs) == 2
    for chosen, products in runs:
        assert len(chosen) == 3
        tokens_of = {e: sum(e in c for c in chosen) for c in chosen for e in c}
        assert sorted(products) == sorted((e, n) for e, n in tokens_of.items() for _ in ("gate_up", "down"))


def test_one_token_path_equals_grouped_path(quant_model):
    """On the C++ kernels (whose per-row sums do not depend on the row count) the decode path (one token) and the
    grouped one give the same numbers bit for bit, so a sequence decodes the same alone or in a batch."""
    _, _, llm = quant_model
    moe = llm.engine.model.model.layers[0].mlp
    x = torch.randn(7, moe.gate.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = moe(x)
        for i in range(7):
            assert torch.equal(moe(x[i : i + 1]), batched[i : i + 1])
        assert_close_relative(batched, _reference_moe(moe, x), "SparseMoE vs a per-token loop")


def _reference_moe(moe, x):
    probs = torch.softmax(x @ moe.gate.weight.T, -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = probs[t].topk(moe.top_k)
        if moe.norm_topk_prob:
            w = w / w.sum()
        for wi, e in zip(w, idx.tolist()):
            out[t] += wi * moe.experts[e](x[t : t + 1])[0]
    return out
