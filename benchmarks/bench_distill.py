"""Issue 27's target: does distillation recover at least half of what structured pruning cost?

For each setting (FFN -25%, one of three kv-head groups, 4 of 30 layers) this prunes the default model (or reuses
a folder pruned before), runs `jisu distill` on it for a wall-time budget, and evaluates teacher, pruned and
distilled models on WikiText-2 chunks that were not trained on (`jisu distill` leaves the evaluated chunks out of
its training text when both are the same file). One process at a time, so each run has the whole CPU.

    flock /tmp/jisu-bench.lock python benchmarks/bench_distill.py --minutes 30 \
        --text ../shared/data/wikitext-2-raw-test.txt --work /tmp/distill-bench

Prints a markdown table and writes every run's JSON report to --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    # name: (prune arguments, the target perplexity)
    "ffn-25": (["--method", "ffn", "--amount", "0.25"], 53.0),
    "kv-groups-1of3": (["--method", "heads", "--amount", "1"], 46.0),
    "layers-4of30": (["--method", "layers", "--amount", "4"], 42.0),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="distillation budget per setting")
    ap.add_argument("--text", required=True, help="training and evaluation text (WikiText-2 raw test)")
    ap.add_argument("--work", default="/tmp/distill-bench", help="folder for pruned and distilled models")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--eval-chunks", type=int, default=20)
    ap.add_argument("--extra", default="", help="more `jisu distill` arguments, e.g. '--lr 3e-4 --seq-len 512'")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jisu = [sys.executable, "-m", "jisu.cli"]
    results = {}
    for name in args.settings.split(","):
        prune_args, target = SETTINGS[name]
        pruned, out = work / f"{name}-pruned", work / f"{name}-distilled"
        if not (pruned / "model.safetensors").is_file():
            print(f"[{name}] pruning", file=sys.stderr, flush=True)
            subprocess.run([*jisu, "prune", *prune_args, "--out", str(pruned), "--overwrite"], check=True,
                           stdout=sys.stderr)
        print(f"[{name}] distilling for {args.minutes:g} min", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        cmd = [*jisu, "distill", str(pruned), "--out", str(out), "--overwrite", "--minutes", str(args.minutes),
               "--steps", "100000", "--text", args.text, "--eval-text", args.text, "--eval-chunks",
               str(args.eval_chunks), "--json", *args.extra.split()]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        report["wall_s"] = time.perf_counter() - t0
        report["command"] = " ".join(cmd[2:])
        (work / f"{name}.json").write_text(json.dumps(report, indent=1))
        results[name] = (report, target)
    print("| setting | unpruned PPL | pruned PPL | distilled PPL | target | recovered | KL before -> after | "
          "top-1 before -> after | steps (tokens) | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (r, target) in results.items():
        teacher, before, after = r["evaluation"]
        lost = before["ppl"] - teacher["ppl"]
        recovered = (before["ppl"] - after["ppl"]) / lost if lost > 0 else float("nan")
        t = r["training"]
        print(f"| {name} | {teacher['ppl']:.2f} | {before['ppl']:.2f} | {after['ppl']:.2f} | <= {target:g} "
              f"({'met' if after['ppl'] <= target else 'missed'}) | {100 * recovered:.0f}% | "
              f"{before['kl_mean']:.3f} -> {after['kl_mean']:.3f} | {100 * before['top1_agreement']:.1f}% -> "
              f"{100 * after['top1_agreement']:.1f}% | {t['steps']} ({t['tokens']:,}) | {t['elapsed_s'] / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
