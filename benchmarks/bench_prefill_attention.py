"""Prefill attention of one layer on SmolLM2-135M's shapes (9 q heads, 3 KV heads, head dim 64, float16 cache):
torch's SDPA in 64-query blocks (jisu/runner/attention.py without the C++ kernels) against the C++ kernel
(jisu/kernels/prefill_attention.cpp), both through paged_attention (which also writes the chunk's K/V).

A prompt of each length is prefilled as the engine schedules it: chunks of at most --chunk tokens (the default
max_num_batched_tokens, 1024), the later ones reading the earlier ones' K/V from the cache. Reported: ms per layer
for the whole prompt, medians of --reps runs, the two paths alternating so a busy neighbour slows both alike.

    .venv/bin/python benchmarks/bench_prefill_attention.py [--lengths 512,4096] [--threads 2] [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from jisu.kernels.build import cpu_linear_kernels
from jisu.runner.attention import AttentionMetadata, PrefillChunk, paged_attention, query_blocks

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SCALE = HEAD_DIM**-0.5


def prompt_steps(length: int, chunk: int, kernels) -> list[tuple[int, int, AttentionMetadata]]:
    """(first position, tokens, metadata) of each chunk, as the runner builds them (slots 0.. in order)."""
    steps = []
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        gather = torch.arange(start + n) if start else None
        blocks = None if kernels is not None else query_blocks(n, start, None, torch.device("cpu"))
        prefill = PrefillChunk(0, n, start + n, gather=gather, mask=None, query_blocks=blocks)
        meta = AttentionMetadata(slot_mapping=torch.arange(start, start + n), num_decodes=0, prefills=[prefill],
                                 kernels=kernels)
        steps.append((start, n, meta))
    return steps


def prefill_layer(length: int, chunk: int, kernels):
    """A callable that attends one layer of a `length`-token prompt, chunk by chunk."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(length, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(length, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(length, KV_HEADS, HEAD_DIM, generator=g)
    k_cache = torch.zeros(length, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    steps = prompt_steps(length, chunk, kernels)

    def run():
        for start, n, meta in steps:
            rows = slice(start, start + n)
            paged_attention(q[rows], k[rows], v[rows], k_cache, v_cache, meta, SCALE)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="512,4096")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    kernels = cpu_linear_kernels()
    if kernels is None:
        raise SystemExit("jisu's C++ kernels are unavailable: nothing to compare")
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, chunks of {args.chunk}, medians of {args.reps} (ms per layer)")
    for length in (int(x) for x in args.lengths.split(",")):
        paths = {"torch SDPA blocks": prefill_layer(length, args.chunk, None),
                 "C++ kernel": prefill_layer(length, args.chunk, kernels)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for run in paths.values():
            run()  # warm-up
        for _ in range(args.reps):
            for name, run in paths.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        old, new = (statistics.median(times[name]) * 1e3 for name in paths)
        print(f"{length:6d} tokens: torch SDPA blocks {old:8.2f}   C++ kernel {new:8.2f}   speed-up {old / new:.2f}x")


if __name__ == "__main__":
    main()
