"""TPOT at 1 and 16 concurrent streams side by side (issue 25: prefill chunks joining decode steps).

A closed loop in one process, as `jisu bench serve` drives a server: `concurrency` requests are in flight, and
each one that finishes is replaced by the next prompt, so new prompts' prefill keeps joining the others' decode
steps. Per request TPOT is vllm bench serve's (e2e - TTFT) / (output tokens - 1); p50/p90 are over the requests
of one run, then the median of those over --runs runs (levels alternate within each run). The engine's step
timeline splits the steps into pure decode steps and mixed steps (prefill tokens and decodes together).

    python benchmarks/bench_concurrency.py [--model PATH] [--concurrency 1,16] [--input-len 256]
        [--output-len 64] [--num-prompts 2x level] [--runs 3] [--prefill-caps none,64,16] [--no-deterministic]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def closed_loop(engine, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    from jisu.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    pending = list(prompts)
    in_flight = 0
    tpots, ttfts = [], []
    first_step = engine.step_log.count
    start = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            engine.add_request(pending.pop(0), params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                m = out.outputs[0].metrics
                tpots.append(m.tpot)
                ttfts.append(m.time_to_first_token)
    wall = time.perf_counter() - start
    steps = engine.step_log.since(first_step)
    mixed = [s for s in steps if s.num_prefill_tokens and s.num_decodes]
    decode = [s for s in steps if not s.num_prefill_tokens]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {
        "tpot_p50": percentile(tpots, 50), "tpot_p90": percentile(tpots, 90),
        "ttft_p50": percentile(ttfts, 50), "out_tok_s": len(prompts) * output_len / wall,
        "steps": len(steps), "mixed_steps": len(mixed),
        "mixed_ms": med([s.forward for s in mixed]) * 1e3, "mixed_prefill": med([s.num_prefill_tokens for s in mixed]),
        "mixed_decodes": med([s.num_decodes for s in mixed]),
        "decode_ms": med([s.forward for s in decode]) * 1e3, "decode_rows": med([s.num_decodes for s in decode]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None, help="per level (default 2x the level, at least 4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the scheduler's step budget")
    ap.add_argument("--prefill-caps", default=None,
                    help="comma-separated max_prefill_tokens_with_decodes values run in turn at levels above 1, "
                         "'none' for no cap (default: the scheduler's own setting only)")
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    args = ap.parse_args()

    from jisu import LLM
    from jisu.bench.prompts import synthetic_prompt

    levels = [int(c) for c in args.concurrency.split(",")]
    kw = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    llm = LLM(model=args.model, max_num_seqs=max(levels), deterministic=args.deterministic, **kw)
    engine, tok = llm.engine, llm.tokenizer
    print(f"scheduler: {engine.scheduler.config}", flush=True)
    seed = iter(range(10**6))

    def run(c: int, n: int | None = None) -> dict:
        n = n or args.num_prompts or max(4, 2 * c)
        # Distinct prompts: no prefix-cache hits between requests.
        prompts = [synthetic_prompt(tok, args.input_len, seed=next(seed)).token_ids for _ in range(n)]
        return closed_loop(engine, prompts, c, args.output_len)

    sched = engine.scheduler.config
    caps = [sched.max_prefill_tokens_with_decodes] if args.prefill_caps is None else [
        None if c == "none" else int(c) for c in args.prefill_caps.split(",")]
    # (level, cap) in run order: a level of 1 never has a decode beside a prompt, so it runs once per round.
    configs = [(c, cap) for c in levels for cap in (caps if c > 1 else caps[:1])]
    run(max(levels), max(levels))  # warm-up
    results: dict[tuple, list[dict]] = {k: [] for k in configs}
    for r in range(args.runs):
        for c, cap in configs:
            sched.max_prefill_tokens_with_decodes = cap
            res = run(c)
            results[(c, cap)].append(res)
            print(f"run {r + 1} c={c:3d} cap={cap}: TPOT p50 {res['tpot_p50'] * 1e3:6.1f} p90 "
                  f"{res['tpot_p90'] * 1e3:6.1f} ms, TTFT p50 {res['ttft_p50'] * 1e3:7.1f} ms, {res['out_tok_s']:6.1f} "
                  f"out tok/s; {res['mixed_steps']}/{res['steps']} mixed steps, median {res['mixed_ms']:.1f} ms "
                  f"({res['mixed_prefill']:.0f} prefill + {res['mixed_decodes']:.0f} decode rows); decode steps "
                  f"{res['decode_ms']:.1f} ms ({res['decode_rows']:.0f} rows)", flush=True)
    print(f"\nmedians of {args.runs} runs ({args.input_len}-token prompts, {args.output_len} output tokens; "
          f"cap = max_prefill_tokens_with_decodes):")
    print("concurrency | cap  | TPOT p50 ms | TPOT p90 ms | TTFT p50 ms | output tok/s | TPOT p50 / first row's")
    base = None
    for c, cap in configs:
        med = {k: statistics.median(x[k] for x in results[(c, cap)])
               for k in ("tpot_p50", "tpot_p90", "ttft_p50", "out_tok_s")}
        base = base or med["tpot_p50"]
        print(f"{c:11d} | {str(cap if c > 1 else '-'):4s} | {med['tpot_p50'] * 1e3:11.1f} | {med['tpot_p90'] * 1e3:11.1f} | "
              f"{med['ttft_p50'] * 1e3:11.1f} | {med['out_tok_s']:12.1f} | {med['tpot_p50'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
