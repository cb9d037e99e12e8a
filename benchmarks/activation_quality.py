"""What rounding activations costs in quality: the same weights run with int16 activations (the decode default for
int8/int4 weights) and with int8 ones (`--activations int8`, int4 weights only) against float32 activations, and
each against the float32 model.

The kernels round activations only for products of up to 192 rows (decode, short prefill chunks), so a
512-token perplexity chunk would never use them. Here every quantized product is split into calls of at most
128 rows; the int16 path gives each row the same numbers whatever the batch (tests/test_qlinear_kernels.py), so
this is exactly what decode computes (int8 activations likewise). Text: WikiText-2 (raw test split, CC BY-SA 3.0),
llama.cpp's perplexity method (512-token chunks, second half scored).

    .venv/bin/python benchmarks/activation_quality.py [--weights auto,int8] [--act-bits 16,8] [--chunks 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from jisu.eval import kl_divergence, open_llm
from jisu.models.layers import Linear

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
ROWS = 128


@contextlib.contextmanager
def decode_sized_products():
    """Every kernel product in calls of at most ROWS rows, as decode and chunked prefill make them."""
    import torch

    plain = Linear.forward

    def split(self, x):
        if self.kernel_weight is None or x.shape[0] <= ROWS:
            return plain(self, x)
        return torch.cat([self.kernels.qlinear(x[i : i + ROWS], self.kernel_weight) for i in range(0, len(x), ROWS)])

    Linear.forward = split
    try:
        yield
    finally:
        Linear.forward = plain


def set_act_bits(llm, bits: int) -> None:
    llm.engine.model.set_activation_bits(bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default="auto,int8")
    ap.add_argument("--act-bits", default="16", help="rounded activation widths to measure, e.g. 16,8 (default 16)")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--text", default=str(TEXT))
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    reference = open_llm(args.model, "float32", 512).engine
    rows = []
    with decode_sized_products():
        for weights in args.weights.split(","):
            widths = [int(b) for b in args.act_bits.split(",")]
            runs = {}
            for bits in (32, *widths):
                runs[bits] = open_llm(args.model, weights, 512)
                set_act_bits(runs[bits], bits)
            f = kl_divergence(runs[32].engine, reference, text, chunks=args.chunks)
            row = {"weights": weights, "chunks": args.chunks, "float32_activations": f.to_dict()}
            for bits in widths:
                i, v = (kl_divergence(runs[bits].engine, ref, text, chunks=args.chunks)
                        for ref in (reference, runs[32].engine))
                row[f"int{bits}_activations"] = i.to_dict()
                row[f"int{bits}_vs_float32_activations"] = v.to_dict()
                print(f"{weights}: PPL float acts {f.ppl:.4f}, int{bits} acts {i.ppl:.4f} "
                      f"({100 * (i.ppl / f.ppl - 1):+.3f}%); vs float32 model: KL {f.kl_mean:.5f} -> {i.kl_mean:.5f}, "
                      f"top-1 {100 * f.top1_agreement:.2f}% -> {100 * i.top1_agreement:.2f}%; int{bits} vs float acts: "
                      f"KL {v.kl_mean:.2e}, top-1 {100 * v.top1_agreement:.2f}%", flush=True)
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
