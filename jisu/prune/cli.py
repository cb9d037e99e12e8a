"""`jisu prune MODEL --method M --amount X --out DIR`: prune a model and save it as a Hugging Face folder.

--amount means, by method:
  unstructured  sparsity in [0, 1) of every linear matrix (least important weights zeroed; shapes unchanged)
  2:4 (any N:M) no amount: keep the N most important of every M consecutive inputs of each row
  ffn           fraction in [0, 1) of FFN channels removed from every layer
  heads         a whole number >= 1 of kv-head groups removed from every layer (each with its query heads),
                or a fraction in [0, 1) of the attention heads that comes to whole groups
  layers        number of layers removed

Wired into `jisu` by jisu/cli.py through add_prune_parser / run_prune; also runnable as
`python -m jisu.prune.cli MODEL ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

_AMOUNTS = {
    "unstructured": "the sparsity in [0, 1) of every linear matrix",
    "ffn": "the fraction in [0, 1) of FFN channels removed per layer",
    "heads": "kv-head groups removed per layer, or a fraction of the attention heads",
    "layers": "the number of layers removed",
}
METHOD_HELP = "unstructured | 2:4 (or any N:M) | ffn | heads | layers"


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune", help="prune a model (unstructured, 2:4, FFN channels, attention heads, layers) and save it",
        description=__doc__.split("\n\n")[1] if __doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face folder or short name (default: smollm2-135m)")
    p.add_argument("--method", required=True, help=METHOD_HELP)
    p.add_argument("--amount", type=float, default=None,
                   help="sparsity (unstructured), fraction of channels (ffn), kv groups or fraction of heads (heads), "
                        "layer count (layers); none for N:M")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write the pruned model to")
    p.add_argument("--overwrite", "--force", dest="force", action="store_true",
                   help="replace a model already in --out")
    p.add_argument("--score", default=None, choices=["weight", "activation"],
                   help="importance: weight (weights only: |w| for unstructured / N:M, row and column norms for "
                        "ffn / heads) or activation (calibration prompts run through the engine: |w| x input RMS "
                        "for unstructured / N:M, the output change each unit causes for ffn / heads). Default: "
                        "weight for unstructured / N:M, activation for ffn / heads; layers always use activation")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration text: a .jsonl prompt file (as jisu bench --dataset) or a plain text file "
                        "(default: jisu's built-in prompt set)")
    p.add_argument("--calibration-new-tokens", type=int, default=None, metavar="N",
                   help="greedy tokens generated after each calibration prompt, whose activations count too "
                        "(default 32)")
    p.add_argument("--include-output", action="store_true",
                   help="unstructured / N:M: prune the output layer too when it is not tied to the embedding")
    p.add_argument("--json", action="store_true", help="print the pruning report as one JSON object on stdout")
    p.add_argument("--distill", type=int, default=None, metavar="STEPS",
                   help="then train the pruned model for STEPS steps to match the original (jisu distill's "
                        "defaults) and print its evaluation table; the distilled model replaces the pruned one in --out")
    p.add_argument("--distill-minutes", type=float, default=None, metavar="M",
                   help="with --distill: a wall-time budget for the training")
    p.add_argument("--distill-text", default=None, metavar="FILE",
                   help="with --distill: training text (default: jisu's built-in sampled text)")
    return p


def run_prune(args) -> int:
    """Runs `jisu prune`; any user error is printed as one line and gives exit status 1."""
    from jisu.errors import JisuError

    try:
        return _run(args)
    except JisuError as e:
        print(f"jisu: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"jisu: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


def _run(args) -> int:
    from pathlib import Path

    from jisu.loader.resolve import load_checkpoint, resolve_model
    from jisu.loader.save import check_output_folder, save_checkpoint
    from jisu.prune import count_nonzero, parse_nm, prune
    from jisu.prune.calibration import DEFAULT_NEW_TOKENS
    from jisu.prune.common import PruneError, check_fraction

    method = args.method
    if ":" in method:
        parse_nm(method)
    elif method not in ("unstructured", "ffn", "heads", "layers"):
        raise PruneError(f"unknown pruning method {method!r}; choose one of: {METHOD_HELP}")
    amount = args.amount
    if amount is None and ":" not in method:
        raise PruneError(f"--method {method} needs --amount ({_AMOUNTS[method]})")
    if amount is not None and ":" in method:
        kept = method.replace(":", " of every ")
        raise PruneError(f"--method {method} takes no --amount (it always keeps {kept} weights)")
    if method in ("unstructured", "ffn"):
        check_fraction("sparsity" if method == "unstructured" else "the ffn fraction", amount)
    if amount is not None and method == "layers" and not float(amount).is_integer():
        raise PruneError(f"--amount for layers is a whole number of layers, got {amount:g}")
    if amount is not None and float(amount).is_integer() and method in ("heads", "layers"):
        amount = int(amount)
    new_tokens = DEFAULT_NEW_TOKENS if args.calibration_new_tokens is None else args.calibration_new_tokens
    if new_tokens < 0:
        raise PruneError(f"--calibration-new-tokens must be >= 0, got {new_tokens}")
    out = Path(args.out)
    check_output_folder(out, overwrite=args.force)  # before the slow part

    path = resolve_model(args.model)
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    say(f"loading {path}")
    ckpt = load_checkpoint(path)
    pruned = prune(ckpt, method, amount, include_output=args.include_output, score=args.score,
                   calibration=args.calibration, new_tokens=new_tokens)
    report = dict(pruned.metadata["pruning"][-1])
    report["source"] = str(path)
    if method == "unstructured" or ":" in method:
        report["nonzero_before"] = count_nonzero(ckpt)
        report["nonzero_after"] = count_nonzero(pruned)
    metadata = {
        "pruning_method": method,
        "pruning_amount": "" if amount is None else f"{amount:g}",
        "pruning_source": str(path),
        "pruning": json.dumps([*_earlier_pruning(path), *pruned.metadata["pruning"][:-1], report]),
    }
    save_checkpoint(out, pruned, metadata=metadata, overwrite=args.force)
    report["out"] = str(out)
    if args.json:
        print(json.dumps(report))
    else:
        for line in describe(report, ckpt.config, pruned.config):
            print(line)
    return 0


def _earlier_pruning(path) -> list:
    """The pruning steps recorded in a folder written by an earlier `jisu prune` (none for anything else)."""
    weights = path / "model.safetensors" if path.is_dir() else None
    if weights is None or not weights.is_file():
        return []
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            steps = json.loads((f.metadata() or {}).get("pruning", "[]"))
    except Exception:  # an unreadable header was already reported by the loader; history is optional
        return []
    return steps if isinstance(steps, list) else []


def describe(report: dict, before, after) -> list[str]:
    """Human-readable lines for a pruning report."""
    method = report["method"]
    lines = []
    cal = report.get("calibration")
    basis = f", {cal['tokens']} calibration tokens from {cal['source']}" if cal else ""
    scored = f" (importance: {report['score']}{basis})" if "score" in report else ""
    if method == "unstructured" or ":" in method:
        what = f"{report['amount'] * 100:g}% of each matrix" if method == "unstructured" else f"{method} pattern"
        lines.append(f"zeroed {report['weights_zeroed']:,} weights ({what}){scored} in {report['matrices']} linear "
                     "matrices; "
                     "embeddings, norms" + ("" if report.get("include_output") else " and the output layer")
                     + " untouched; matrices stay dense (same shapes)")
        nz0, nz1 = report["nonzero_before"], report["nonzero_after"]
        lines.append(f"nonzero parameters: {nz0:,} -> {nz1:,} ({_pct(nz0, nz1)})")
    elif method == "ffn":
        lines.append(f"removed {report['channels_removed_per_layer']} of {before.intermediate_size} FFN channels in "
                     f"each of {before.num_hidden_layers} layers: intermediate_size {before.intermediate_size} -> "
                     f"{after.intermediate_size}{scored}")
    elif method == "heads":
        lines.append(f"removed {report['kv_groups_removed_per_layer']} of {before.num_key_value_heads} kv-head groups "
                     f"per layer: heads {before.num_attention_heads} -> {after.num_attention_heads}, kv heads "
                     f"{before.num_key_value_heads} -> {after.num_key_value_heads}, head_dim {after.head_dim}{scored}")
        removed = report.get("removed") or {}
        if removed:
            lines.append("kv groups removed by layer: " + " ".join(f"{n}:{','.join(map(str, g))}"
                                                                    for n, g in removed.items()))
    elif method == "layers":
        lines.append(f"removed layers {', '.join(map(str, report['removed'])) or 'none'} of "
                     f"{before.num_hidden_layers}: {before.num_hidden_layers} -> {after.num_hidden_layers} layers"
                     f"{f' (importance: 1 - cos(in, out){basis})' if cal else ''}")
    p0, p1 = report["params_before"], report["params_after"]
    lines.append(f"parameters: {p0:,} -> {p1:,} ({_pct(p0, p1)})")
    lines.append(f"saved: {report['out']}")
    return lines


def _pct(before: int, after: int) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "n/a"


def main(argv: list[str] | None = None) -> int:
    """`python -m jisu.prune.cli MODEL ...`: the same as `jisu prune MODEL ...`."""
    parser = argparse.ArgumentParser(prog="jisu")
    add_prune_parser(parser.add_subparsers(dest="command", required=True))
    args = list(sys.argv[1:] if argv is None else argv)
    return run_prune(parser.parse_args(args if args[:1] == ["prune"] else ["prune", *args]))


if __name__ == "__main__":
    sys.exit(main())
