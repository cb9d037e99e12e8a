"""`jisu quantize MODEL --weights int4 --out DIR`: writes an int8/int4 copy of a model that jisu loads as it is.

int8 and int4 are rounded to nearest (int8 with outlier columns, as at load) or, with --method gptq, by GPTQ over
calibration text (jisu/quant/gptq.py; int4's group scales and zeros then fitted by least squares,
jisu/quant/int4_grid.py): slower (~2 min for SmolLM2-135M here) and closer to the float model.

The output is a Hugging Face-style folder: each quantized matrix X is stored as X.qweight / X.scales
(/ X.zeros; int8's float16 outlier columns as X.outlier_cols / X.outlier_weights) in model.safetensors,
config.json carries quantization_config {"quant_method": "jisu", ...}, and the safetensors header records every
matrix's format under "jisu.quantization".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from jisu.errors import InvalidRequestError


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser(
        "quantize", help="write an int8/int4 copy of a model (safetensors folder jisu loads)",
        description="Quantize a model's linear layers to int8 (per output channel, or -g32 groups; 64 input "
                    "columns per matrix stay float16, 8 with groups: those with the largest activations on built-in "
                    "calibration prompts; -oN for N, -o0 for none) or int4 (groups of 32/64/128 with scale and "
                    "zero). GGUF Q4_0/Q4_1/Q8_0 blocks that already are the asked format are copied, not requantized.",
    )
    q.add_argument("model", nargs="?", default=None, help="GGUF file, Hugging Face folder or short name "
                   "(default: smollm2-135m)")
    q.add_argument("--weights", required=True, help="int8, int8-g32, int8-o0, int8-g32-o4, int4 (= int4-g32), "
                   "int4-g64, int4-g128")
    q.add_argument("--out", required=True, help="output folder (safetensors), or a .gguf file: GGUF output takes "
                   "int8-g32 (Q8_0, which has no place for outlier columns: written without them) or int4 (Q4_1) "
                   "from a GGUF source, whose metadata it keeps")
    q.add_argument("--overwrite", action="store_true", help="replace the output folder's model files")
    q.add_argument("--method", choices=METHODS, default="rtn", help="how linear layers are rounded: rtn (to "
                   "nearest, as at load; default) or gptq (error-compensated over calibration text; int4 also fits "
                   "each group's scale and zero by least squares; the output layer stays rounded to nearest)")
    q.add_argument("--calibration", default=None, metavar="FILE", help="gptq: UTF-8 text to calibrate on, cut "
                   "into 512-token pieces (default: jisu's own, ~24k tokens sampled from SmolLM2-135M-Instruct)")
    return q


METHODS = ("rtn", "gptq")


def _check_method(spec, method: str, calibration: str | None) -> None:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown rounding method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "gptq" and spec.name not in ("int8", "int4"):
        raise InvalidRequestError(f"--method gptq rounds int8 or int4 weights, not {spec.name}")
    if calibration is not None and method != "gptq":
        raise InvalidRequestError("--calibration applies to --method gptq")


def _apply(checkpoint, plan, method: str, calibration: str | None) -> dict:
    """`plan` applied to `checkpoint`'s tensors, its linear matrices rounded by `method`: to nearest as at load
    (plan.load_rounding), or by GPTQ. The calibration run, where the rounding needs one, comes first."""
    from jisu.quant.calibration import calibration_texts, input_statistics, sample_text
    from jisu.quant.gptq import gptq_rounding
    from jisu.quant.plan import load_rounding

    spec = plan.spec
    rounding = None
    if method == "gptq" and plan.rounds_linear:
        statistics = input_statistics(checkpoint, sample_text(calibration), second_moments=True)
        rounding = gptq_rounding(statistics, spec.outliers, bits=int(spec.name[3:]))
    elif plan.needs_statistics:
        rounding = load_rounding(spec, input_statistics(checkpoint, calibration_texts()))
    return plan.apply(checkpoint.tensors, rounding)


def quantized_tensors(checkpoint, weights: str, output_group: int | None = None, method: str = "rtn",
                      calibration: str | None = None):
    """(spec, tensors to save, {matrix: format}) for `checkpoint` in format `weights`, int8 linear layers rounded
    by `method` (gptq over the text of file `calibration`, default jisu's)."""
    from jisu.quant.formats import QuantizedTensor
    from jisu.quant.plan import parse_weights, plan_weights

    spec = parse_weights(weights)
    if not spec.quantized:
        raise InvalidRequestError(f"jisu quantize writes int8 or int4 weights, got {weights!r}")
    _check_method(spec, method, calibration)
    plan = plan_weights(checkpoint.tensors, spec, checkpoint.ties_output, output_group)
    converted = _apply(checkpoint, plan, method, calibration)
    out, formats = {}, {}
    for name, t in converted.items():
        if isinstance(t, QuantizedTensor):
            prefix = name.removesuffix(".weight")
            out.update(t.tensors(prefix))
            how = {"int8": "", "int4": "", "gptq": " by GPTQ"}.get(t.origin, f" from {t.origin}")
            formats[prefix] = t.describe() + how
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return spec, out, formats


def run_quantize(args) -> int:
    from jisu.loader.resolve import load_checkpoint
    from jisu.loader.save import save_hf_folder
    from jisu.quant.calibration import SAMPLE_TEXT

    ckpt = load_checkpoint(args.model, keep_blocks=True)
    if str(args.out).lower().endswith(".gguf"):
        return _run_gguf(ckpt, args)
    before = sum(t.nbytes for t in ckpt.tensors.values())  # a tensor's or a QuantizedTensor's
    spec, tensors, formats = quantized_tensors(ckpt, args.weights, method=args.method, calibration=args.calibration)
    after = sum(t.nbytes for t in tensors.values())
    record = {"weights": spec.label(), "method": args.method, "source": ckpt.source, "matrices": formats}
    if args.method == "gptq":
        record["calibration"] = str(args.calibration or SAMPLE_TEXT.relative_to(SAMPLE_TEXT.parents[3]))
    folder = save_hf_folder(
        args.out, ckpt.config, tensors, ckpt.tokenizer,
        metadata={"format": "pt", "jisu.quantization": json.dumps(record)},
        extra_config={"quantization_config": {
            "quant_method": "jisu", "weights": spec.label(), "method": args.method,
        }},
        overwrite=args.overwrite,
    )
    kinds: dict[str, int] = {}
    for f in formats.values():
        kinds[f] = kinds.get(f, 0) + 1
    print(f"jisu quantize: {ckpt.source} -> {folder} ({spec.label()}, {args.method})", file=sys.stderr)
    for kind, n in sorted(kinds.items()):
        print(f"  {n:4d} matrices {kind}", file=sys.stderr)
    print(f"  weights {before / 1e6:.1f} MB as loaded -> {after / 1e6:.1f} MB", file=sys.stderr)
    return 0


def _run_gguf(ckpt, args) -> int:
    from pathlib import Path

    from jisu.quant.formats import QuantizedTensor
    from jisu.quant.gguf_out import write_gguf
    from jisu.quant.plan import parse_weights, plan_weights

    spec = parse_weights(args.weights)
    if not (spec.label() == "int4-g32" or (spec.name == "int8" and spec.group_size == 32)):
        raise InvalidRequestError(
            f"GGUF output takes int8-g32 (Q8_0) or int4 (Q4_1); {args.weights!r} has no GGUF block type: write a "
            f"folder instead (--out DIR)"
        )
    if ckpt.metadata.get("format") != "gguf":
        raise InvalidRequestError("GGUF output needs a GGUF source (its metadata and tokenizer are copied)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidRequestError(f"{out} exists; pass --overwrite to replace it")
    if spec.name == "int8":
        spec = replace(spec, outlier_columns=0)  # Q8_0 has no place for float outlier columns
    _check_method(spec, args.method, args.calibration)
    tensors = _apply(ckpt, plan_weights(ckpt.tensors, spec, ckpt.ties_output, output_group=32), args.method,
                     args.calibration)
    write_gguf(ckpt.source, out, tensors, ckpt.config, bits=int(spec.name.removeprefix("int")))
    kept = sum(1 for t in tensors.values() if isinstance(t, QuantizedTensor) and t.origin in ("Q4_1", "Q8_0"))
    print(f"jisu quantize: {ckpt.source} -> {out} ({spec.label()}; {kept} matrices copied as they were)",
          file=sys.stderr)
    return 0


