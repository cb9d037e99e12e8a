"""Properties any correct engine keeps, checked on a tiny random model: batching, seeds, streaming,
preemption and chunked prefill never change what a request gets."""

from __future__ import annotations

import pytest

from jisu import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    # Different lengths on purpose: 3..(3 + 5n) tokens.
    return [[(7 * i + 3 * j) % 250 + 3 for j in range(3 + 5 * i)] for i in range(n)]


def greedy_alone(llm: LLM, ps) -> list[list[int]]:
    return [llm.generate([p], GREEDY)[0].token_ids for p in ps]


def assert_no_leak(llm: LLM):
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


def test_batch_of_eight_equals_each_alone(tiny_llm):
    ps = prompts(8)
    alone = greedy_alone(tiny_llm, ps)
    batched = [o.token_ids for o in tiny_llm.generate(ps, GREEDY)]
    assert batched == alone
    assert len({tuple(t) for t in alone}) > 1, "prompts should give different continuations"
    assert_no_leak(tiny_llm)


def test_same_seed_same_text_whatever_else_is_in_the_batch(tiny_llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    p = prompts(3)[2]
    alone = tiny_llm.generate([p], sp)[0].token_ids
    again = tiny_llm.generate([p], sp)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = tiny_llm.generate(prompts(4)[:2] + [p] + prompts(4)[3:], [others, others, sp, others])[2].token_ids
    assert alone == again == mixed
    different = tiny_llm.generate([p], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert different[0].token_ids != alone


def test_n_samples_are_distinct_and_reproducible(tiny_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    out = tiny_llm.generate([prompts(2)[1]], sp)[0]
    seqs = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(s) for s in seqs}) == 3
    assert [c.token_ids for c in tiny_llm.generate([prompts(2)[1]], sp)[0].outputs] == seqs
    assert_no_leak(tiny_llm)


def test_streamed_text_equals_non_streamed(tiny_llm):
    for p in prompts(3):
        sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        full = tiny_llm.generate([p], sp)[0].text
        pieces = list(tiny_llm.stream(p, sp))
        assert "".join(pieces) == full
        assert len(pieces) > 1
    assert_no_leak(tiny_llm)


def test_abandoned_stream_is_aborted_and_frees_its_blocks(tiny_llm):
    stream = tiny_llm.stream(prompts(1)[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert_no_leak(tiny_llm)


def test_preemption_under_a_tiny_kv_budget_keeps_greedy_output(tiny_llama_dir, tiny_llm):
    ps = prompts(6)
    expected = greedy_alone(tiny_llm, ps)
    # 12 blocks of 4 tokens: the longest sequence alone needs 11, so the six cannot all stay resident.
    small = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=12)
    got = [o.token_ids for o in small.generate(ps, GREEDY)]
    assert small.engine.scheduler.total_preemptions > 0
    assert got == expected
    assert_no_leak(small)


def test_chunked_prefill_keeps_output(tiny_llama_dir, tiny_llm):
    ps = prompts(5)
    expected = greedy_alone(tiny_llm, ps)
    chunked = LLM(model=str(tiny_llama_dir), max_num_batched_tokens=5)
    assert [o.token_ids for o in chunked.generate(ps, GREEDY)] == expected


def test_stop_string_ends_output_and_is_not_emitted(tiny_llm):
    p = prompts(2)[1]
    free = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].text
    assert len(free) > 6
    stop = free[3:6]
    out = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.text == free[: free.find(stop)]
    streamed = "".join(tiny_llm.stream(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_stop_token_ids_and_max_tokens(tiny_llm):
    p = prompts(2)[0]
    free = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    target = free.token_ids[4]
    out = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target]))[0]
    first = free.token_ids.index(target)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]


def test_eos_finishes_unless_ignored(tiny_llm):
    p = prompts(2)[0]
    free = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    eos = free.token_ids[2]
    engine = tiny_llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = (eos,)
    try:
        out = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=10))[0]
        ignored = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    finally:
        engine.eos_token_ids = saved
    first = free.token_ids.index(eos)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert ignored.token_ids == free.token_ids


def test_logprobs_of_sampled_tokens(tiny_llm):
    out = tiny_llm.generate([prompts(2)[1]], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and lp.rank == 1  # greedy picks the top token
        assert len(lp.top) == 3 and lp.top[0][0] == tok
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_metrics_are_filled_in(tiny_llm):
    out = tiny_llm.generate([prompts(2)[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    m = out.metrics
    assert m.prompt_tokens == len(prompts(2)[1]) and m.completion_tokens == 8
    assert 0 < m.time_to_first_token <= m.e2e_time
    assert m.prefill_tokens_per_s > 0 and m.decode_tokens_per_s > 0


def test_generation_stops_at_the_context_window(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), max_model_len=24)
    out = llm.generate([list(range(3, 23))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize("bad", ["", []])
def test_empty_prompt_is_refused(tiny_llm, bad):
    from jisu.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_llm.generate([bad] if bad == "" else [[]], GREEDY)
    assert_no_leak(tiny_llm)


def test_vllm_style_prompt_dicts(tiny_llm):
    """{"prompt_token_ids": ids} and {"prompt": text} are the prompts they hold (a dict used to be iterated as a
    list of prompts, so its key became the prompt text); any other dict is refused by name."""
    from jisu.errors import InvalidRequestError

    ids = tiny_llm.tokenizer.encode("hello world")
    by_ids = tiny_llm.generate(ids, GREEDY)[0]
    assert tiny_llm.generate({"prompt_token_ids": ids}, GREEDY)[0].token_ids == by_ids.token_ids
    both = tiny_llm.generate([{"prompt": "hello world"}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.prompt_token_ids for o in both] == [ids, ids]
    assert both[1].token_ids == by_ids.token_ids
    for bad in ({"text": "hi"}, {"prompt": "hi", "prompt_token_ids": ids}, {}):
        with pytest.raises(InvalidRequestError, match="'prompt' \\(text\\) or 'prompt_token_ids'"):
            tiny_llm.generate(bad, GREEDY)
    assert_no_leak(tiny_llm)


def test_prompt_longer_than_context_names_both_numbers(tiny_llama_dir):
    from jisu.errors import InvalidRequestError

    llm = LLM(model=str(tiny_llama_dir), max_model_len=16)
    with pytest.raises(InvalidRequestError, match=r"20 tokens.*16"):
        llm.generate([list(range(3, 23))], GREEDY)
    with pytest.raises(InvalidRequestError, match=r"10.*12.*16"):
        llm.generate([list(range(3, 13))], GREEDY)
    assert_no_leak(llm)


def test_prefix_cache_hits_keep_greedy_output(tiny_llama_dir):
    shared = [(11 * j) % 240 + 5 for j in range(40)]
    ps = [shared + [3 + i, 9 + i] for i in range(4)]
    cold = LLM(model=str(tiny_llama_dir), block_size=4, enable_prefix_caching=False)
    expected = greedy_alone(cold, ps)
    warm = LLM(model=str(tiny_llama_dir), block_size=4)
    got = greedy_alone(warm, ps)  # one after another: each later prompt finds the shared blocks cached
    assert got == expected
    assert warm.engine.blocks.prefix_cache_hits >= 3 * 40 // 4 * 4
    outs = warm.generate(ps, GREEDY)
    assert [o.metrics.cached_prompt_tokens for o in outs] == [40] * 4
    assert_no_leak(warm)


def test_context_window_beyond_the_models_positions_is_refused(tiny_llama_dir):
    from jisu.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="256 positions"):
        LLM(model=str(tiny_llama_dir), max_model_len=1024)
