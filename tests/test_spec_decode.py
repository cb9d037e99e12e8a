"""Speculative decoding (issue 25 part 5): prompt-lookup and draft-model proposals verified in the step's forward.

Greedy output must equal plain decoding token for token (batched, chunked, preempted, with prefix-cache hits);
sampled output keeps the target distribution (rejection sampling, checked exactly on a small vocabulary);
counters and KV blocks stay consistent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arch_harness import prompt_ids
from jisu import LLM, SamplingParams
from jisu.errors import InvalidRequestError
from jisu.sampling import Sampler, SamplingRow
from jisu.spec_decode.config import SpeculativeConfig
from jisu.spec_decode.ngram import ngram_propose
from jisu.spec_decode.rejection import verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
STEPS = 16


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A second tiny model with the same tokenizer and other weights: it proposes, often wrongly."""
    from tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-draft"), arch="llama", num_kv_heads=2, seed=1)


def _prompts():
    shared = prompt_ids(30, seed=7)
    return [shared + [3 + i, 9 + i] for i in range(3)] + [prompt_ids(9, seed=11), prompt_ids(14, seed=5)]


def _greedy(llm, prompts, steps=STEPS):
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def _assert_no_leak(llm):
    engine = llm.engine
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "target KV blocks leaked"
    spec = engine.speculator
    if spec is not None and spec.draft is not None:
        blocks = spec.draft.run.blocks
        assert not spec.draft.shadows and blocks.num_free_blocks == blocks.num_blocks, "draft KV blocks leaked"


@pytest.fixture(scope="module")
def expected(tiny_llama_dir):
    return _greedy(LLM(model=str(tiny_llama_dir), block_size=4, enable_prefix_caching=False), _prompts())


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
        ({"num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
         "speculative_config.prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "speculative_config.prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "speculative_config.model"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "'lookahead'"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a dict"),
    ],
)
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(InvalidRequestError, match=field.replace(".", r"\.")):
        SpeculativeConfig.parse(bad)


def test_config_defaults_and_json():
    cfg = SpeculativeConfig.parse(json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}))
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (3, 3)
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 5)  # vLLM's default
    assert SpeculativeConfig.parse({"model": "m", "num_speculative_tokens": 2}).method == "draft_model"


def test_draft_model_with_another_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    from tiny_models import make_tiny_hf_model

    other = make_tiny_hf_model(tmp_path / "qwen", arch="qwen2", num_kv_heads=2)
    with pytest.raises(InvalidRequestError, match=r"speculative_config\.model .*(vocabulary|tokenizer)"):
        LLM(model=str(tiny_llama_dir), speculative_config={"model": str(other), "num_speculative_tokens": 2})


# ----------------------------------------------------------------------------- proposer and scheduler


def test_ngram_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert ngram_propose(tokens, 1, 2, 3) == [7, 8, 6]  # "2 3" last seen before 7 8 6
    assert ngram_propose(tokens, 1, 3, 2) == [7, 8]
    assert ngram_propose([5, 6, 7, 8], 1, 3, 3) == []  # nothing repeats
    assert ngram_propose([4, 1, 2, 4], 1, 1, 5) == [1, 2, 4]  # runs to the end of the sequence
    assert ngram_propose([1, 2, 1, 2, 1, 2], 2, 2, 4) == [1, 2]  # the latest earlier occurrence


def test_scheduler_verifies_drafts_and_rolls_back_rejected_ones():
    from jisu.request import Request
    from jisu.scheduler.blocks import BlockManager
    from jisu.scheduler.scheduler import Scheduler
    from jisu.config import SchedulerConfig

    blocks = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), blocks)
    req = Request("r", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=20))
    sched.add(req)
    out = sched.schedule()
    sched.update(out)
    req.append_token(7, None, 0.0)
    assert req.num_computed_tokens == 6
    req.spec_token_ids = [8, 9, 10]
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_new_tokens, s.num_spec, s.samples) == (4, 3, True)
    sched.update(out)
    assert req.num_computed_tokens == 7  # drafts are not computed until accepted
    # The target accepts 8, rejects 9 and draws 11 instead: 8's slot counts, 9's and 10's are overwritten later.
    req.append_token(8, None, 0.0)
    req.append_token(11, None, 0.0)
    req.spec_token_ids = []
    sched.accept(req, 1)
    assert req.num_computed_tokens == 8 and req.num_tokens == 9
    # Only blocks full of real, computed tokens are in the prefix cache: [1..4], [5, 6, 7, 8].
    assert len(blocks._seq_hashes["r"]) == 2
    h0 = blocks._hash(b"", [1, 2, 3, 4])
    assert blocks._seq_hashes["r"] == [h0, blocks._hash(h0, [5, 6, 7, 8])]
    # A step budget shorter than the drafts cuts them.
    sched.config.max_num_batched_tokens = 3
    req.spec_token_ids = [12, 13, 14, 15]
    (s,) = sched.schedule().scheduled
    assert (s.num_new_tokens, s.num_spec, req.spec_token_ids) == (3, 2, [12, 13])


# ----------------------------------------------------------------------------- greedy identity


@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_self"])
def test_greedy_identical_batched_chunked_preempted_cached(method, tiny_llama_dir, draft_dir, expected):
    cfg = dict(NGRAM) if method == "ngram" else {
        "method": "draft_model", "num_speculative_tokens": 3,
        "model": str(tiny_llama_dir if method == "draft_self" else draft_dir),
    }
    prompts = _prompts()
    model = str(tiny_llama_dir)
    batched = LLM(model=model, block_size=4, enable_prefix_caching=False, speculative_config=cfg)
    assert _greedy(batched, prompts) == expected, "batched speculation changed greedy output"
    stats = batched.engine.speculator.stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens > 0
    if method == "draft_self":  # the draft is the target: every draft is the target's own choice
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_no_leak(batched)
    chunked = LLM(model=model, block_size=4, enable_prefix_caching=False, max_num_batched_tokens=7,
                  speculative_config=cfg)
    assert _greedy(chunked, prompts) == expected, "chunked prefill with speculation changed output"
    _assert_no_leak(chunked)
    warm = LLM(model=model, block_size=4, speculative_config=cfg)
    assert [_greedy(warm, [p])[0] for p in prompts] == expected, "prefix-cache hits with speculation changed output"
    assert warm.engine.blocks.prefix_cache_hits > 0
    # Every cached block names its own tokens: a later request whose prompt is a finished one's whole text
    # reuses the cached blocks and still continues exactly as plain decoding does.
    again = [p + e[:8] for p, e in zip(prompts, expected)]
    cold = LLM(model=model, block_size=4, enable_prefix_caching=False)
    assert _greedy(warm, again, 6) == _greedy(cold, again, 6)
    _assert_no_leak(warm)
    need = -(-(32 + STEPS + 3) // 4)
    small = LLM(model=model, block_size=4, num_kv_blocks=need + 2, enable_prefix_caching=False,
                speculative_config=cfg)
    assert _greedy(small, prompts) == expected, "preemption with speculation changed output"
    assert small.engine.scheduler.total_preemptions > 0
    _assert_no_leak(small)


def test_mixed_batch_stops_logprobs_and_counters(tiny_llama_dir, expected):
    """Speculating sequences beside prompt-only, grammar-less sampled ones; max_tokens and stop ids cut a verify's
    tokens; logprobs of accepted tokens are plain decoding's; counters add up."""
    prompts = _prompts()
    plain = LLM(model=str(tiny_llama_dir), block_size=4)
    spec = LLM(model=str(tiny_llama_dir), block_size=4, speculative_config=NGRAM)
    stop_at = expected[1][9]
    params = [
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, stop_token_ids=[stop_at]),
        SamplingParams(max_tokens=0, prompt_logprobs=1),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, n=2),
    ]
    a = plain.generate(prompts, params)
    b = spec.generate(prompts, params)
    for i in (0, 1, 4):
        assert [o.token_ids for o in a[i].outputs] == [o.token_ids for o in b[i].outputs]
    assert len(b[0].token_ids) == 7 and b[1].finish_reason == "stop" and len(b[1].token_ids) <= 10
    for x, y in zip(a[0].outputs[0].logprobs, b[0].outputs[0].logprobs):
        assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert len(b[3].token_ids) == 10
    stats = spec.engine.speculator.stats
    metrics = [o.metrics for r in b for o in r.outputs if o.metrics is not None]
    assert sum(m.spec_num_drafts for m in metrics) == stats.num_drafts > 0
    assert sum(m.spec_num_draft_tokens for m in metrics) == stats.num_draft_tokens
    assert sum(m.spec_num_accepted_tokens for m in metrics) == stats.num_accepted_tokens > 0
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert all(x >= y for x, y in zip(stats.accepted_per_pos, stats.accepted_per_pos[1:]))
    steps = spec.engine.step_log.records
    assert sum(r.num_draft_tokens for r in steps) == stats.num_draft_tokens
    assert sum(r.num_accepted_tokens for r in steps) == stats.num_accepted_tokens
    assert any(r.draft > 0 for r in steps)
    kinds = {k for r in b for o in r.outputs for k, *_ in o.timeline.events}
    assert {"draft", "verify"} <= kinds
    _assert_no_leak(spec)


def test_seeded_sampling_is_reproducible(tiny_llama_dir, draft_dir):
    for cfg in (NGRAM, {"model": str(draft_dir), "num_speculative_tokens": 3}):
        llm = LLM(model=str(tiny_llama_dir), block_size=4, speculative_config=cfg)
        p = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=STEPS, ignore_eos=True)
        alone = llm.generate(prompt_ids(12, seed=2), p)[0].token_ids
        others = [SamplingParams(temperature=1.0, max_tokens=STEPS, ignore_eos=True)] * 3
        batched = llm.generate([prompt_ids(12, seed=2)] + _prompts()[:3], [p] + others)[0].token_ids
        assert alone == batched
        _assert_no_leak(llm)


def test_sampled_draft_self_accepts_everything(tiny_llama_dir):
    """With the target as its own draft, q equals p row for row (deterministic rows), so a sampled draft token is
    always accepted: this checks that draft distributions line up with the rows that verify them."""
    llm = LLM(model=str(tiny_llama_dir), block_size=4,
              speculative_config={"model": str(tiny_llama_dir), "num_speculative_tokens": 3})
    p = SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.2, seed=5, max_tokens=STEPS, ignore_eos=True)
    llm.generate(_prompts(), p)
    stats = llm.engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens


# ----------------------------------------------------------------------------- rejection sampling


def _emitted_distribution(logits, draft, q, params, trials, seed=0):
    """Counts of the first emitted token, and of the second after the first draft was accepted. With q, each
    trial's drafts are drawn from q (the guarantee holds for drafts distributed as q); else the fixed `draft`."""
    sampler = Sampler(generator=torch.Generator().manual_seed(seed))
    rows = [SamplingRow(params, [0], [], None) for _ in range(len(draft) + 1)]
    draws = torch.Generator().manual_seed(seed + 1)
    first = np.zeros(logits.shape[1])
    second = np.zeros(logits.shape[1])
    for _ in range(trials):
        d = draft if q is None else torch.multinomial(q, 1, generator=draws).squeeze(1).tolist()
        (v,) = verify(sampler, logits, rows, [d], [None if q is None else q.double().numpy()])
        first[v.tokens[0]] += 1
        if v.tokens[0] == d[0] and len(v.tokens) > 1:
            second[v.tokens[1]] += 1
    return first, second


def chisquare_pvalue(observed, expected) -> float:
    """Pearson's chi-square test of counts against expected counts: the chance of a statistic this large, as the
    upper regularized incomplete gamma function (the chi-square survival function; scipy is not a dependency)."""
    observed, expected = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_chisquare_pvalue_matches_tables():
    # Two cells of expected count a, observed a +- d: the statistic is 2 d^2 / a, and 3.841 is the chi-square
    # table's value at p = 0.05 for one degree of freedom.
    a = 100.0
    d = (3.841 * a / 2) ** 0.5
    assert chisquare_pvalue([a + d, a - d], [a, a]) == pytest.approx(0.05, abs=1e-4)
    assert chisquare_pvalue([100, 100, 100], [100, 100, 100]) == pytest.approx(1.0)


@pytest.mark.parametrize("proposal", ["one_hot", "draft_probs"])
def test_rejection_sampling_keeps_the_target_distribution(proposal):
    """The first emitted token follows p_0 and, after the first draft is accepted, the next follows p_1, whatever
    the proposal (chi-square over a 6-token vocabulary)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    target = torch.softmax(Sampler().processed_logits(logits, [SamplingRow(params, [0], [], None)] * 3), dim=1)
    draft = [int(torch.topk(target[0], 2).indices[1]), 2]  # a likely, but not the likeliest, first token
    q = None
    if proposal == "draft_probs":
        q = torch.softmax(torch.randn(2, 6), dim=1)
    trials = 4000
    first, second = _emitted_distribution(logits, draft, q, params, trials)
    p0 = target[0].double().numpy()
    keep = p0 > 0
    assert first[~keep].sum() == 0, "a token outside top-k was emitted"
    assert chisquare_pvalue(first[keep], p0[keep] / p0[keep].sum() * first.sum()) > 1e-3
    p1 = target[1].double().numpy()
    keep = p1 > 0
    assert second[~keep].sum() == 0
    assert chisquare_pvalue(second[keep], p1[keep] / p1[keep].sum() * second.sum()) > 1e-3


def test_rejection_greedy_takes_the_argmax_prefix():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    rows = [SamplingRow(SamplingParams(temperature=0), [0], [], None)] * 3
    (v,) = verify(Sampler(), logits, rows, [[1, 0]], [None])
    assert (v.tokens, v.num_accepted) == ([1, 0, 2], 2)
    (v,) = verify(Sampler(), logits, rows[:2], [[2]], [None])
    assert (v.tokens, v.num_accepted) == ([1], 0)


# ----------------------------------------------------------------------------- real model and metrics


QUOTE = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, the members "
         "agreed to fund the children's reading room and to extend the opening hours on weekends.")


def test_real_model_quoting_is_identical_and_accepts(real_model_path, real_llm):
    msgs = [{"role": "user", "content": "Repeat this text exactly, word for word:\n\n" + QUOTE}]
    params = SamplingParams(temperature=0, max_tokens=32)
    expected = real_llm.chat(msgs, params)[0]
    spec = LLM(model=str(real_model_path), max_model_len=2048, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    got = spec.chat(msgs, params)[0]
    assert got.token_ids == expected.token_ids
    m = got.metrics
    assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens / m.spec_num_draft_tokens > 0.5
    # The Prometheus twins of vLLM's spec_decode_* counters.
    from jisu.server.metrics import ServerMetrics

    sm = ServerMetrics("smol")
    sm.engine_state(spec.engine, 0)
    text = sm.render().decode()
    stats = spec.engine.speculator.stats
    assert f'jisu:spec_decode_num_drafts_total{{model_name="smol"}} {float(stats.num_drafts)}' in text
    assert f'jisu:spec_decode_num_draft_tokens_total{{model_name="smol"}} {float(stats.num_draft_tokens)}' in text
    assert f'jisu:spec_decode_num_accepted_tokens_total{{model_name="smol"}} {float(stats.num_accepted_tokens)}' in text
    assert (f'jisu:spec_decode_num_accepted_tokens_per_pos_total{{model_name="smol",position="0"}} '
            f'{float(stats.accepted_per_pos[0])}') in text
    sm.engine_state(spec.engine, 0)  # idempotent: counters take only the increase
    assert f'jisu:spec_decode_num_drafts_total{{model_name="smol"}} {float(stats.num_drafts)}' in sm.render().decode()


def test_cli_speculative_config(tiny_llama_dir):
    """`jisu generate --speculative-config JSON`: the same greedy text, the acceptance line under --stats, and a bad
    config is a clean error naming its field."""
    import subprocess
    import sys

    def jisu(*args):
        return subprocess.run([sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, timeout=180,
                              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})

    base = ["generate", "hello world", "--model", str(tiny_llama_dir), "--temperature", "0", "--max-tokens", "12",
            "--ignore-eos"]
    plain = jisu(*base)
    spec = jisu(*base, "--stats", "--speculative-config", json.dumps(NGRAM))
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "[speculative:" in spec.stderr
    bad = jisu(*base, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 99}')
    assert bad.returncode != 0 and "speculative_config.num_speculative_tokens" in bad.stderr
    assert "Traceback" not in bad.stderr
