"""Speed of the QWeight kernels (jisu/kernels/qlinear.cpp) over SmolLM2-135M's linear layers, random weights.

Decode (M = 1 and M = 16 rows): one "model pass" is 30 layers x (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536) plus the tied output layer 49152x576, every matrix its own allocation (so the pass streams the
weights from memory, as a real model does, instead of re-reading one layer from cache). Reported per format:
  - py:  ms per pass calling `qlinear` from Python (includes ~121 Python calls and output allocations)
  - c++: ms per pass calling qweight_matvec back to back from C++ (what a fused decoder sees)
  - GB/s: bytes of the QWeights (data + scales + zeros) / c++ time
Prefill (M = 512): GFLOP/s (2*M*N*K / time) of `qlinear` per shape and format, next to float32 torch.mm.

Times are medians of several passes. Run on a quiet machine: another busy process halves everything.

    .venv/bin/python benchmarks/bench_qlinear.py [--passes 15] [--formats f32,q8g32,...] [--no-prefill]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from jisu.kernels.build import cpu_linear_kernels

LAYERS = 30
LAYER_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
OUTPUT = (49152, 576)
# int4 group 128 does not divide SmolLM2's hidden size 576; 192 is the largest-group point that does.
FORMATS = {
    "f32": (32, 0),
    "q8g32": (8, 32),
    "q8chan": (8, -1),  # one scale per output row (group = K)
    "q4g32": (4, 32),
    "q4g64": (4, 64),
    "q4g192": (4, 192),
}


class OtherLoad:
    """CPU time other processes used while a block ran, as a share of all cores (Linux /proc/stat; else None).
    On a shared machine a busy neighbour slows every multi-threaded kernel here a lot, so each result line says."""

    def __enter__(self):
        self.t0, self.own0 = self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        self.t1, self.own1 = self._busy(), self._own()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v[:8])  # busy, total (jiffies)
        except OSError:
            return None

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system

    def share(self):
        if self.t0 is None or self.t1 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (self.t1[0] - self.t0[0]) / hz - (self.own1 - self.own0)
        total = (self.t1[1] - self.t0[1]) / hz
        return max(0.0, busy / total) if total > 0 else None

    def tag(self):
        s = self.share()
        return "" if s is None else f"  [others {100 * s:.0f}%]" + (" NOISY" if s > 0.05 else "")


def wait_quiet(max_wait: float, idle_s: float = 2.0) -> bool:
    """Waits (up to max_wait seconds) until other processes leave the CPUs idle for idle_s seconds."""
    deadline, quiet = time.monotonic() + max_wait, 0.0
    while time.monotonic() < deadline:
        probe = OtherLoad()
        with probe:
            time.sleep(0.5)
        share = probe.share()
        if share is None:
            return True
        quiet = quiet + 0.5 if share < 0.03 else 0.0
        if quiet >= idle_s:
            return True
    return False


def measured(fn, retries: int, max_wait: float):
    """fn() under OtherLoad; re-run (after waiting for an idle machine) while other processes were busy."""
    for attempt in range(retries + 1):
        if retries:
            wait_quiet(max_wait)
        with OtherLoad() as load:
            result = fn()
        share = load.share()
        if share is None or share <= 0.05 or attempt == retries:
            return result, load


def make(ext, bits: int, group: int, N: int, K: int, gen: torch.Generator):
    if bits == 32:
        return ext.QWeight(32, torch.randn(N, K, generator=gen))
    G = K if group < 0 else group
    scales = (torch.rand(N, K // G, generator=gen) * 0.01).half()
    if bits == 8:
        return ext.QWeight(8, torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen), scales, None, G)
    zeros = ((torch.rand(N, K // G, generator=gen) - 0.5) * 0.1).half()
    data = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    return ext.QWeight(4, data, scales, zeros, G)


def model_weights(ext, bits: int, group: int):
    gen = torch.Generator().manual_seed(0)
    layers = [make(ext, bits, group, N, K, gen) for _ in range(LAYERS) for N, K in LAYER_SHAPES.values()]
    return layers, make(ext, bits, group, *OUTPUT, gen)


def python_pass_ms(ext, weights, M: int, passes: int) -> float:
    xs = {K: torch.randn(M, K) for K in {w.K for w in weights}}
    times = []
    for _ in range(passes + 1):
        t0 = time.perf_counter()
        for w in weights:
            ext.qlinear(xs[w.K], w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def cpp_pass_ms(ext, weights, M: int, passes: int) -> float:
    return statistics.median(ext._time_matvec(weights, M, passes + 1)[1:]) * 1e3


def decode_pass(ext, layers, out, M: int, passes: int):
    py = python_pass_ms(ext, layers + [out], M, passes)
    return py, cpp_pass_ms(ext, layers, M, passes), cpp_pass_ms(ext, [out], M, passes)


def decode(ext, names, passes: int, retries: int, max_wait: float):
    print(f"decode: ms per model pass (30 layers + output layer), median of {passes}; GB/s from the c++ time")
    head = (
        f"{'format':8} {'MB':>6} | {'M':>2} {'py ms':>7} {'c++ ms':>7} {'GB/s':>6} | layers ms  GB/s | output ms  GB/s"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        bits, group = FORMATS[name]
        layers, out = model_weights(ext, bits, group)
        lb, ob = sum(w.nbytes() for w in layers), out.nbytes()
        for M in (1, 16):
            p = max(3, passes // 3) if M == 16 else passes
            (py, lt, ot), load = measured(functools.partial(decode_pass, ext, layers, out, M, p), retries, max_wait)
            total = lt + ot
            print(
                f"{name:8} {(lb + ob) / 1e6:6.1f} | {M:2} {py:7.2f} {total:7.2f} {(lb + ob) / total / 1e6:6.1f} | "
                f"{lt:9.2f} {lb / lt / 1e6:5.1f} | {ot:9.2f} {ob / ot / 1e6:5.1f}{load.tag()}",
                flush=True,
            )
        del layers, out


def median_s(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prefill_row(ext, x, wf, ws, reps: int) -> dict[str, float]:
    row = {"f32 mm": median_s(lambda: torch.mm(x, wf.T), reps)}
    for name, w in ws.items():
        row[name] = median_s(functools.partial(ext.qlinear, x, w), reps)
    return row


def prefill(ext, names, M: int, reps: int, retries: int, max_wait: float):
    print(f"\nprefill: GFLOP/s at M={M} (2*M*N*K / median time of {reps}); f32 mm = torch.mm(x, W.T) on float32 W")
    shapes = dict(LAYER_SHAPES, output=OUTPUT)
    head = f"{'shape':>16} {'f32 mm':>7} " + " ".join(f"{n:>7}" for n in names)
    print(head)
    print("-" * len(head))
    gen = torch.Generator().manual_seed(0)
    totals = {n: 0.0 for n in ["f32 mm", *names]}
    flops_total = 0.0
    for label, (N, K) in shapes.items():
        x = torch.randn(M, K, generator=gen)
        flops = 2 * M * N * K
        flops_total += flops * (1 if label == "output" else LAYERS)

        wf = torch.randn(N, K, generator=gen)
        ws = {n: make(ext, *FORMATS[n], N, K, gen) for n in names}
        row, load = measured(functools.partial(prefill_row, ext, x, wf, ws, reps), retries, max_wait)
        for n, t in row.items():
            totals[n] += t * (1 if label == "output" else LAYERS)
        cells = " ".join(f"{flops / row[n] / 1e9:7.1f}" for n in row)
        print(f"{label + f' {N}x{K}':>16} {cells}{load.tag()}", flush=True)
    print(f"{'model pass':>16} " + " ".join(f"{flops_total / totals[n] / 1e9:7.1f}" for n in totals))
    print(f"{'model pass ms':>16} " + " ".join(f"{totals[n] * 1e3:7.1f}" for n in totals))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=15)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prefill-m", type=int, default=512)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument(
        "--retries",
        type=int,
        default=0,
        help="on a shared machine: wait for idle CPUs before each line, re-measure lines that other "
        "processes disturbed (more than 5%% of the CPUs) up to this many times",
    )
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for idle CPUs per attempt")
    args = ap.parse_args()
    ext = cpu_linear_kernels()
    if ext is None:
        raise SystemExit("C++ kernels unavailable")
    names = [n for n in args.formats.split(",") if n]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_decode:
        decode(ext, names, args.passes, args.retries, args.max_wait)
    if not args.no_prefill:
        prefill(ext, names, args.prefill_m, max(3, args.passes // 3), args.retries, args.max_wait)


if __name__ == "__main__":
    main()
