"""lm-evaluation-harness against `jisu serve`, and its own `hf` model on the same weights, on one small task.

The harness's `local-completions` model talks to jisu's /v1/completions exactly as it talks to vLLM: token-id
prompts in batches (--batch-size per request), `echo` + `logprobs` + `max_tokens` 1 for every answer's
log-likelihood, and its remote tokenizer through /tokenizer_info and /tokenize. The `hf` model runs the same
GGUF through transformers (gguf_file=: dequantized to float32), so jisu's `--weights float32` is the like-for-like
comparison and `--weights auto` (the file's 4-bit blocks on jisu's kernels) shows what quantized kernels cost in
accuracy. The task (benchmarks/lm_eval_task/): 48 general-knowledge questions with four answers each, acc and
acc_norm (per character of the answer).

    pip install lm-eval                  # once; not a test dependency
    python benchmarks/bench_lm_eval.py [--model PATH.gguf] [--batch-size 8] [--jisu-weights auto,float32] [--no-hf]

Prints accuracy and wall times per engine: `eval s` is the harness's whole run of the task (task setup, requests,
metrics) with the model already loaded; `load s` is jisu serve's start until healthy, or building the hf model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "benchmarks" / "lm_eval_task"
TASK = "jisu_mc"
SERVED_NAME = "jisu-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, weights: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jisu.cli", "serve", "--port", str(port), "--served-model-name", SERVED_NAME,
           "--weights", weights, "--log-level", "warning", *extra]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jisu serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("jisu serve did not become healthy within 300 s")


def evaluate(model: str, model_args: str, batch_size: int, limit: int | None) -> tuple[dict, float, float]:
    """(acc and acc_norm, seconds to build the harness's model, seconds of the evaluation itself)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = get_model(model).create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})
    built = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[TASK], batch_size=batch_size, limit=limit,
                          task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=False)
    done = time.perf_counter()
    metrics = out["results"][TASK]
    return ({k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0] in ("acc", "acc_norm")},
            built - start, done - built)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file (default: jisu's default model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--jisu-weights", default="auto,float32", help="comma-separated --weights to serve jisu with")
    ap.add_argument("--no-hf", action="store_true", help="skip the harness's hf model")
    ap.add_argument("--serve-args", default="", help="more jisu serve arguments, e.g. '--no-deterministic'")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    os.chdir(ROOT)  # the task's data_files path is relative to the repository
    from jisu.loader.resolve import resolve_model

    gguf = Path(resolve_model(args.model)) if args.model is None or not Path(args.model).exists() else Path(args.model)
    rows = []
    for weights in [w for w in args.jisu_weights.split(",") if w]:
        port = free_port()
        start = time.perf_counter()
        proc = start_server(args.model, weights, port, args.serve_args.split())
        load_seconds = time.perf_counter() - start
        try:
            model_args = (f"model={SERVED_NAME},base_url=http://127.0.0.1:{port}/v1/completions,"
                          f"tokenizer_backend=remote,num_concurrent=1,max_retries=1,tokenized_requests=True")
            metrics, _, seconds = evaluate("local-completions", model_args, args.batch_size, args.limit)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        label = f"jisu serve --weights {weights} {args.serve_args}".strip()
        rows.append({"engine": f"{label} (local-completions)", **metrics, "seconds": seconds,
                     "load_seconds": load_seconds})
    if not args.no_hf:
        model_args = f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32"
        metrics, load_seconds, seconds = evaluate("hf", model_args, args.batch_size, args.limit)
        rows.append({"engine": "transformers (lm-eval hf, GGUF dequantized to float32)", **metrics, "seconds": seconds,
                     "load_seconds": load_seconds})

    print(f"\ntask {TASK}: {args.limit or 48} questions x 4 answers, batch size {args.batch_size}, model {gguf.name}")
    print(f"{'engine':<64} {'acc':>6} {'acc_norm':>9} {'eval s':>7} {'load s':>7}")
    for r in rows:
        print(f"{r['engine']:<64} {r.get('acc', float('nan')):>6.3f} {r.get('acc_norm', float('nan')):>9.3f} "
              f"{r['seconds']:>7.1f} {r['load_seconds']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"task": TASK, "model": str(gguf), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
