"""What deterministic (batch-invariant) steps cost: prefill and decode speed with LLM(deterministic=True), the
default, against deterministic=False, in one process, alternating which goes first each round.

    python benchmarks/bench_determinism.py --input-lens 128,512,2048 --runs 5

Each round gives every prompt a new first token, so nothing comes from the prefix cache. Prints medians.
"""

from __future__ import annotations

import argparse
import statistics

from jisu import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--input-lens", default="128,512,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--output-len", type=int, default=64, help="tokens decoded after the first prompt length")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    lens = [int(x) for x in args.input_lens.split(",")]
    context = max(lens) + args.output_len
    engines = {mode: LLM(model=args.model, max_model_len=context, deterministic=mode == "deterministic")
               for mode in ("deterministic", "fast")}
    prefill: dict[tuple[str, int], list[float]] = {(m, n): [] for m in engines for n in lens}
    decode: dict[str, list[float]] = {m: [] for m in engines}
    for r in range(args.runs):
        order = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]
        for n in lens:
            prompt = [100 + 7 * r + n] + [(17 * j) % 30000 + 100 for j in range(1, n)]
            first = n == lens[0]
            params = SamplingParams(temperature=0, max_tokens=args.output_len if first else 1, ignore_eos=True)
            for mode, llm in order:
                m = llm.generate([prompt], params)[0].metrics
                prefill[(mode, n)].append(m.prefill_tokens_per_s)
                if first:
                    decode[mode].append(m.decode_tokens_per_s)
    print(f"medians of {args.runs} alternating runs, tokens/s")
    print(f"{'':>22} {'deterministic':>14} {'fast':>10} {'ratio':>7}")
    for n in lens:
        d, f = (statistics.median(prefill[(m, n)]) for m in engines)
        print(f"{f'prefill {n}':>22} {d:14.1f} {f:10.1f} {d / f:7.2f}")
    d, f = (statistics.median(decode[m]) for m in engines)
    print(f"{f'decode after {lens[0]}':>22} {d:14.1f} {f:10.1f} {d / f:7.2f}")


if __name__ == "__main__":
    main()
