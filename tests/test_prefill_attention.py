"""The C++ prefill attention kernel (jisu/kernels/prefill_attention.cpp) against a float64 reference, its use by
paged_attention and the runner, and whole prompts through the engine.

Tolerance: the kernel computes in float32 (scores, the online softmax with the C++ exp polynomial of <= 1.2 ulp,
the weighted sum) from the same K/V values as the reference (float16 caches widen exactly), so it differs by
float32 rounding: measured max |diff| <= 7e-6 on outputs of magnitude ~1 over these cases; 5e-5 leaves room for
other CPUs and is far below a wrong mask, slot or head mapping (differences of order 0.1-1).
"""

from __future__ import annotations

import pytest
import torch

from jisu.runner.attention import AttentionMetadata, PrefillChunk, paged_attention, query_blocks

ATOL = 5e-5


def reference(q, k_all, v_all, start: int, window: int, scale: float, softcap: float) -> torch.Tensor:
    """Causal GQA attention in float64: q [n, H, D] at positions start.., keys/values [start + n, KVH, D]."""
    ctx = start + q.shape[0]
    q_pos, k_pos = torch.arange(start, ctx)[:, None], torch.arange(ctx)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    group = q.shape[1] // k_all.shape[1]
    k = k_all.double().repeat_interleave(group, dim=1)
    v = v_all.double().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,khd->hnk", q.double(), k) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    p = s.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("hnk,khd->nhd", p, v)


def random_case(n, start, heads, kv_heads, dim, dtype, seed=0):
    """q, the sequence's K/V (rounded to the cache dtype) and a cache holding them at shuffled slots."""
    g = torch.Generator().manual_seed(seed)
    ctx = start + n
    q = torch.randn(n, heads, dim, generator=g)
    k_all = torch.randn(ctx, kv_heads, dim, generator=g).to(dtype)
    v_all = torch.randn(ctx, kv_heads, dim, generator=g).to(dtype)
    slots = torch.randperm(ctx + 11, generator=g)[:ctx]
    k_cache = torch.zeros(ctx + 11, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache[slots], v_cache[slots] = k_all, v_all
    return q, k_all, v_all, slots, k_cache, v_cache


CASES = [
    # (n, start, H, KVH, D, window, cache dtype, softcap)
    (1, 0, 9, 3, 64, 0, torch.float16, 0.0),
    (7, 0, 9, 3, 64, 0, torch.float16, 0.0),
    (64, 0, 4, 4, 64, 0, torch.float32, 0.0),  # GQA ratio 1
    (130, 0, 8, 2, 128, 0, torch.float16, 0.0),  # ratio 4
    (600, 0, 9, 3, 64, 0, torch.float16, 0.0),
    (1, 300, 9, 3, 64, 0, torch.float16, 0.0),  # after cached context: read through the slots
    (37, 100, 8, 2, 128, 0, torch.float32, 0.0),
    (130, 70, 8, 2, 256, 50, torch.float32, 0.0),  # Gemma's head dim, a window
    (200, 300, 8, 2, 64, 100, torch.float16, 0.0),
    (150, 0, 8, 2, 256, 64, torch.float16, 30.0),  # Gemma 2: window and softcap
    (5, 3, 4, 1, 72, 0, torch.float32, 0.0),  # head dim not a multiple of 16
    (70, 0, 4, 1, 20, 9, torch.float16, 0.0),  # nor of 8: the portable loops
    (3, 0, 6, 3, 64, 1, torch.float32, 0.0),  # window 1: each query sees only itself
]


@pytest.mark.parametrize("n, start, heads, kv_heads, dim, window, dtype, softcap", CASES)
def test_kernel_matches_float64_attention(kernels, n, start, heads, kv_heads, dim, window, dtype, softcap):
    q, k_all, v_all, slots, k_cache, v_cache = random_case(n, start, heads, kv_heads, dim, dtype, seed=n + start)
    scale = 3 * dim**-0.5  # scores of a few units: the softmax is far from uniform
    out = torch.full((n, heads, dim), float("nan"))
    if start == 0:  # the chunk is the whole context: its own rows, no slots
        kernels.prefill_attention(q, k_all, v_all, None, 0, window, scale, softcap, out)
    else:
        kernels.prefill_attention(q, k_cache, v_cache, slots, start, window, scale, softcap, out)
    want = reference(q, k_all, v_all, start, window, scale, softcap)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL)


def test_result_does_not_depend_on_chunking(kernels):
    """A prompt attended in one chunk and in uneven chunks (the later ones reading the cache) gives bit-identical
    rows: blocks of keys start at fixed positions and no lane mixes rows (see the kernel's NOTE)."""
    n, heads, kv_heads, dim = 300, 9, 3, 64
    q, k_all, v_all, slots, k_cache, v_cache = random_case(n, 0, heads, kv_heads, dim, torch.float16)
    for window in (0, 100):
        whole = torch.empty(n, heads, dim)
        kernels.prefill_attention(q, k_all, v_all, None, 0, window, 0.125, 0.0, whole)
        pieces = torch.empty(n, heads, dim)
        bounds = [0, 1, 17, 64, 65, 200, n]
        kernels.prefill_attention(q[:1], k_all[:1], v_all[:1], None, 0, window, 0.125, 0.0, pieces[:1])
        for a, b in zip(bounds[1:-1], bounds[2:]):
            kernels.prefill_attention(q[a:b], k_cache, v_cache, slots[:b], a, window, 0.125, 0.0, pieces[a:b])
        assert torch.equal(whole, pieces), window


def test_strided_inputs_and_output(kernels):
    """q, k and v as the model passes them (views into one projection output) and out as rows of a larger tensor."""
    n, heads, kv_heads, dim = 40, 6, 2, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, heads + 2 * kv_heads, dim, generator=g)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    out = torch.zeros(n + 5, heads, dim)
    kernels.prefill_attention(q, k, v, None, 0, 0, 0.125, 0.0, out[2 : n + 2])
    torch.testing.assert_close(out[2 : n + 2].double(), reference(q, k, v, 0, 0, 0.125, 0.0), rtol=0, atol=ATOL)
    assert not out[:2].any() and not out[n + 2 :].any()


def test_rejects_bad_inputs(kernels):
    q = torch.randn(4, 6, 64)
    k = v = torch.randn(4, 2, 64)
    out = torch.empty(4, 6, 64)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        kernels.prefill_attention(q, torch.randn(4, 4, 64), torch.randn(4, 4, 64), None, 0, 0, 0.1, 0.0, out)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        kernels.prefill_attention(q, k.bfloat16(), v.bfloat16(), None, 0, 0, 0.1, 0.0, out)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.prefill_attention(q, k, v, torch.tensor([0, 1, 2, 9, 3]), 1, 0, 0.1, 0.0, out)
    with pytest.raises(RuntimeError, match="a row for each"):
        kernels.prefill_attention(q, k, v, None, 2, 0, 0.1, 0.0, out)


@pytest.mark.parametrize("start, window", [(0, None), (90, None), (50, 40)])
def test_paged_attention_kernel_path_matches_torch_path(kernels, start, window):
    """paged_attention with the kernel in the step's metadata against the torch path (blocked SDPA), float16 cache:
    both write the chunk's K/V and read the same rounded values."""
    n, heads, kv_heads, dim = 150, 6, 2, 32
    q, k_all, v_all, slots, _, _ = random_case(n, start, heads, kv_heads, dim, torch.float32, seed=start)
    results, caches = [], []
    for use_kernel in (True, False):
        k_cache = torch.zeros(start + n + 11, kv_heads, dim, dtype=torch.float16)
        v_cache = torch.zeros_like(k_cache)
        k_cache[slots[:start]], v_cache[slots[:start]] = k_all[:start].half(), v_all[:start].half()
        gather = slots if start else None
        blocks = None if use_kernel else query_blocks(n, start, window, torch.device("cpu"))
        chunk = PrefillChunk(start=0, length=n, context_len=start + n, gather=gather, mask=None, query_blocks=blocks)
        meta = AttentionMetadata(slot_mapping=slots[start:], num_decodes=0, prefills=[chunk], window=window,
                                 kernels=kernels if use_kernel else None)
        results.append(paged_attention(q, k_all[start:], v_all[start:], k_cache, v_cache, meta, scale=0.3))
        caches.append((k_cache, v_cache))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=ATOL)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


# ---- whole prompts through the engine (a tiny Llama, float16 cache) ----


@pytest.fixture(scope="module")
def tiny_model(kernels, tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("prefill-attn"), arch="llama", num_kv_heads=2)


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [[int(t) for t in torch.randint(3, 300, (length,), generator=g)] for length in (150, 37, 97)]


def test_chunked_prefill_gives_the_same_tokens(tiny_model):
    from jisu import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for budget in (4096, 24):  # one chunk per prompt; chunks of at most 24 tokens
        llm = LLM(model=str(tiny_model), block_size=4, max_num_batched_tokens=budget, kv_cache_dtype="float16")
        assert llm.engine.runner.prefill_kernels is not None
        tokens[budget] = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params)]
    assert tokens[4096] == tokens[24]


def test_prompt_logits_close_to_the_torch_path(tiny_model):
    from jisu import LLM
    from jisu.model_run import score_batch

    llm = LLM(model=str(tiny_model), block_size=4, kv_cache_dtype="float16")
    runner = llm.engine.runner
    assert runner.prefill_kernels is not None
    with torch.inference_mode():
        new = score_batch(llm.engine, _prompts())
        runner.prefill_kernels = None  # torch's SDPA
        old = score_batch(llm.engine, _prompts())
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
