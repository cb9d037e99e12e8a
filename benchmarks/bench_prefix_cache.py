"""Prefix caching: TTFT of a request whose 1,000-token prefix another request already computed.

For each run: a fresh engine serves request A (shared prefix + question A), then request B (same prefix +
question B). B's TTFT is compared with A's, and B's greedy output with B served cold by an engine with
prefix caching off. Medians over --runs.

    python benchmarks/bench_prefix_cache.py [--model PATH] [--prefix-tokens 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jisu import LLM, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    cold = LLM(model=args.model, enable_prefix_caching=False, max_model_len=4096)
    tok = cold.tokenizer
    words = " ".join(f"Clause {i}: the parties agree to term number {i * 37 % 101}." for i in range(400))
    prefix = tok.encode(words)[: args.prefix_tokens]
    a = prefix + tok.encode(" Question: what does clause 3 say?", add_special_tokens=False)
    b = prefix + tok.encode(" Question: summarise clause 7.", add_special_tokens=False)
    expected = cold.generate([b], sp)[0].token_ids

    ttft_a, ttft_b, same = [], [], []
    for run in range(args.runs):
        warm = LLM(model=args.model, max_model_len=4096)
        out_a = warm.generate([a], sp)[0]
        out_b = warm.generate([b], sp)[0]
        ttft_a.append(out_a.metrics.time_to_first_token)
        ttft_b.append(out_b.metrics.time_to_first_token)
        same.append(out_b.token_ids == expected)
        print(f"run {run + 1}: TTFT first {ttft_a[-1] * 1e3:7.1f} ms, second {ttft_b[-1] * 1e3:6.1f} ms "
              f"({out_b.metrics.cached_prompt_tokens} of {len(b)} prompt tokens cached), "
              f"greedy output equals cold run: {same[-1]}", flush=True)
    ma, mb = statistics.median(ttft_a), statistics.median(ttft_b)
    print(f"\nmedian of {args.runs}: first {ma * 1e3:.1f} ms, second {mb * 1e3:.1f} ms -> {ma / mb:.1f}x lower TTFT")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
