"""What the always-on step timeline costs: batch-1 decode tokens/s with step recording on vs off.

Runs alternate (off, on, off, on, ...) on one engine; medians over --runs. Operator hooks are a separate,
opt-in cost that `jisu profile` measures and reports itself.

    python benchmarks/bench_timeline_overhead.py [--model PATH] [--runs 5] [--tokens 128]
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
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    llm = LLM(model=args.model)
    prompt = llm.tokenizer.encode("The history of the printing press begins")
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([prompt], sp)  # warm-up
    rates: dict[bool, list[float]] = {False: [], True: []}
    for run in range(args.runs):
        for on in (False, True):
            llm.engine.record_steps = on
            rate = llm.generate([prompt], sp)[0].metrics.decode_tokens_per_s
            rates[on].append(rate)
            print(f"run {run + 1} step timeline {'on ' if on else 'off'}: {rate:6.1f} decode tok/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\nmedian of {args.runs}: off {off:.1f}, on {on:.1f} tok/s -> on/off = {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
