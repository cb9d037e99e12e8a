"""The scheduler's cap on prompt tokens in steps with decodes (SchedulerConfig.max_prefill_tokens_with_decodes),
and that capped steps leave a request's tokens unchanged (deterministic mode: chunking does not matter)."""

import pytest

from jisu.config import SchedulerConfig
from jisu.errors import InvalidRequestError
from jisu.request import Request
from jisu.sampling_params import SamplingParams
from jisu.scheduler.blocks import BlockManager
from jisu.scheduler.scheduler import Scheduler


def make(cap, budget=64, max_seqs=8, num_blocks=64, block_size=4):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             max_prefill_tokens_with_decodes=cap)
    return Scheduler(config, bm)


def req(rid, prompt_len, max_tokens=100):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler):
    out = s.schedule()
    s.update(out)
    for sr in out.scheduled:
        r = sr.request
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7, None, 0.0)
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def test_config_checks_the_cap():
    default = SchedulerConfig().max_prefill_tokens_with_decodes
    assert default is None or default >= 1
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_prefill_tokens_with_decodes=0)


def test_no_decodes_no_cap():
    s = make(cap=4)
    s.add(req("a", 30))
    assert run_step(s) == {"a": 30}  # alone, a prompt takes the whole budget


def test_prompts_share_the_cap_while_others_decode():
    s = make(cap=6)
    s.add(req("a", 3))
    run_step(s)  # a prefilled: it decodes from now on
    s.add(req("b", 10))
    s.add(req("c", 10))
    assert run_step(s) == {"a": 1, "b": 6}  # c waits: the cap is spent
    assert run_step(s) == {"a": 1, "b": 4, "c": 2}  # b's rest, c's first chunk
    assert run_step(s) == {"a": 1, "b": 1, "c": 6}
    assert run_step(s) == {"a": 1, "b": 1, "c": 2}
    assert run_step(s) == {"a": 1, "b": 1, "c": 1}


def test_uncapped_steps_take_the_whole_budget():
    s = make(cap=None)
    s.add(req("a", 3))
    run_step(s)
    s.add(req("b", 10))
    s.add(req("c", 10))
    assert run_step(s) == {"a": 1, "b": 10, "c": 10}


def test_decodes_are_never_capped():
    s = make(cap=1, max_seqs=8)
    for i in range(4):
        s.add(req(f"r{i}", 2))
    assert run_step(s) == {"r0": 2, "r1": 2, "r2": 2, "r3": 2}
    assert run_step(s) == {"r0": 1, "r1": 1, "r2": 1, "r3": 1}


def test_capped_steps_give_the_same_tokens(tiny_llama_dir):
    """Deterministic mode: prompts split into capped chunks beside decodes give the tokens they give alone."""
    from jisu import LLM

    llm = LLM(model=str(tiny_llama_dir), max_num_seqs=4, max_model_len=256)
    prompts = [[(7 * i + 3 * k) % 200 + 5 for k in range(9 + 4 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    engine = llm.engine
    engine.scheduler.config.max_prefill_tokens_with_decodes = 3
    first = engine.step_log.count
    ids = [engine.add_request(prompts[0], params)]
    engine.step()  # the first prompt alone; then it decodes while the others are prefilled 3 tokens a step
    ids += [engine.add_request(p, params) for p in prompts[1:]]
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert [got[i] for i in ids] == alone
    steps = engine.step_log.since(first)
    assert any(r.num_prefill_tokens and r.num_decodes for r in steps)
    assert max(r.num_prefill_tokens for r in steps if r.num_decodes) <= 3
