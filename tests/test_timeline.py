"""Request and step timelines on real runs of a tiny model, and the Perfetto trace built from them."""

from __future__ import annotations

import json

import pytest

from jisu import LLM, SamplingParams
from jisu.profile.timeline import PHASES
from jisu.profile.trace import build_trace

SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n):
    return [[(5 * i + 3 * j) % 240 + 4 for j in range(6 + 7 * i)] for i in range(n)]


@pytest.fixture(scope="module")
def run(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), max_num_batched_tokens=16, block_size=4)
    first = llm.engine.step_log.count
    outs = llm.generate(prompts(5), SP)
    return llm, outs, llm.engine.step_log.since(first)


def test_request_timeline_invariants(run):
    _, outs, _ = run
    for o in outs:
        m, t = o.metrics, o.outputs[0].timeline
        assert m.time_to_first_token <= m.e2e_time
        assert m.queue_time + m.prefill_time + m.decode_time == pytest.approx(m.e2e_time, abs=2e-3)
        assert len(t.token_times) == m.completion_tokens == 12
        assert t.token_times == sorted(t.token_times)
        assert len(m.inter_token_latencies) == 11
        assert m.tpot == pytest.approx((m.e2e_time - m.time_to_first_token) / 11)
        prefills = [e for e in t.events if e[0] == "prefill"]
        assert sum(e[3] for e in prefills) == m.prompt_tokens  # chunks add up to the prompt
        assert all(a <= b for _, a, b, _ in prefills)
        assert t.arrival <= t.first_scheduled <= prefills[0][1] <= t.first_token <= t.finished


def test_long_prompts_are_prefilled_in_chunks_within_the_budget(run):
    _, outs, _ = run
    longest = outs[-1].outputs[0].timeline
    chunks = [e[3] for e in longest.events if e[0] == "prefill"]
    assert len(chunks) > 1 and max(chunks) <= 16


def test_step_timeline_phases_add_up_and_count_tokens(run):
    llm, outs, steps = run
    assert steps
    for s in steps:
        assert s.total == pytest.approx(sum(getattr(s, p) for p in PHASES))
        assert s.num_tokens == s.num_prefill_tokens + s.num_decodes
        assert 0 < s.num_tokens <= 16
    assert sum(s.num_prefill_tokens for s in steps) == sum(o.metrics.prompt_tokens for o in outs)
    # Decode steps compute the previous token of each sequence: every output token but the last.
    assert sum(s.num_decodes for s in steps) == sum(o.metrics.completion_tokens - 1 for o in outs)
    # The steps cover the run: the gaps between them (the caller's loop) are under 5% of it.
    span = steps[-1].end - steps[0].start
    assert sum(s.total for s in steps) >= 0.95 * span


def test_preemption_appears_on_the_timeline(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=16)  # 64 slots; the longest needs 53
    outs = llm.generate(prompts(6), SP)
    events = [e[0] for o in outs for e in o.outputs[0].timeline.events]
    assert "preempted" in events
    assert sum(o.metrics.num_preemptions for o in outs) == llm.engine.scheduler.total_preemptions
    assert any(s.num_preempted for s in llm.engine.step_log.records)


def test_trace_is_valid_trace_event_json(run, tmp_path):
    _, outs, steps = run
    trace = json.loads(json.dumps(build_trace(steps, [(o.request_id, o.outputs[0].timeline) for o in outs])))
    events = trace["traceEvents"]
    allowed = {"X", "i", "C", "M"}
    for e in events:
        assert e["ph"] in allowed and isinstance(e["pid"], int) and isinstance(e["tid"], int) and e["name"]
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"engine", "steps", "requests"} <= names
    assert sum(1 for e in events if e["name"] == "token") == sum(o.metrics.completion_tokens for o in outs)
    assert sum(1 for e in events if e["name"].startswith("step ")) == len(steps)
    # Phases nest inside their step on the engine track.
    by_step = [e for e in events if e["ph"] == "X" and e["pid"] == 1]
    for i in range(0, len(by_step), 1 + len(PHASES)):
        step, phases = by_step[i], by_step[i + 1 : i + 1 + len(PHASES)]
        assert [p["name"] for p in phases] == list(PHASES)
        assert phases[0]["ts"] == step["ts"]
        assert phases[-1]["ts"] + phases[-1]["dur"] == pytest.approx(step["ts"] + step["dur"], abs=1.0)
