"""The fused C++ decode stack (jisu/models/fused_decode.py) equals the eager decoder layers on real decode
steps of tiny models: same hidden states, same K/V written into the cache. Llama, Qwen2, Mistral (one window),
and the architectures whose layers vary: Gemma 2 (sandwich and 1 + w norms, GELU-tanh, attention softcap,
sliding and global layers), Gemma 3 (q/k norms, two RoPE tables), Qwen3 (q/k norms) and SmolLM3 (layers without
RoPE), with contexts longer than their windows.

Tolerance: the two paths run the same qweight_matvec on their projections, but rms_norm, rotary, softmax and
silu are computed by different code (ATen's vectorised kernels vs the C++ loops; the C++ exp is its own
polynomial, <= 1.2 ulp), and summation orders differ, so results differ by float32 rounding, carried through the
later layers. Measured on these models: max |diff| <= 4e-7 x max |value| over the hidden states and the
written K/V (a few ulp). The bound used, 1e-5 x max |value|, leaves room for other CPUs' summation orders and
is still far below any real error (a wrong rotation, slot, mask or head mapping moves values by a sizeable
fraction of their magnitude).
With a float16 KV cache both paths round K/V to float16 (to nearest even), but a few-ulp float32 difference can
land either side of a float16 rounding boundary: 2^-11 of that value, so the bound is then 1e-3 x max |value|
(measured: 1.8e-7, no value crossed one).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from arch_harness import save_tiny_hf, tiny_gemma3, tiny_vocab  # noqa: E402
from jisu import LLM, SamplingParams  # noqa: E402
from jisu.models.config import ModelConfig  # noqa: E402
from jisu.models.fused_decode import MAX_FUSED_SEQS, FusedDecoder, layer_by_layer, supports  # noqa: E402
from jisu.runner.attention import AttentionMetadata, PrefillChunk  # noqa: E402
from tiny_models import make_tiny_hf_model  # noqa: E402

REL_TOL = 1e-5
REL_TOL_KV16 = 1e-3

CASES = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    # The tiny Mistral's window is 128 tokens: the long prompts below see only part of their context.
    "mistral-window-mqa": dict(arch="mistral", num_kv_heads=1),
    # K/V stored as float16 (the C++ attention converts with F16C, the eager one with torch).
    "llama-gqa-kv16": dict(arch="llama", num_kv_heads=2, kv_cache_dtype="float16"),
    # Built by transformers' own classes (see ARCH_MODELS): the layers that vary by architecture.
    "gemma3-windows": dict(hf="gemma3"),
    "gemma2-softcap": dict(hf="gemma2"),
    "gemma2-hd12": dict(hf="gemma2-hd12"),
    "qwen3": dict(hf="qwen3"),
    "smollm3-nope": dict(hf="smollm3"),
}
WINDOWS = {"mistral-window-mqa": 128, "gemma3-windows": 40, "gemma2-softcap": 37, "gemma2-hd12": 9}
"""The sliding window of each windowed case: its long prompts must see only part of their context."""

VOCAB, BOS, EOS = tiny_vocab("llama")


def _gemma3():
    # Windows wider than one attention chunk (16 slots) and narrower than the long prompts.
    return tiny_gemma3(window=WINDOWS["gemma3-windows"])


def _gemma2(head_dim=16, window=37, softcap=5.0):
    # Weights 10x transformers' init: scores of a few units, so the cap bends them and they land on both sides
    # of the C++ tanh's two branches (|s / cap| below and above 0.625; at the usual init all were below 0.013,
    # where the cap changes nothing a test can see).
    c = transformers.Gemma2Config(initializer_range=0.2,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, sliding_window=window,
        query_pre_attn_scalar=20, attn_logit_softcapping=softcap, final_logit_softcapping=3.0,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS,
    )
    c.architectures = ["Gemma2ForCausalLM"]
    return transformers.Gemma2ForCausalLM, c


def _qwen3():
    c = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    c.architectures = ["Qwen3ForCausalLM"]
    return transformers.Qwen3ForCausalLM, c


def _smollm3():
    # The default interval: layer 3 applies no RoPE.
    c = transformers.SmolLM3Config(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    c.architectures = ["SmolLM3ForCausalLM"]
    return transformers.SmolLM3ForCausalLM, c


ARCH_MODELS = {
    "gemma3": _gemma3,
    "gemma2": _gemma2,
    # head_dim 12: the portable attention code (not a multiple of 8); a window under one chunk.
    "gemma2-hd12": lambda: _gemma2(head_dim=12, window=9),
    "qwen3": _qwen3,
    "smollm3": _smollm3,
}


@pytest.fixture(scope="module", params=list(CASES))
def engine_llm(request, kernels, tmp_path_factory):
    model_args = dict(CASES[request.param])
    kv = model_args.pop("kv_cache_dtype", "auto")
    folder = tmp_path_factory.mktemp(request.param)
    if "hf" in model_args:
        path = save_tiny_hf(*ARCH_MODELS[model_args["hf"]](), folder)
    else:
        path = make_tiny_hf_model(folder, **model_args)
    # Small blocks: prompts and decode steps cross many block boundaries.
    return request.param, LLM(model=str(path), block_size=4, max_num_batched_tokens=4096, kv_cache_dtype=kv)


def prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of different lengths, some beyond the Mistral window (128), none a block multiple apart."""
    g = torch.Generator().manual_seed(seed)
    lengths = ([5, 150, 37, 131, 2, 64, 97, 200, 13, 126, 71, 3, 180, 44, 9, 140] * (n // 16 + 1))[:n]
    return [[int(t) for t in torch.randint(3, 300, (L,), generator=g)] for L in lengths]


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """The layers' input for these tokens, as the model's forward makes it (Gemma scales its embeddings)."""
    x = model.model.embed_tokens(ids)
    return x if model.model.embed_scale is None else x * model.model.embed_scale


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = REL_TOL) -> float:
    got, want = got.float(), want.float()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} exceeds {tol} x max |value| {scale:.3g}"
    return err / scale


def compare_step(llm: LLM, fused: FusedDecoder, step) -> float:
    """Runs the step's layers eagerly and fused from copies of the current cache; asserts they agree.
    Returns the largest relative difference seen."""
    model = llm.engine.model
    meta = step.meta
    caches = llm.engine.runner.kv_cache.layers
    tol = REL_TOL if caches[0][0].dtype == torch.float32 else REL_TOL_KV16
    eager_caches = [(k.clone(), v.clone()) for k, v in caches]
    fused_caches = [(k.clone(), v.clone()) for k, v in caches]
    with torch.inference_mode():
        x = embed(model, step.input_ids)
        rotation = model.model.rotations(step.positions)
        want = x
        for layer, kv in zip(model.model.layers, eager_caches):
            want = layer(want, rotation, meta, kv)
        got = fused(x, rotation, meta, fused_caches)
    worst = assert_close(got, want, "hidden", tol)
    with torch.inference_mode():  # the model's final norm, applied inside the call when given (from fresh caches)
        normed = fused(x, rotation, meta, [(k.clone(), v.clone()) for k, v in caches], final_norm=model.model.norm)
    assert_close(normed, model.model.norm(got), "final norm", tol)
    slots = meta.slot_mapping
    untouched = torch.ones(caches[0][0].shape[0], dtype=torch.bool)
    untouched[slots] = False
    for i, ((ek, ev), (fk, fv), (ok, ov)) in enumerate(zip(eager_caches, fused_caches, caches)):
        worst = max(worst, assert_close(fk[slots], ek[slots], f"layer {i} K", tol))
        worst = max(worst, assert_close(fv[slots], ev[slots], f"layer {i} V", tol))
        # Every other slot is left as it was.
        assert torch.equal(fk[untouched], ok[untouched]) and torch.equal(fv[untouched], ov[untouched])
    return worst


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 40])  # 40: past the old limit of 16 and the 4-row direct path
def test_fused_equals_eager_on_decode_steps(engine_llm, num_seqs):
    name, llm = engine_llm
    fused = FusedDecoder.build(llm.engine.model)
    assert fused is not None and fused.num_layers == len(llm.engine.model.model.layers)
    runner = llm.engine.runner
    original = runner.execute
    checked: list[tuple[int, float]] = []
    decode_steps = 0

    def spy(step):
        nonlocal decode_steps
        n = len(step.input_ids)
        if FusedDecoder.applies(step.meta, n):
            decode_steps += 1
            if decode_steps >= 3 and n == num_seqs:  # after a few decode steps through the engine
                checked.append((int(step.meta.decode_gather.shape[1]), compare_step(llm, fused, step)))
        return original(step)

    runner.execute = spy
    try:
        params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
        llm.generate(prompts(num_seqs, seed=num_seqs), params)
    finally:
        runner.execute = original
    assert checked, f"{name}: no pure decode step of {num_seqs} sequences was compared"
    if name in WINDOWS and num_seqs > 1:
        assert max(ctx for ctx, _ in checked) > WINDOWS[name]  # the window really cut the context


def test_fused_generation_matches_eager(engine_llm):
    """Greedy tokens with the fused stack standing in for the layers on decode steps equal the eager ones."""
    name, llm = engine_llm
    model = llm.engine.model
    fused = FusedDecoder.build(model)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = prompts(5, seed=7)
    with layer_by_layer(model):  # the model's own fused path off: truly eager
        eager = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    used = 0
    original = model.forward

    def forward(input_ids, positions, meta, kv_caches):
        nonlocal used
        if not FusedDecoder.applies(meta, input_ids.shape[0]):
            return original(input_ids, positions, meta, kv_caches)
        used += 1
        x = embed(model, input_ids)
        rotation = model.model.rotations(positions)
        return model.model.norm(fused(x, rotation, meta, kv_caches))

    model.forward = forward
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    finally:
        del model.forward
    assert used >= 10
    assert got == eager, name


def test_applies():
    slots = torch.zeros(3, dtype=torch.long)
    decode = AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_gather=torch.zeros(3, 4, dtype=torch.long))
    assert FusedDecoder.applies(decode, 3)
    assert not FusedDecoder.applies(decode, 4)  # a prefill token besides the decodes
    chunk = PrefillChunk(start=3, length=1, context_len=1, gather=None, mask=None)
    assert not FusedDecoder.applies(AttentionMetadata(slots, 3, decode.decode_gather, None, [chunk]), 3)
    assert not FusedDecoder.applies(AttentionMetadata(torch.zeros(0, dtype=torch.long), 0), 0)
    for d in (MAX_FUSED_SEQS, MAX_FUSED_SEQS + 1):
        big = AttentionMetadata(torch.zeros(d, dtype=torch.long), d, torch.zeros(d, 4, dtype=torch.long))
        assert FusedDecoder.applies(big, d) == (d == MAX_FUSED_SEQS)


def test_build_declines_without_kernels(tmp_path):
    path = make_tiny_hf_model(tmp_path / "m", arch="llama", num_kv_heads=2)
    llm = LLM(model=str(path), cpu_kernels=False)
    assert FusedDecoder.build(llm.engine.model) is None


def test_rejects_bad_inputs(engine_llm):
    _, llm = engine_llm
    model = llm.engine.model
    fused = FusedDecoder.build(model)
    cfg = model.config
    d, ctx = 0, 4
    caches = llm.engine.runner.kv_cache.layers
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(d, dtype=torch.long),
        num_decodes=d,
        decode_gather=torch.zeros(d, ctx, dtype=torch.long),
        decode_mask=torch.ones(d, 1, 1, ctx, dtype=torch.bool),
    )
    every_window(meta, cfg)
    x = torch.zeros(d, cfg.hidden_size)
    rotation = model.model.rotations(torch.zeros(d, dtype=torch.long))
    with pytest.raises(RuntimeError, match="needs at least one sequence"):
        fused(x, rotation, meta, caches)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.long),
        num_decodes=1,
        decode_gather=torch.full((1, ctx), caches[0][0].shape[0], dtype=torch.long),
        decode_mask=torch.ones(1, 1, 1, ctx, dtype=torch.bool),
    )
    every_window(meta, cfg)
    one_x, one_rotation = torch.zeros(1, cfg.hidden_size), model.model.rotations(torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused(one_x, one_rotation, meta, caches)


def every_window(meta: AttentionMetadata, cfg) -> None:
    """The same indices for every window the layers use (as if the context fitted them all)."""
    meta.by_window = {w: meta for w in cfg.attention_windows}


def test_supports():
    base = dict(architecture="x", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=16)
    gemma3 = dict(qk_norm=True, norm_unit_offset=True, sandwich_norm=True, hidden_act="gelu_tanh",
                  layer_types=("sliding", "full"), sliding_window=4, rope_local_theta=1e4)
    for fields in ({}, gemma3, dict(attn_softcap=50.0, sandwich_norm=True), dict(rope_layers=(True, False))):
        assert supports(ModelConfig(**base, **fields)), fields
    for fields in (dict(hidden_act="gelu"), dict(norm_type="layer"), dict(gated_mlp=False),
                   dict(learned_positions=True), dict(num_experts=4, num_experts_per_tok=2)):
        assert not supports(ModelConfig(**base, **fields)), fields


def _answer(out) -> tuple:
    c = out.outputs[0]
    return tuple(c.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in c.logprobs)


def test_windowed_rows_do_not_depend_on_batch_or_cache(tmp_path, kernels):
    """Deterministic steps on a model with sliding and global layers: every prompt row runs through the fused
    stack under both windows, and a request's logprobs are bit for bit the same alone, in a batch, with a cached
    prefix and in small prompt chunks (see jisu/runner/runner.py's NOTE)."""
    path = save_tiny_hf(*ARCH_MODELS["gemma3"](), tmp_path / "g3")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    target = [int(t) for t in torch.randint(3, 300, (90,), generator=torch.Generator().manual_seed(9))]
    others = prompts(5, seed=5)
    llm = LLM(model=str(path), block_size=4)
    assert llm.engine.model.fused_decode is not None
    cold = _answer(llm.generate([target], params)[0])
    warm = llm.generate([target], params)[0]
    assert warm.metrics.cached_prompt_tokens > 40  # past the window
    assert _answer(warm) == cold, "a prefix-cache hit changed the answer"
    batched = llm.generate(others[:2] + [target] + others[2:], params)
    assert _answer(batched[2]) == cold, "sharing the batch changed the answer"
    chunked = LLM(model=str(path), block_size=4, max_num_batched_tokens=13)
    assert _answer(chunked.generate([target], params)[0]) == cold, "prompt chunks changed the answer"
