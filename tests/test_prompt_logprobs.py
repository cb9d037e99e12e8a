"""Prompt logprobs from the prefill's own forward (SamplingParams.prompt_logprobs) and max_tokens 0.

The reference is score_batch: a plain forward of the whole sequence whose every row goes through the output layer.
In deterministic mode (the default) the numbers must be equal exactly whatever the chunking, the batch or a
preemption; with deterministic=False (whole steps, torch GEMMs) within float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from jisu import LLM, SamplingParams
from jisu.model_run import score_batch

TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time",
]


def entries(out) -> list[tuple]:
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    return [(e.token_id, e.logprob, e.rank, tuple(e.top)) for e in out.prompt_logprobs[1:]]


def reference(engine, ids: list[int], k: int) -> list[tuple]:
    lp = torch.log_softmax(score_batch(engine, [ids])[0], dim=-1)
    out = []
    for p in range(len(ids) - 1):
        row, t = lp[p], ids[p + 1]
        top_v, top_i = row.topk(k)
        out.append((t, row[t].item(), int((row > row[t]).sum()) + 1, tuple(zip(top_i.tolist(), top_v.tolist()))))
    return out


@pytest.fixture(scope="module")
def llm(real_llm):
    return real_llm


@pytest.fixture(scope="module")
def ids(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture
def budget(llm, monkeypatch):
    """Sets the scheduler's token budget per step (chunks prompts longer than it)."""
    def set_budget(n: int) -> None:
        monkeypatch.setattr(llm.engine.scheduler.config, "max_num_batched_tokens", n)
    return set_budget


def test_prompt_logprobs_equal_a_plain_forward(llm, ids):
    free = llm.engine.blocks.num_free_blocks
    out = llm.generate([ids[0]], SamplingParams(max_tokens=0, prompt_logprobs=3))[0]
    got, ref = entries(out), reference(llm.engine, ids[0], 3)
    assert len(got) == len(ids[0]) - 1
    for (t, lp, rank, top), (rt, rlp, rrank, rtop) in zip(got, ref):
        assert t == rt and rank == rrank
        assert lp == pytest.approx(rlp, abs=1e-5)
        assert [i for i, _ in top] == [i for i, _ in rtop]
    assert llm.engine.blocks.num_free_blocks == free


def test_prompt_logprobs_exact_across_chunking_and_batching(llm, ids, budget):
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    single = [entries(llm.generate([x], params)[0]) for x in ids]
    budget(5)  # every prompt in several chunks, sharing steps with the others' chunks
    chunked = [entries(o) for o in llm.generate(ids, params)]
    assert chunked == single
    budget(1024)
    # Batched with requests that generate (their decode rows share the steps).
    mixed = llm.generate(ids + ["Hello there"], [params] * 3 + [SamplingParams(temperature=0, max_tokens=8)])
    assert [entries(o) for o in mixed[:3]] == single


def test_prompt_logprobs_alongside_generation(llm, ids):
    """max_tokens > 0: the prompt's logprobs and the generated tokens, the tokens unchanged by asking."""
    plain = llm.generate([ids[2]], SamplingParams(temperature=0, max_tokens=6))[0]
    out = llm.generate([ids[2]], SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, logprobs=0))[0]
    assert out.token_ids == plain.token_ids
    assert all(e.top == [] for e in out.prompt_logprobs[1:])
    assert [e[1] for e in entries(out)] == [e[1] for e in reference(llm.engine, ids[2], 1)]


def test_prompt_rows_skip_the_prefix_cache(llm, ids):
    prompt = ids[0] * 3  # longer than a KV block, so its first blocks are cached
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    assert again.metrics.cached_prompt_tokens > 0  # the cache would have served it...
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.metrics.cached_prompt_tokens == 0  # ...but its rows had to be computed
    assert all(e is not None for e in out.prompt_logprobs[1:])


def test_max_tokens_zero_computes_only_the_prompt(llm, ids):
    free = llm.engine.blocks.num_free_blocks
    outs = llm.generate(ids, SamplingParams(max_tokens=0))
    for o in outs:
        assert o.finished and o.finish_reason == "length"
        assert o.token_ids == [] and o.text == "" and o.prompt_logprobs is None
        assert o.metrics.prefill_time > 0 and o.metrics.prefill_tokens_per_s > 0 and o.metrics.time_to_first_token is None
    assert llm.engine.blocks.num_free_blocks == free


def test_n_sequences_share_one_prompt_computation(llm, ids):
    out = llm.generate([ids[1]], SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=4, prompt_logprobs=1))[0]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 4 for c in out.outputs)
    assert entries(out) == reference(llm.engine, ids[1], 1)


def test_prompt_logprobs_survive_preemption(tiny_llama_dir):
    """A KV cache too small for every sequence at once preempts and recomputes; logprobs stay exact."""
    roomy = LLM(model=str(tiny_llama_dir), num_kv_blocks=256, block_size=4)
    tight = LLM(model=str(tiny_llama_dir), num_kv_blocks=12, block_size=4, max_num_batched_tokens=8)
    prompts = [[1 + (i * 7 + j) % 90 for j in range(10 + i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2)
    want = [entries(o) for o in roomy.generate(prompts, params)]
    got = tight.generate(prompts, params)
    assert sum(o.metrics.num_preemptions for o in got) > 0
    assert [entries(o) for o in got] == want
    assert tight.engine.blocks.num_free_blocks == 12


def test_whole_steps_match_within_tolerance(tiny_llama_dir):
    """deterministic=False runs prompt chunks as whole GEMMs: close to the plain forward, chunked or not."""
    llm = LLM(model=str(tiny_llama_dir), deterministic=False, max_num_batched_tokens=6)
    prompt = [1 + (j * 5) % 90 for j in range(20)]
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    ref = reference(llm.engine, prompt, 2)
    for (t, lp, rank, _), (rt, rlp, rrank, _) in zip(entries(out), ref):
        assert t == rt and lp == pytest.approx(rlp, abs=1e-4)


def test_max_tokens_zero_may_fill_the_context(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), max_model_len=32, num_kv_blocks=16, block_size=4)
    prompt = [1 + j % 90 for j in range(32)]
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.finish_reason == "length" and len(out.prompt_logprobs) == 32
    from jisu.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        llm.generate([prompt], SamplingParams(max_tokens=1))
