"""Start-up and peak memory of `jisu generate`, measured from outside: N fresh processes, each timed from spawn to
the first byte of generated text on its stdout (the first token: the CLI streams and flushes each one), to its exit,
and its peak RSS (ru_maxrss from wait4, the child alone).

    python benchmarks/bench_startup.py --runs 5
    python benchmarks/bench_startup.py --runs 5 --repo /tmp/old-checkout --repo .   # alternate two checkouts
    python benchmarks/bench_startup.py --phases        # one in-process run, timed and RSS-sampled per phase

Each --repo runs `python -m jisu.cli generate ...` with that checkout first on sys.path (its own jisu package),
alternating run by run; one warm-up run each first (page cache, the converted-model cache, the kernels' build)
is not counted. Medians and the number of runs are printed; on a shared machine run it under
`flock /tmp/jisu-bench.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def one_run(repo: Path, python: str, argv: list[str], env: dict) -> dict:
    """Spawn `jisu generate` from `repo`; seconds to the first stdout byte and to exit, peak RSS (MB), CPU s."""
    cmd = [python, "-m", "jisu.cli", "generate", *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    out = b""
    fd = proc.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None and chunk.strip():
            first = time.perf_counter() - t0
        out += chunk
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} (in {repo}) failed:\n{err}")
    return {"first_token_s": first, "exit_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "text": out.decode(errors="replace")}


def run_processes(args) -> None:
    repos = [Path(r).resolve() for r in (args.repo or [ROOT])]
    argv = [args.prompt, "--max-tokens", str(args.max_tokens), "--temperature", "0", *args.extra]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[Path, list[dict]] = {r: [] for r in repos}
    for r in repos:  # warm-up: page cache, converted-model cache, kernels
        one_run(r, args.python, argv, env)
    for i in range(args.runs):
        order = repos if i % 2 == 0 else repos[::-1]
        for r in order:
            results[r].append(one_run(r, args.python, argv, env))
    texts = {r: {x["text"] for x in rs} for r, rs in results.items()}
    summary = {}
    for r, rs in results.items():
        summary[str(r)] = {
            "runs": len(rs),
            "first_token_s": statistics.median(x["first_token_s"] for x in rs),
            "exit_s": statistics.median(x["exit_s"] for x in rs),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "first_token_s_all": [round(x["first_token_s"], 3) for x in rs],
            "peak_rss_mb_all": [round(x["peak_rss_mb"], 1) for x in rs],
            "texts": sorted(texts[r]),
        }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"jisu generate {' '.join(argv)!r}: medians of {args.runs} fresh processes each (alternating)")
    print(f"{'checkout':40s} {'first token':>12s} {'exit':>8s} {'peak RSS':>10s} {'CPU':>7s}")
    for r, s in summary.items():
        print(f"{r[-40:]:40s} {s['first_token_s']:11.2f}s {s['exit_s']:7.2f}s {s['peak_rss_mb']:7.0f} MB "
              f"{s['cpu_s']:6.2f}s")
    if len({t for ts in texts.values() for t in ts}) > 1:
        print("NOTE: the checkouts printed different texts:", {str(r): sorted(t) for r, t in texts.items()})


PHASES = r'''
import os, resource, sys, threading, time
t0 = time.perf_counter()
marks = [("start", t0)]
peak = {}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def sampler():
    while True:
        r, at = rss(), marks[-1][0]
        peak[at] = max(peak.get(at, 0.0), r)
        time.sleep(0.002)
threading.Thread(target=sampler, daemon=True).start()
after = {}
def mark(name):
    marks.append((name, time.perf_counter()))
    after[name] = rss()
    peak.setdefault(name, after[name])
import torch; mark("import torch")
import jisu.cli; from jisu.llm import LLM; from jisu.sampling_params import SamplingParams; mark("import jisu")
from jisu.loader.resolve import load_checkpoint
ck = load_checkpoint(sys.argv[1] or None, keep_blocks=True); mark("load checkpoint")
llm = LLM(model=sys.argv[1] or None, checkpoint=ck); del ck; mark("engine (model, kernels, KV cache)")
it = llm.stream_outputs(sys.argv[2], SamplingParams(temperature=0, max_tokens=int(sys.argv[3])))
next(it); mark("first token")
for _ in it: pass
mark("last token")
time.sleep(0.01)
rows = []
for (a, ta), (b, tb) in zip(marks, marks[1:]):
    rows.append({"phase": b, "ms": 1000 * (tb - ta), "peak_rss_mb": peak.get(a, 0.0), "rss_after_mb": after[b]})
import json
print(json.dumps({"phases": rows, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run_phases(args) -> None:
    repo = Path((args.repo or [ROOT])[0]).resolve()
    out = subprocess.run([args.python, "-c", PHASES, args.model or "", args.prompt, str(args.max_tokens)],
                         cwd=repo, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'phase':36s} {'ms':>8s} {'peak RSS during':>16s} {'RSS after':>10s}")
    for row in data["phases"]:
        print(f"{row['phase']:36s} {row['ms']:8.0f} {row['peak_rss_mb']:13.0f} MB {row['rss_after_mb']:7.0f} MB")
    print(f"ru_maxrss {data['ru_maxrss_mb']:.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repo", action="append", default=None, help="a jisu checkout to run (repeatable; default: this one)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--model", default=None, help="with --phases: the model (default: jisu's)")
    p.add_argument("--phases", action="store_true", help="one in-process run, timed and RSS-sampled per phase")
    p.add_argument("--json", action="store_true")
    p.add_argument("extra", nargs="*", help="more `jisu generate` arguments (after --)")
    args = p.parse_args()
    if args.phases:
        run_phases(args)
    else:
        run_processes(args)


if __name__ == "__main__":
    main()
