"""`jisu eval perplexity | kl | greedy`: quality figures for a model and weight format.

Progress goes to stderr (rich); results go to stdout, as text or one JSON object with --json.
Wired into `jisu` by jisu/cli.py through add_eval_parser / cmd_eval; also runnable as
`python -m jisu.eval.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from jisu.eval import WEIGHT_FORMATS, check_weights, open_llm


def _common(p: argparse.ArgumentParser, weights_required: bool) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file, Hugging Face folder or short name (default: smollm2-135m)")
    formats = ", ".join(WEIGHT_FORMATS)
    if weights_required:
        p.add_argument("--weights", required=True, help=f"weight format under test: {formats}")
        p.add_argument("--reference-weights", default="float32", help="weight format of the reference run (default float32)")
        p.add_argument("--reference-model", default=None, help="model of the reference run (default: --model), e.g. "
                       "the file a `jisu quantize` or `jisu prune` output was made from")
    else:
        p.add_argument("--weights", default="float32", help=f"weight format: {formats} (default float32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def _chunked(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="text file to score (e.g. wikitext-2-raw-test.txt)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half is scored (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="quality: perplexity, KL divergence and greedy agreement vs a reference")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    pp = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity's method")
    _chunked(pp)
    _common(pp, weights_required=False)
    kl = sub.add_parser("kl", help="KL divergence and top-1 agreement of --weights vs --reference-weights")
    _chunked(kl)
    _common(kl, weights_required=True)
    gr = sub.add_parser("greedy", help="greedy-continuation agreement of --weights vs --reference-weights")
    gr.add_argument("prompts", nargs="?", default=None, help="JSONL prompt file (default: a built-in set)")
    gr.add_argument("--max-tokens", "-n", type=int, default=64, help="tokens generated per prompt (default 64)")
    _common(gr, weights_required=True)
    return ev


@contextmanager
def _progress(label: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _note(msg: str | None) -> None:
    if msg:
        print(f"jisu: note: {msg}", file=sys.stderr)


def cmd_eval(args) -> int:
    return {"perplexity": _cmd_perplexity, "kl": _cmd_kl, "greedy": _cmd_greedy}[args.eval_command](args)


def _cmd_perplexity(args) -> int:
    from jisu.eval.perplexity import check_ctx, perplexity, read_text

    check_weights(args.weights)
    check_ctx(args.ctx)
    text = read_text(args.file)
    llm = open_llm(args.model, args.weights, args.ctx, 1, args.device)
    with _progress("perplexity") as progress:
        r = perplexity(llm.engine, text, args.ctx, args.chunks, progress)
    _note(r.note)
    if args.json:
        print(json.dumps({"weights": args.weights, **r.to_dict()}))
    else:
        print(f"PPL = {r.ppl:.4f} +/- {r.stderr:.5f}  ({args.weights}, {r.chunks} chunks of {r.ctx}, "
              f"{r.tokens_scored} tokens scored)")
    return 0


def _reference_model(args):
    return args.model if args.reference_model is None else args.reference_model


def _cmd_kl(args) -> int:
    from jisu.eval.kl import kl_divergence
    from jisu.eval.perplexity import check_ctx, read_text

    check_weights(args.weights)
    check_weights(args.reference_weights)
    check_ctx(args.ctx)
    text = read_text(args.file)
    ref = open_llm(_reference_model(args), args.reference_weights, args.ctx, 1, args.device)
    test = open_llm(args.model, args.weights, args.ctx, 1, args.device)
    with _progress("kl") as progress:
        r = kl_divergence(test.engine, ref.engine, text, args.ctx, args.chunks, progress)
    _note(r.note)
    if args.json:
        print(json.dumps({"weights": args.weights, "reference_weights": args.reference_weights, **r.to_dict()}))
    else:
        print(f"{args.weights} vs {args.reference_weights}: KL mean {r.kl_mean:.4g}  median {r.kl_median:.4g}  "
              f"p99 {r.kl_p99:.4g}  max {r.kl_max:.4g}  top-1 agreement {100 * r.top1_agreement:.2f}%")
        print(f"PPL {r.ppl:.4f} +/- {r.ppl_stderr:.5f} vs reference {r.reference_ppl:.4f} +/- "
              f"{r.reference_ppl_stderr:.5f}  ({r.chunks} chunks of {r.ctx}, {r.tokens_scored} tokens)")
    return 0


def _cmd_greedy(args) -> int:
    from jisu.eval.greedy import greedy_agreement, load_prompts

    check_weights(args.weights)
    check_weights(args.reference_weights)
    prompts = load_prompts(args.prompts)
    # Room for a few hundred prompt tokens plus the continuation, for every prompt at once.
    window = 256 + max(1, args.max_tokens)
    ref = open_llm(_reference_model(args), args.reference_weights, window, len(prompts), args.device)
    test = open_llm(args.model, args.weights, window, len(prompts), args.device)
    with _progress("greedy") as progress:
        r = greedy_agreement(test, ref, prompts, args.max_tokens, progress)
    if args.json:
        print(json.dumps({"weights": args.weights, "reference_weights": args.reference_weights, **r.to_dict()}))
    else:
        print(f"{args.weights} vs {args.reference_weights}: prefix agreement {100 * r.prefix_agreement:.2f}%  "
              f"full matches {100 * r.full_match_rate:.1f}% of {r.prompts} prompts ({r.max_tokens} tokens each)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jisu.eval.cli ...`: the same as `jisu eval ...`."""
    from jisu.cli import main as jisu_main

    args = list(sys.argv[1:] if argv is None else argv)
    return jisu_main(args if args[:1] == ["eval"] else ["eval", *args])


if __name__ == "__main__":
    sys.exit(main())
