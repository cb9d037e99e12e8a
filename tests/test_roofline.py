"""The analytical step model against torch's FLOP counter on real forwards, and bytes and verdicts by hand."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jisu import LLM, SamplingParams
from jisu.errors import InvalidRequestError, JisuError
from jisu.models.config import ModelConfig
from jisu.models.layers import Linear
from jisu.profile.roofline import (
    COMPUTE,
    MEMORY,
    Bytes,
    Flops,
    SeqWork,
    StepCost,
    WeightFormat,
    decode_cost,
    prefill_cost,
    roofline_verdict,
    seq_work_from_step,
    step_cost,
)

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def _count_steps(llm: LLM, prompts, params=GREEDY):
    """Runs the prompts; for every engine step returns (batch, torch's mm FLOPs, torch's bmm FLOPs, model).

    SDPA is pinned to its math backend: torch's FLOP counter has no formula for the fused CPU attention
    kernel, while the math path is plain batched matmuls it does count.
    """
    runner = llm.engine.runner
    execute = runner.execute
    steps = []

    def counted(step):
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            out = execute(step)
        by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        mm = by_op.pop("aten.mm", 0) + by_op.pop("aten.addmm", 0)
        bmm = by_op.pop("aten.bmm", 0) + by_op.pop("aten.baddbmm", 0)
        assert not by_op, f"uncounted FLOPs in ops {by_op}"
        batch = seq_work_from_step(step)
        steps.append((batch, mm, bmm, step_cost(llm.engine.model_config, batch)))
        return out

    runner.execute = counted
    try:
        llm.generate(prompts, params)
    finally:
        del runner.execute
    return steps


def _torch_kernels_only(llm: LLM):
    """Routes every projection through F.linear (visible to the FLOP counter) instead of jisu's C++ kernel."""
    saved = {}
    for name, m in llm.engine.model.named_modules():
        if isinstance(m, Linear):
            saved[name] = m.kernel_weight
            m.kernel_weight = None
    # The fused C++ stack is invisible to the counter too: without it, deterministic steps run one row a forward
    # through the Python layers.
    saved["fused_decode"] = llm.engine.model.fused_decode
    llm.engine.model.fused_decode = None
    return saved


def _restore_kernels(llm: LLM, saved) -> None:
    for name, m in llm.engine.model.named_modules():
        if name in saved:
            m.kernel_weight = saved[name]
    llm.engine.model.fused_decode = saved["fused_decode"]


def _check_steps(steps, phases):
    assert {cost.phase for _, _, _, cost in steps} >= set(phases)
    for batch, mm, bmm, cost in steps:
        assert cost.flops.matmul == pytest.approx(mm, rel=0.02), batch
        assert cost.flops.attention == pytest.approx(bmm, rel=0.02), batch


# ----------------------------------------------------------------------------- FLOPs vs FlopCounterMode


@pytest.fixture(scope="module")
def tiny_torch_llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), cpu_kernels=False)


def test_tiny_prefill_and_decode_flops_match_torch_counter(tiny_torch_llm):
    # Token-id prompts so both sequences have the same length: decodes then share one padded attention batch.
    steps = _count_steps(tiny_torch_llm, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    _check_steps(steps, {"prefill", "decode"})
    prefill = steps[0][3]
    assert prefill.tokens == 12 and prefill.sampled == 2 and prefill.num_seqs == 2


def test_tiny_chunked_prefill_flops_match_torch_counter(tiny_llama_dir):
    # 20 tokens with an 8-token budget: chunks that attend over cached context (gathered from the cache).
    llm = LLM(model=str(tiny_llama_dir), cpu_kernels=False, max_num_batched_tokens=8)
    steps = _count_steps(llm, [list(range(20, 40))])
    _check_steps(steps, {"prefill", "decode"})
    chunks = [b for b, _, _, c in steps if c.phase == "prefill"]
    assert [s.context_len for b in chunks for s in b] == [8, 16, 20]
    assert [s.samples for b in chunks for s in b] == [False, False, True]
    assert any(c.bytes.kv_read > 0 for _, _, _, c in steps if c.phase == "prefill")


@pytest.mark.real_model
def test_default_model_flops_match_torch_counter(real_model_path):
    # float32 weights: F.linear over them is what torch's FLOP counter can see (int4 blocks have no float copy)
    real_llm = LLM(model=str(real_model_path), weights="float32", max_model_len=256, max_num_seqs=8)
    saved = _torch_kernels_only(real_llm)
    try:
        two = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        prompts = [[1, 504, 3458, 282, 4649, 314, 253, 2127, 30, 378, 3458] * 3] * 5  # 5 x 33 tokens
        steps = _count_steps(real_llm, prompts, two)
        steps += _count_steps(real_llm, [[1, 4649, 314, 253, 2127]], two)
    finally:
        _restore_kernels(real_llm, saved)
    _check_steps(steps, {"prefill", "decode"})
    # SmolLM2-135M: 30 layers, the 49152 x 576 output layer; one decode token is ~2 x 134.5 M FLOPs of matmul.
    one = next(c for _, _, _, c in steps if c.phase == "decode" and c.num_seqs == 1)
    assert one.flops.matmul == pytest.approx(2 * 134.5e6, rel=0.01)


# ----------------------------------------------------------------------------- bytes by hand

# hidden 4, 2 heads of 2 dims, 1 KV head, intermediate 6, vocabulary 10, one layer.
HAND = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=2, max_position_embeddings=64,
)


def test_decode_bytes_by_hand():
    c = decode_cost(HAND, context_len=5)
    # Weights read: qkv (4+2+2)x4=32, o 4x4=16, gate_up 12x4=48, down 4x6=24, norms 3x4=12, lm_head 10x4=40,
    # and one embedding row of 4: 176 float32 = 704 bytes.
    assert c.bytes.weights_total == 704
    assert c.bytes.weights["embed_tokens"] == 16 and c.bytes.weights["lm_head"] == 160
    # KV per token: K and V of 1 head x 2 dims x 4 bytes = 16; 4 cached tokens read, 1 written.
    assert (c.bytes.kv_read, c.bytes.kv_write) == (64, 16)
    assert c.bytes.compulsory == 784
    # Eager activations: 124 elements per layer + 12 (embedding, final norm) + 14 (logits row) = 150 floats.
    assert c.bytes.activations == 600
    assert c.phase == "decode" and c.tokens == 1


def test_prefill_bytes_by_hand_and_quantized_weights():
    q = WeightFormat({"embed_tokens": 1.0, "lm_head": 1.0, "qkv_proj": 0.5, "qkv_bias": 0.5, "o_proj": 0.5,
                      "gate_up_proj": 0.5, "down_proj": 0.5, "norms": 4.0}, "hand")
    c = prefill_cost(HAND, prompt_len=3, num_seqs=2, weights=q)
    # Layers (32+16+48+24) x 0.5 = 60, norms 48, lm_head 40, embedding rows 6 tokens x 4 = 24.
    assert c.bytes.weights_total == 60 + 48 + 40 + 24
    assert (c.bytes.kv_read, c.bytes.kv_write) == (0, 6 * 16)
    assert c.phase == "prefill" and c.tokens == 6 and c.sampled == 2
    # A chunk that does not end its prompt computes no logits and reads no output layer.
    mid = step_cost(HAND, [SeqWork(3, 3, samples=False)])
    assert mid.bytes.weights["lm_head"] == 0 and mid.flops.linear["lm_head"] == 0


def test_flops_by_hand():
    c = step_cost(HAND, [SeqWork(2, 5), SeqWork(1, 3)])
    # 3 tokens: qkv 2*3*4*8=192, o 2*3*4*4=96, gate_up 2*3*4*12=288, down 2*3*6*4=144; 2 sampled rows 2*2*4*10=160.
    expected = {"qkv_proj": 192, "o_proj": 96, "gate_up_proj": 288, "down_proj": 144, "lm_head": 160}
    assert dict(c.flops.linear) == expected
    # (query, key) pairs, causal: 2 new tokens after 3 cached see 4 and 5 keys, 1 after 2 sees 3: 12;
    # QK^T and PV: 2 * 2 * 12 * 2 heads * 2 dims.
    assert c.flops.attention == 192
    assert c.flops.softmax == 5 * 12 * 2
    assert c.phase == "mixed"


def test_weight_format_from_loaded_model(tiny_torch_llm):
    w = WeightFormat.from_model(tiny_torch_llm.engine.model)
    assert all(w.of(g) == 4.0 for g in ("embed_tokens", "lm_head", "qkv_proj", "o_proj", "gate_up_proj", "norms"))
    # Q4_1-like groups: 20 bytes per 32 weights.
    mixed = WeightFormat.from_tensors(
        [("model.embed_tokens.weight", 64, 68), ("model.layers.0.self_attn.q_proj.weight", 32, 20),
         ("model.layers.0.self_attn.k_proj.weight", 32, 20), ("model.layers.0.self_attn.o_proj.weight", 32, 20),
         ("model.layers.0.mlp.gate_proj.weight", 32, 20), ("model.layers.0.mlp.down_proj.weight", 32, 40),
         ("model.layers.0.input_layernorm.weight", 4, 16)], tied=True)
    assert mixed.of("qkv_proj") == 0.625 and mixed.of("down_proj") == 1.25 and mixed.of("lm_head") == 68 / 64


def test_bad_batches_are_refused():
    with pytest.raises(InvalidRequestError, match="context_len"):
        SeqWork(5, 3)
    with pytest.raises(InvalidRequestError, match="new_tokens"):
        SeqWork(0, 3)
    with pytest.raises(InvalidRequestError, match="empty"):
        step_cost(HAND, [])
    with pytest.raises(InvalidRequestError, match="dtype"):
        decode_cost(HAND, 4, dtype="int3")


# ----------------------------------------------------------------------------- verdicts by hand


class _Machine:
    def __init__(self, bandwidth, peaks):
        self.bandwidth_bytes_per_s = bandwidth
        self.peak_flops_per_s = peaks


def _synthetic(flops: int, nbytes: int, tokens: int) -> StepCost:
    f = Flops(linear={"qkv_proj": flops}, attention=0, softmax=0, norm=0, rotary=0, activation=0, residual=0)
    b = Bytes(weights={"qkv_proj": nbytes}, kv_read=0, kv_write=0, activations=999)
    return StepCost("decode", tokens, tokens, tokens, "float32", f, b)


def test_memory_bound_verdict():
    # 500 bytes at 100 B/s = 5 s; 1000 FLOPs at 1000 FLOP/s = 1 s: memory binds, 2 tokens per 5 s = 0.4 tok/s.
    v = roofline_verdict(0.2, _synthetic(1000, 500, 2), _Machine(100.0, {"float32": 1000.0}))
    assert v.binding == MEMORY
    assert v.bound_tokens_per_s == pytest.approx(0.4)
    assert v.percent_of_bound == pytest.approx(50.0)
    # 0.1 steps/s: 50 B/s and 100 FLOP/s achieved; activations are not part of the bound.
    assert v.achieved_bytes_per_s == pytest.approx(50.0)
    assert v.achieved_flops_per_s == pytest.approx(100.0)
    assert v.arithmetic_intensity == pytest.approx(2.0) and v.ridge_intensity == pytest.approx(10.0)


def test_compute_bound_verdict():
    # 10000 FLOPs = 10 s against 5 s of memory: compute binds, 4 tokens per 10 s; 0.5 tok/s is 125%.
    v = roofline_verdict(0.5, _synthetic(10000, 500, 4), _Machine(100.0, {"float32": 1000.0}))
    assert v.binding == COMPUTE
    assert v.bound_tokens_per_s == pytest.approx(0.4)
    assert v.percent_of_bound == pytest.approx(125.0)
    assert v.compute_time_s == pytest.approx(10.0) and v.memory_time_s == pytest.approx(5.0)


def test_verdict_over_several_steps_sums_each_steps_bound():
    # A memory-bound step (5 s) and a compute-bound one (10 s): 6 tokens in 15 s at best = 0.4 tok/s;
    # memory time 10 s against compute 11 s, so compute dominates the phase.
    steps = [_synthetic(1000, 500, 2), _synthetic(10000, 500, 4)]
    v = roofline_verdict(0.2, steps, _Machine(100.0, {"float32": 1000.0}))
    assert v.bound_tokens_per_s == pytest.approx(0.4) and v.percent_of_bound == pytest.approx(50.0)
    assert v.binding == COMPUTE and v.memory_time_s == pytest.approx(10.0) and v.compute_time_s == pytest.approx(11.0)
    # 6 tokens at 0.2 tok/s = 30 s for 1000 bytes and 11000 FLOPs.
    assert v.achieved_bytes_per_s == pytest.approx(1000 / 30) and v.achieved_flops_per_s == pytest.approx(11000 / 30)
    with pytest.raises(InvalidRequestError, match="non-empty"):
        roofline_verdict(1.0, [], _Machine(100.0, {"float32": 1000.0}))


def test_smollm2_fp32_decode_bound_matches_baseline():
    # BASELINES.md: 538 MB of float32 weights per token at 31 GB/s -> ~58 tok/s.
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    c = decode_cost(cfg, context_len=1)
    assert c.bytes.weights_total == pytest.approx(538.06e6, rel=1e-3)
    v = roofline_verdict(48.0, c, _Machine(31e9, {"float32": 150e9}))
    assert v.binding == MEMORY and v.bound_tokens_per_s == pytest.approx(57.6, rel=0.01)


def test_verdict_refuses_unmeasured_dtype_and_bad_rates():
    with pytest.raises(JisuError, match="bfloat16"):
        roofline_verdict(1.0, decode_cost(HAND, 4, dtype=torch.bfloat16), _Machine(1e9, {"float32": 1e9}))
    with pytest.raises(InvalidRequestError):
        roofline_verdict(-1.0, decode_cost(HAND, 4), _Machine(1e9, {"float32": 1e9}))
