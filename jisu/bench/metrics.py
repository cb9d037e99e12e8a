"""Serving-benchmark figures with the definitions `vllm bench serve` uses, as pure functions.

Per request (client side, from the streamed response):
  TTFT   request sent -> first chunk that carries a choice (its text may be empty)
  E2EL   request sent -> last chunk that carries a choice (the trailing usage chunk does not count)
  ITL    the gap between consecutive choice chunks; a chunk holding several tokens is still one gap
  TPOT   (E2EL - TTFT) / (output_tokens - 1): time per output token after the first; undefined for a
         one-token output, which is then left out of the TPOT figures (and counts as 0 for goodput)
Per run: request, output-token and total-token throughput over the run's wall time, and goodput: requests
per second that met every SLO given (`ttft:MS tpot:MS e2el:MS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from jisu.errors import InvalidRequestError

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (99.0,)


@dataclass
class RequestResult:
    """What one benchmark request measured; times in seconds."""

    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    """E2EL: request sent -> last choice chunk."""
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    """time.perf_counter() when the request was sent."""
    error: str = ""
    generated_text: str = ""


def chunk_timing(start: float, chunk_times: Sequence[float]) -> tuple[float, list[float], float]:
    """(TTFT, ITLs, E2EL) from the send time and the arrival time of each choice chunk, in order.

    Each chunk after the first adds one ITL, however many tokens it carries: that is the latency a
    reader of the stream sees, and what vLLM records.
    """
    if not chunk_times:
        raise InvalidRequestError("a request with no streamed chunk has no TTFT; mark it failed instead")
    ttft = chunk_times[0] - start
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return ttft, itl, chunk_times[-1] - start


def tpot(result: RequestResult) -> float | None:
    """Time per output token excluding the first; None when there are fewer than 2 output tokens."""
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise InvalidRequestError("percentile of no values")
    if not 0 <= q <= 100:
        raise InvalidRequestError(f"percentile must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES, scale: float = 1000.0) -> dict:
    """mean, median, std (population, as numpy) and each percentile, times `scale` (seconds -> ms);
    every figure is None for an empty list rather than a made-up 0."""
    pcts = list(percentiles)
    if not values:
        return {"mean": None, "median": None, "std": None, **{f"p{_pct_name(q)}": None for q in pcts}}
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    out = {"mean": mean * scale, "median": percentile(values, 50) * scale, "std": std * scale}
    for q in pcts:
        out[f"p{_pct_name(q)}"] = percentile(values, q) * scale
    return out


def _pct_name(q: float) -> str:
    """99 -> '99', 99.9 -> '99.9' (vLLM's key style: p99_ttft_ms, p99.9_ttft_ms)."""
    return f"{q:g}"


def parse_percentiles(text: str, flag: str = "--percentiles") -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            q = float(part)
        except ValueError:
            raise InvalidRequestError(f"{flag}: {part!r} is not a number; give e.g. 50,90,99") from None
        if not 0 < q < 100:
            raise InvalidRequestError(f"{flag}: {q:g} is outside (0, 100)")
        out.append(q)
    if not out:
        raise InvalidRequestError(f"{flag}: give at least one percentile, e.g. 99")
    return tuple(out)


def parse_goodput(specs: Sequence[str] | None, flag: str = "--goodput") -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        for item in spec.split():
            name, sep, value = item.partition(":")
            if not sep:
                raise InvalidRequestError(f"{flag}: {item!r} must look like NAME:MS, e.g. ttft:500")
            if name not in GOODPUT_METRICS:
                raise InvalidRequestError(f"{flag}: unknown metric {name!r}; use {', '.join(GOODPUT_METRICS)}")
            try:
                ms = float(value)
            except ValueError:
                raise InvalidRequestError(f"{flag}: {item!r}: {value!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise InvalidRequestError(f"{flag}: {item!r}: the SLO must be > 0 ms")
            slos[name] = ms
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a successful request met every SLO; a one-token output's TPOT counts as 0 (as vLLM)."""
    seen = {"ttft": result.ttft, "tpot": tpot(result) or 0.0, "e2el": result.latency}
    return all(seen[name] <= ms / 1000.0 for name, ms in slos.items())


def serve_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
    goodput: dict[str, float] | None = None,
) -> dict:
    """The run summary, with vLLM's field names (times in ms, rates per second)."""
    if not duration_s > 0:
        raise InvalidRequestError(f"duration must be > 0 s, got {duration_s}")
    pcts = tuple(percentiles)
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if goodput:
        out["request_goodput"] = sum(1 for r in ok if meets_slos(r, goodput)) / duration_s
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        for stat, value in summarize(values, pcts).items():
            out[f"{stat}_{name}_ms"] = value
    return out
