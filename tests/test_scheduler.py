"""The scheduler without a model: token budgets, chunked prefill, continuous batching, preemption."""

from jisu.config import SchedulerConfig
from jisu.request import FinishReason, Request, RequestStatus
from jisu.sampling_params import SamplingParams
from jisu.scheduler.blocks import BlockManager
from jisu.scheduler.scheduler import Scheduler


def make(num_blocks=64, block_size=4, max_seqs=8, budget=64, prefix_caching=False):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm), bm


def req(rid, prompt_len, max_tokens=100):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, sample_token=7):
    """What the engine does after a forward: mark tokens computed, append a token to sampling sequences."""
    out = s.schedule()
    s.update(out)
    for sr in out.scheduled:
        r = sr.request
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(sample_token, None, 0.0)
    return out


def test_prefill_then_decode_one_token_per_step():
    s, _ = make()
    s.add(req("a", 10))
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1)]


def test_long_prompt_is_chunked_within_budget_and_samples_only_at_the_end():
    s, _ = make(budget=8)
    s.add(req("a", 20))
    chunks = []
    for _ in range(3):
        out = s.schedule()
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        s.update(out)
    assert chunks == [(8, False), (8, False), (4, True)]


def test_running_requests_keep_decoding_while_a_long_prompt_loads():
    s, _ = make(budget=8)
    s.add(req("a", 3))
    run_step(s)  # a prefilled
    s.add(req("b", 30))
    out = run_step(s)
    got = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"a": 1, "b": 7}  # a decodes, b takes the rest of the budget


def test_new_requests_join_and_finished_ones_leave():
    s, bm = make()
    s.add(req("a", 4))
    run_step(s)
    s.add(req("b", 4))
    out = run_step(s)
    assert {x.request.request_id for x in out.scheduled} == {"a", "b"}
    a = s.running[0]
    s.finish(a, FinishReason.STOP)
    assert a.status is RequestStatus.FINISHED
    assert bm.table("a") == []
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["b"]


def test_max_num_seqs_limits_the_batch():
    s, _ = make(max_seqs=2)
    for i in range(4):
        s.add(req(str(i), 2))
    out = run_step(s)
    assert len(out.scheduled) == 2
    assert len(s.waiting) == 2


def test_preemption_frees_the_newest_and_recomputes_it_later():
    # 6 blocks of 2 tokens = 12 slots. Two sequences of 5 prompt tokens use 3 blocks each.
    s, bm = make(num_blocks=6, block_size=2, budget=64)
    a, b = req("a", 5), req("b", 5)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 6 tokens each (5 + 1 sampled), 5 computed, 3 blocks each
    run_step(s)  # token 6 computed for both: still 3 blocks each, 0 free
    assert bm.num_free_blocks == 0
    out = run_step(s)  # a needs a 4th block for its 7th token: b, the newest, is preempted
    assert out.preempted == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert s.waiting[0] is b
    assert b.output_token_ids == [7, 7]  # its output is kept and will be recomputed, never lost
    s.finish(a, FinishReason.STOP)
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 7)]
    assert out.scheduled[0].samples


def test_a_sequence_that_cannot_grow_preempts_itself_when_alone():
    s, bm = make(num_blocks=2, block_size=2)
    a = req("a", 4)
    s.add(a)
    run_step(s)  # 5 tokens, needs 3 blocks next step, pool has 2
    out = s.schedule()
    assert out.preempted == ["a"] and out.is_empty
    assert bm.num_free_blocks == 2


def test_abort_of_a_waiting_request_frees_nothing_twice():
    s, bm = make()
    r = req("a", 4)
    s.add(r)
    s.finish(r, FinishReason.ABORT)
    assert not s.has_unfinished
    assert r.finish_reason is FinishReason.ABORT
    assert bm.num_free_blocks == bm.num_blocks


def test_preempted_sequence_reuses_its_cached_blocks_when_readmitted():
    s, bm = make(num_blocks=6, block_size=2, prefix_caching=True)
    a, b = req("a", 5), req("b", 5)
    s.add(a)
    s.add(b)
    for _ in range(3):
        run_step(s)  # the third step preempts b, as in the test above
    assert b.status is RequestStatus.PREEMPTED
    s.finish(a, FinishReason.STOP)
    out = run_step(s)
    # b's 7 tokens: its first 3 full blocks (6 tokens) are still cached, so only the last token is computed.
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 1)]


def test_shared_prompt_prefix_is_computed_once():
    s, bm = make(block_size=4, prefix_caching=True)
    system = list(range(100, 112))  # 12 tokens = 3 full blocks
    first = Request("first", system + [1, 2], SamplingParams(max_tokens=5))
    s.add(first)
    run_step(s)
    second = Request("second", system + [3, 4, 5], SamplingParams(max_tokens=5))
    s.add(second)
    out = run_step(s)
    got = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"first": 1, "second": 3}
    assert second.num_cached_tokens == 12
    assert bm.table("second")[:3] == bm.table("first")[:3]
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == 14 + 15
