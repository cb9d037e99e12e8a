"""int4 products on int16 activations (the default) against int8 ones (`--activations int8`), by rows of x.

One pass is one SmolLM2-135M layer's int4 group-32 matrices (q 576x576, k and v 192x576, o 576x576, gate and up
1536x576, down 576x1536; random weights) 30 times, called back to back from C++ (`_time_matvec`: what the fused
stack sees). The layer stays in cache, so this measures the arithmetic, not memory: at M = 1 a real decode also
waits on memory. M rows of x per call: 1 is decode, 4 a speculative verify step, 16-64 a prompt group. The two widths
alternate round by round; each round's figure is the fastest of --passes passes, and the medians of the rounds
are printed with their ratio. Quality: benchmarks/activation_quality.py.

    flock /tmp/jisu-bench.lock .venv/bin/python benchmarks/bench_activation_bits.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from jisu.kernels.build import cpu_linear_kernels

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30


def int4_matrix(ext, n: int, k: int, g: torch.Generator, group: int = 32):
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    data = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    zeros = ((torch.rand(n, k // group, generator=g) - 0.5) * 0.2).half()
    return ext.QWeight(4, data, scales, zeros, group, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--rows", default="1,4,16,64", help="rows of x per call (default 1,4,16,64)")
    args = ap.parse_args()
    ext = cpu_linear_kernels()
    if ext is None or ext.instruction_set == "portable":
        raise SystemExit("needs the vector C++ kernels (avx2 or avx512): the portable ones keep float activations")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layer = [int4_matrix(ext, n, k, g) for n, k in SHAPES]  # one layer's matrices, passed LAYERS times
    print(f"kernels {ext.instruction_set}, {args.threads} threads, ms per pass of {LAYERS} layers "
          f"(median of {args.rounds} rounds)")
    for m in (int(r) for r in args.rows.split(",")):
        times: dict[int, list[float]] = {16: [], 8: []}
        for _ in range(args.rounds):
            for bits in times:
                for w in layer:
                    w.act_bits = bits
                times[bits].append(min(ext._time_matvec(layer * LAYERS, m, args.passes)) * 1e3)
        t16, t8 = statistics.median(times[16]), statistics.median(times[8])
        print(f"M={m:3d}: int16 {t16:8.2f}   int8 {t8:8.2f}   int8 speed-up {t16 / t8:.2f}x", flush=True)


if __name__ == "__main__":
    main()
