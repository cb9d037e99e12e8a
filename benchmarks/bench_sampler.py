"""Time of one sampled draw (temperature 1, no truncation) over a [rows, vocab] logits batch: jisu's inverse-CDF
draw (jisu/sampling.py) side by side with the exponential race it replaced (a uniform number per token, two logs
and an argmax), on the same logits, in one run. Medians of --reps calls.

    .venv/bin/python benchmarks/bench_sampler.py [--vocab 49152] [--rows 1,16,128] [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from jisu.sampling import Sampler, SamplingRow
from jisu.sampling_params import SamplingParams


def exponential_race(x: torch.Tensor) -> torch.Tensor:
    u = torch.empty_like(x).uniform_()
    u.log_().neg_().log_()
    return torch.sub(x, u, out=u).argmax(dim=1)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    ap.add_argument("--rows", default="1,16,128")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    sampler = Sampler()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}, "
          f"median of {args.reps} calls")
    print(f"{'rows':>5} {'race ms':>9} {'jisu draw ms':>13} {'jisu Sampler ms':>16} {'race / draw':>12}")
    for n in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(n, args.vocab, generator=torch.Generator().manual_seed(n)) * 3
        rows = [SamplingRow(SamplingParams(temperature=1.0), [], [], None) for _ in range(n)]
        race = median_ms(lambda: exponential_race(logits), args.reps)
        draw = median_ms(lambda: sampler._draw(logits, [None] * n), args.reps)
        whole = median_ms(lambda: sampler(logits, rows), args.reps)
        print(f"{n:>5} {race:>9.3f} {draw:>13.3f} {whole:>16.3f} {race / draw:>11.1f}x")


if __name__ == "__main__":
    main()
