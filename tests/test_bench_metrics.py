"""The serving metrics against hand-worked examples (vllm bench serve's definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jisu.bench.metrics import (
    RequestResult,
    chunk_timing,
    meets_slos,
    parse_goodput,
    parse_percentiles,
    percentile,
    serve_metrics,
    summarize,
    tpot,
)
from jisu.errors import InvalidRequestError


def ok(ttft, latency, out, prompt=10, itl=()):
    return RequestResult(success=True, prompt_tokens=prompt, output_tokens=out, ttft=ttft, latency=latency,
                         itl=list(itl))


def test_multi_token_chunks_give_one_itl_each():
    # Sent at t=10.0; chunks arrive at 10.2 (1 token), 10.5 (3 tokens bundled), 10.6 (2 tokens): 6 tokens.
    ttft, itl, e2el = chunk_timing(10.0, [10.2, 10.5, 10.6])
    assert ttft == pytest.approx(0.2) and e2el == pytest.approx(0.6)
    assert itl == pytest.approx([0.3, 0.1])  # per chunk, not split per token
    r = ok(ttft, e2el, out=6, itl=itl)
    assert tpot(r) == pytest.approx((0.6 - 0.2) / 5)  # TPOT uses the token count: 0.08 s
    m = serve_metrics([r], duration_s=1.0)
    assert m["mean_itl_ms"] == pytest.approx(200.0) and m["median_itl_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(80.0)


def test_no_chunk_is_an_error_not_a_zero():
    with pytest.raises(InvalidRequestError):
        chunk_timing(1.0, [])


def test_one_token_outputs_are_left_out_of_tpot():
    a = ok(0.1, 0.5, out=5)  # TPOT (0.5 - 0.1) / 4 = 0.1
    b = ok(0.2, 0.2, out=1)  # TPOT undefined
    assert tpot(b) is None
    m = serve_metrics([a, b], duration_s=2.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0) and m["median_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)  # but both count for TTFT and E2E
    assert m["mean_e2el_ms"] == pytest.approx(350.0)


def test_all_one_token_outputs_leave_tpot_undefined():
    m = serve_metrics([ok(0.1, 0.1, out=1)], duration_s=1.0)
    assert m["mean_tpot_ms"] is None and m["p99_tpot_ms"] is None and m["mean_itl_ms"] is None


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 0.99 * 3 = 2.97 -> 3 + 0.97 * (4 - 3)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(size=101))
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    s = summarize([0.1, 0.2, 0.3, 0.4], percentiles=(50, 90))
    assert s["mean"] == pytest.approx(250.0) and s["p90"] == pytest.approx(370.0)
    assert s["std"] == pytest.approx(float(np.std([100, 200, 300, 400])))


def test_throughputs_and_failures():
    results = [ok(0.1, 1.0, out=10, prompt=20), ok(0.3, 1.5, out=4, prompt=30),
               RequestResult(success=False, error="HTTP 503")]
    m = serve_metrics(results, duration_s=2.0)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 50 and m["total_output_tokens"] == 14
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(7.0)
    assert m["total_token_throughput"] == pytest.approx(32.0)
    assert m["request_goodput"] is None  # no SLOs given


def test_goodput_needs_every_slo():
    fast = ok(0.1, 0.5, out=5)  # TTFT 100 ms, TPOT 100 ms, E2E 500 ms
    slow_start = ok(0.4, 0.8, out=5)  # TTFT 400 ms, TPOT 100 ms
    single = ok(0.1, 0.1, out=1)  # TPOT counts as 0 for goodput
    slos = parse_goodput(["ttft:200 tpot:100"])
    assert slos == {"ttft": 200.0, "tpot": 100.0}
    assert meets_slos(fast, slos) and not meets_slos(slow_start, slos) and meets_slos(single, slos)
    m = serve_metrics([fast, slow_start, single], duration_s=4.0, goodput=slos)
    assert m["request_goodput"] == pytest.approx(2 / 4.0)
    m = serve_metrics([fast, slow_start, single], duration_s=4.0, goodput={"e2el": 450.0})
    assert m["request_goodput"] == pytest.approx(1 / 4.0)  # only `single` ends within 450 ms


def test_configurable_percentile_keys():
    m = serve_metrics([ok(0.1, 0.5, out=5), ok(0.2, 0.6, out=5)], duration_s=1.0, percentiles=(50, 99.9))
    assert "p50_ttft_ms" in m and "p99.9_e2el_ms" in m and "p99_ttft_ms" not in m
    assert m["p50_ttft_ms"] == pytest.approx(150.0)


@pytest.mark.parametrize("spec, fragment", [
    (["ttft=5"], "NAME:MS"), (["latency:5"], "unknown metric"), (["ttft:abc"], "not a number"),
    (["tpot:0"], "> 0"),
])
def test_bad_goodput_names_the_flag(spec, fragment):
    with pytest.raises(InvalidRequestError, match="--goodput") as e:
        parse_goodput(spec)
    assert fragment in str(e.value)


@pytest.mark.parametrize("text", ["99,x", "0", "100", ""])
def test_bad_percentiles_name_the_flag(text):
    with pytest.raises(InvalidRequestError, match="--percentiles"):
        parse_percentiles(text)


def test_bad_duration():
    with pytest.raises(InvalidRequestError):
        serve_metrics([], duration_s=0.0)
    assert math.isclose(parse_percentiles("50, 99.9")[1], 99.9)
