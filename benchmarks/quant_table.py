"""Quality and speed of every weight format and pruning setting of one model, as one markdown table.

    python benchmarks/quant_table.py                      # default model, writes docs/QUANTIZATION.md
    python benchmarks/quant_table.py --chunks 4 --runs 1  # quick look

Each setting runs in its own process, so its peak memory is its own. Per setting:
- weight bytes: every distinct weight tensor the loaded model holds (blocks, scales and zeros included);
- peak RSS: the process's high-water mark after the speed runs and perplexity (before the float32
  reference is loaded for KL);
- decode tokens/s at batch 1 and with 16 sequences decoding together (128-token prompts, 64 new tokens, medians
  of --runs runs after a warm-up; `jisu bench latency`'s definitions);
- perplexity of wikitext-2 (llama.cpp's method: 512-token chunks, second half scored), KL divergence
  (mean, nats) and top-1 agreement against the float32 run of the same file, on the same positions. Every
  product is made in calls of at most 128 rows, as decode makes them, so int8/int4 weights are scored with the
  activations decode gives them (int16 by default; see benchmarks/activation_quality.py), and each setting runs
  with its default KV cache (float16 for low-bit weights with int16 activations, float32 otherwise).
The text is WikiText-2 (raw test split), CC BY-SA 3.0, from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

# (label, --weights, a model written first or None[, --activations]): ("prune", method, amount) runs `jisu prune`,
# ("gptq", weights) runs `jisu quantize --method gptq`; the setting then loads what they wrote.
SETTINGS = [
    ("float32 (reference)", "float32", None),
    ("Q4_1 kept native (auto)", "auto", None),
    ("Q4_1 kept native, float32 activations", "auto", None, "float32"),
    ("int8 per channel, 64 outlier columns (int8)", "int8", None),
    ("int8 per channel, 8 outlier columns", "int8-o8", None),
    ("int8 per channel, no outlier columns", "int8-o0", None),
    ("int8 group 32, 8 outlier columns", "int8-g32", None),
    ("int8 group 32, no outlier columns", "int8-g32-o0", None),
    ("int8 per channel, 64 outlier columns, GPTQ (jisu quantize --method gptq)", "auto", ("gptq", "int8")),
    ("int4 group 32", "int4", None),
    ("int4 group 64", "int4-g64", None),
    ("int4 group 64, GPTQ (jisu quantize --method gptq)", "auto", ("gptq", "int4-g64")),
    ("int4 group 128", "int4-g128", None),
    ("unstructured 50%, float32", "float32", ("prune", "unstructured", "0.5")),
    ("2:4 sparse, float32", "float32", ("prune", "2:4", None)),
    ("FFN channels -25%, float32", "float32", ("prune", "ffn", "0.25")),
    ("FFN channels -25%, int4", "int4", ("prune", "ffn", "0.25")),
    ("kv-head groups -1 of 3, float32", "float32", ("prune", "heads", "1")),
    ("layers -4 of 30, float32", "float32", ("prune", "layers", "4")),
]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(model: str, reference_model: str, weights: str, activations: str, text_path: str, chunks: int,
            runs: int) -> dict:
    from activation_quality import decode_sized_products

    from jisu import LLM
    from jisu.bench.latency import run_latency
    from jisu.eval.kl import kl_divergence
    from jisu.eval.perplexity import read_text
    from jisu.models.layers import weight_bytes_held

    llm = LLM(model=model, weights=weights, activations=activations, max_model_len=640, max_num_seqs=16,
              enable_prefix_caching=False)
    out = {"weights": llm.engine.weights, "weight_bytes": weight_bytes_held(llm.engine.model)}
    b1 = run_latency(llm, input_len=128, output_len=64, batch=1, runs=runs)
    b16 = run_latency(llm, input_len=128, output_len=64, batch=16, runs=runs)
    out["decode_b1"] = b1["results"]["decode_tokens_per_s"]["median"]
    out["decode_b16"] = b16["results"]["decode_tokens_per_s"]["median"]
    out["prefill_b1"] = b1["results"]["prefill_tokens_per_s"]["median"]
    text = read_text(text_path)
    from jisu.eval.perplexity import perplexity

    with decode_sized_products():
        ppl = perplexity(llm.engine, text, 512, chunks)
    out["ppl"], out["ppl_stderr"] = ppl.ppl, ppl.stderr
    out["peak_rss"] = peak_rss()
    ref = LLM(model=reference_model, weights="float32", max_model_len=640, max_num_seqs=1,
              enable_prefix_caching=False)
    if ref.engine.model_config.vocab_size == llm.engine.model_config.vocab_size:
        with decode_sized_products():
            kl = kl_divergence(llm.engine, ref.engine, text, 512, chunks)
        out["kl_mean"], out["top1"], out["ref_ppl"] = kl.kl_mean, kl.top1_agreement, kl.reference_ppl
    return out


def write_model(model: str, step: tuple, out_dir: Path) -> str:
    """Runs `jisu prune` (step: ("prune", method, amount)) or `jisu quantize --method gptq` (("gptq", weights)) on
    `model` into `out_dir`."""
    if step[0] == "gptq":
        cmd = [sys.executable, "-m", "jisu.cli", "quantize", model, "--weights", step[1], "--method", "gptq"]
    else:
        _, method, amount = step
        cmd = [sys.executable, "-m", "jisu.cli", "prune", model, "--method", method,
               *(["--amount", amount] if amount is not None else [])]
    subprocess.run(cmd + ["--out", str(out_dir)], check=True, stdout=subprocess.DEVNULL)
    return str(out_dir)


def markdown(rows: list[tuple[str, dict]], meta: dict) -> str:
    ref = rows[0][1]
    lines = [
        f"Model: {meta['model']}. Machine: {meta['machine']}. Perplexity over the first {meta['chunks']} chunks "
        f"of wikitext-2 (512 tokens, llama.cpp's method); decode medians of {meta['runs']} runs; "
        f"`python benchmarks/quant_table.py` ({meta['date']}, {meta['minutes']:.0f} min).",
        "",
        "| setting | weight MB | peak RSS MB | decode b1 tok/s | decode 16-conc tok/s | perplexity | vs float32 | KL mean | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |||||||| ")
            continue
        dp = 100 * (r["ppl"] / ref["ppl"] - 1)
        kl = f"{r['kl_mean']:.5f}" if "kl_mean" in r else "-"
        top1 = f"{100 * r['top1']:.2f}%" if "top1" in r else "-"
        lines.append(
            f"| {label} | {r['weight_bytes'] / 1e6:.1f} | {r['peak_rss'] / 2**20:.0f} | {r['decode_b1']:.1f} | "
            f"{r['decode_b16']:.1f} | {r['ppl']:.4f} ± {r['ppl_stderr']:.3f} | {dp:+.2f}% | {kl} | {top1} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: jisu's default model (SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated setting numbers (0-based) to run")
    p.add_argument("--out", default=str(ROOT / "docs" / "QUANTIZATION.md"), help="markdown file ('-' = stdout)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: JSON of one setting
    args = p.parse_args()
    if args.one:
        model, reference, weights, activations = json.loads(args.one)
        print(json.dumps(run_one(model, reference, weights, activations, args.text, args.chunks, args.runs)))
        return 0

    from jisu.bench.latency import machine_info
    from jisu.loader.resolve import resolve_model

    model = str(resolve_model(args.model))
    chosen = [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, weights, step, *acts) in enumerate(chosen):
            print(f"== {label}", file=sys.stderr, flush=True)
            try:
                path = model if step is None else write_model(model, step, Path(tmp) / f"model-{n}")
                child = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps([path, model, weights, *(acts or ["int16"])]), "--text", args.text,
                     "--chunks", str(args.chunks), "--runs", str(args.runs)],
                    check=True, capture_output=True, text=True,
                )
                r = json.loads(child.stdout.strip().splitlines()[-1])
            except subprocess.CalledProcessError as e:
                r = {"error": (e.stderr or "").strip().splitlines()[-1:] or ["exit status " + str(e.returncode)]}
                r["error"] = r["error"][0]
            print(json.dumps(r), file=sys.stderr, flush=True)
            rows.append((label, r))
    m = machine_info()
    meta = {"model": Path(model).name, "machine": f"{m['device_name']}, {m['threads']} threads, torch {m['torch']}",
            "chunks": args.chunks, "runs": args.runs, "date": time.strftime("%Y-%m-%d"),
            "minutes": (time.time() - start) / 60}
    table = markdown(rows, meta)
    if args.out == "-":
        print(table)
    else:
        Path(args.out).write_text(table)
        print(table)
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
