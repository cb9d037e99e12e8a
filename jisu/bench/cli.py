"""`jisu bench latency | serve | compare`: the argument parsers and the dispatch.

Only argparse is imported here, so `jisu --help` stays fast; each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import sys

from jisu.config import (
    ACTIVATIONS, ACTIVATIONS_HELP, DETERMINISTIC_HELP, KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, WEIGHTS_HELP,
)


_DEFAULT_MODEL_HELP = "GGUF file, Hugging Face folder or short name (default: smollm2-135m, jisu's default model)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=_DEFAULT_MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--weights", default="auto", help=WEIGHTS_HELP)
    p.add_argument("--activations", default="int16", choices=ACTIVATIONS, help=ACTIVATIONS_HELP)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false", help=DETERMINISTIC_HELP)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` with its three subcommands to a `jisu` subparsers object."""
    b = subparsers.add_parser("bench", help="benchmarks: latency, serving load, side-by-side with other engines",
                              description="Reproducible benchmarks with the field's metric definitions.")
    sub = b.add_subparsers(dest="bench_command", required=True)

    lat = sub.add_parser("latency", help="prefill / decode speed, TTFT and peak memory of one fixed workload")
    _add_model_args(lat)
    lat.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    lat.add_argument("--output-len", type=int, default=128, help="generated tokens (default 128)")
    lat.add_argument("--batch", type=int, default=1, help="prompts run together (default 1)")
    lat.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (default 5)")
    lat.add_argument("--depth", type=int, default=0,
                     help="tokens already in the KV cache before the prompt, like llama-bench -d (default 0)")
    lat.add_argument("--json", default=None, metavar="FILE", help="also write the result here")

    srv = sub.add_parser("serve", help="load-test an OpenAI-compatible server (vllm bench serve's metrics)")
    srv.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    srv.add_argument("--model", default=None, help="model name sent in requests (default: the first of /v1/models)")
    srv.add_argument("--tokenizer", default=None,
                     help="model whose tokenizer builds synthetic prompts and counts tokens when the server sends "
                          "no usage (default: jisu's default model)")
    srv.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels, one run each (default 1,4,16,64)")
    srv.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: 4 x the largest level, >= 8)")
    srv.add_argument("--request-rate", default="inf", help="requests/s as a Poisson process, or inf: all at once (default)")
    srv.add_argument("--dataset", default="synthetic",
                     help="synthetic (default), builtin (jisu's real-prompt set) or a JSONL file with prompt / messages")
    srv.add_argument("--input-len", type=int, default=512, help="synthetic prompt tokens (default 512)")
    srv.add_argument("--output-len", type=int, default=None,
                     help="max tokens per request (default: a record's output_len, else 128)")
    srv.add_argument("--endpoint", choices=["auto", "completions", "chat"], default="auto",
                     help="auto: chat for messages, completions for prompts (default)")
    srv.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0: greedy)")
    srv.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="ask the server to generate every requested token (default on)")
    srv.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    srv.add_argument("--percentiles", default="99", help="comma-separated percentiles reported (default 99)")
    srv.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--label", default=None, help="name of this server in plots (default: the model name)")
    srv.add_argument("--json", default=None, metavar="FILE", help="also write the result here")
    srv.add_argument("--plot", default=None, metavar="DIR", help="write throughput and latency charts here")
    srv.add_argument("--plot-with", nargs="+", default=None, metavar="FILE",
                     help="earlier `bench serve --json` results drawn as more lines (e.g. another server)")

    cmp = sub.add_parser("compare", help="the latency workload on jisu, transformers, llama.cpp and ik_llama.cpp "
                                         "side by side")
    cmp.add_argument("--model", "-m", default=None, help=_DEFAULT_MODEL_HELP)
    cmp.add_argument("--engines", default="jisu,transformers,llama.cpp,ik_llama",
                     help="comma-separated: jisu, transformers, llama.cpp, ik_llama (default all four; ik_llama runs "
                          "the llama-bench named by $JISU_IK_LLAMA_BENCH, skipped when unset); jisu:WEIGHTS adds "
                          "jisu with that --weights format, e.g. jisu,jisu:float32,llama.cpp")
    cmp.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    cmp.add_argument("--output-len", type=int, default=128, help="generated tokens (default 128)")
    cmp.add_argument("--runs", type=int, default=3, help="timed runs per engine after a warm-up (default 3)")
    cmp.add_argument("--concurrency", default="1,16", help="comma-separated levels (default 1,16)")
    cmp.add_argument("--calibration", choices=["full", "quick", "fresh", "none"], default="full",
                     help="machine limits for %% of roofline: full / quick = the cached figures, else measured now; "
                          "fresh = measured now even if cached; none = no roofline (default full)")
    cmp.add_argument("--ik-llama-rtr", action=argparse.BooleanOptionalAction, default=True,
                     help="run ik_llama's llama-bench with -rtr 1, its run-time repack, its fastest CPU setting "
                          "(default on)")
    cmp.add_argument("--ik-llama-timeout", type=float, default=600.0, metavar="S",
                     help="seconds one llama-bench run may take before it is killed (default 600)")
    cmp.add_argument("--no-deterministic", dest="deterministic", action="store_false", help="jisu's engines: "
                     + DETERMINISTIC_HELP)
    cmp.add_argument("--activations", default="int16", choices=ACTIVATIONS, help="jisu's engines: " + ACTIVATIONS_HELP)
    cmp.add_argument("--json", default=None, metavar="FILE", help="also write the result here")
    cmp.add_argument("--plot", default=None, metavar="DIR", help="write a bar chart here")
    return b


def cmd_bench(args) -> int:
    if args.bench_command == "latency":
        from jisu.bench.latency import cmd_latency

        return cmd_latency(args)
    if args.bench_command == "serve":
        from jisu.bench.serve import cmd_serve_bench

        return cmd_serve_bench(args)
    from jisu.bench.compare import cmd_compare

    return cmd_compare(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m jisu.bench.cli ...`: the same as `jisu bench ...`."""
    from jisu.cli import main as jisu_main

    args = list(sys.argv[1:] if argv is None else argv)
    return jisu_main(args if args[:1] == ["bench"] else ["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
