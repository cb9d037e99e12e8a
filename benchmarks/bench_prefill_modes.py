"""Prefill speed of the default model in jisu's two modes, optionally beside ik_llama.cpp's llama-bench.

deterministic (the default): every prompt row runs on the fused C++ stack in groups of up to 128 rows (quads of int4
weights, decode-style attention per row), so a token's numbers never depend on batching or chunking.
not deterministic (`LLM(deterministic=False)`, `--no-deterministic`): prompts run on the eager layers in chunks of up
to max_num_batched_tokens (a float32 GEMM over dequantized tiles past 192 rows, the C++ flash-style prefill
attention, the fused stack's own norm and gating).

Each measurement: `LLM.generate` of a prompt of N distinct token ids with max_tokens 1 (prefill plus one sampled
token, wall time), a fresh prompt per run so the prefix cache never hits, the first run of a process dropped
(warm-up). Modes (and ik_llama, when $JISU_IK_LLAMA_BENCH names its llama-bench) alternate round by round, each in
its own process; medians of the runs inside a round are printed per round, so compare within a round.

    flock /tmp/jisu-bench.lock .venv/bin/python benchmarks/bench_prefill_modes.py [--length 512] [--rounds 3]
        [--runs 3] [--modes deterministic,eager,deterministic-int8] [--ik-llama]

To compare two checkouts, run it with PYTHONPATH=<checkout> for each (the child processes inherit it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Mode -> LLM arguments. deterministic-int8: the deterministic stack with `--activations int8` (int4 products on
# int8 inputs: faster, coarser; docs/QUANTIZATION.md).
MODES = {"deterministic": {"deterministic": True}, "eager": {"deterministic": False},
         "deterministic-int8": {"deterministic": True, "activations": "int8"}}


def child(length: int, runs: int, options: dict) -> None:
    from jisu.llm import LLM
    from jisu.sampling_params import SamplingParams

    llm = LLM("smollm2-135m", **options)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(runs + 1):
        ids = [(i * 7919 + r * 104729) % 40000 + 100 for i in range(length)]
        t0 = time.perf_counter()
        llm.generate(ids, params)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times[1:]))


def jisu_round(length: int, runs: int, mode: str) -> list[float]:
    cmd = [sys.executable, __file__, "--child", mode, "--length", str(length), "--runs", str(runs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ik_llama_round(length: int, runs: int) -> float:
    """llama-bench's own mean prompt tokens/s over `runs` repetitions (its timers, its random tokens, -rtr 1)."""
    from jisu.loader.resolve import resolve_model

    binary = os.environ["JISU_IK_LLAMA_BENCH"]
    model = resolve_model("smollm2-135m")
    cmd = [binary, "-m", str(model), "-p", str(length), "-n", "0", "-t", "2", "-r", str(runs), "-o", "json",
           "-rtr", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per process after a warm-up (default 3)")
    p.add_argument("--modes", default="deterministic,eager",
                   help="comma-separated: deterministic, eager, deterministic-int8")
    p.add_argument("--ik-llama", action="store_true", help="also run $JISU_IK_LLAMA_BENCH each round")
    p.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.length, args.runs, MODES[args.child])
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    if args.ik_llama and not os.environ.get("JISU_IK_LLAMA_BENCH"):
        p.error("--ik-llama needs $JISU_IK_LLAMA_BENCH, the path of ik_llama.cpp's llama-bench")
    for r in range(1, args.rounds + 1):
        for mode in modes:
            times = jisu_round(args.length, args.runs, mode)
            med = statistics.median(times)
            print(f"round {r} jisu {mode:18s}: {args.length / med:7.1f} tok/s (median of {len(times)}: "
                  f"{[round(t * 1e3) for t in times]} ms)", flush=True)
        if args.ik_llama:
            print(f"round {r} ik_llama          : {ik_llama_round(args.length, args.runs):7.1f} tok/s "
                  f"(llama-bench pp{args.length}, mean of {args.runs})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
