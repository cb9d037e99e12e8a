"""What rounding activations to int16 costs in quality: the same weights run with int16 activations (the decode
default for int8/int4 weights) against float32 activations, and both against the float32 model.

The kernels take int16 activations only for products of up to 192 rows (decode, short prefill chunks), so a
512-token perplexity chunk would never use them. Here every quantized product is split into calls of at most
128 rows; the int16 path gives each row the same numbers whatever the batch (tests/test_qlinear_kernels.py), so
this is exactly what decode computes. Text: WikiText-2 (raw test split, CC BY-SA 3.0), llama.cpp's perplexity
method (512-token chunks, second half scored).

    .venv/bin/python benchmarks/activation_quality.py [--weights auto,int8,int4-g64] [--chunks 20]
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
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--text", default=str(TEXT))
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    reference = open_llm(args.model, "float32", 512).engine
    rows = []
    with decode_sized_products():
        for weights in args.weights.split(","):
            runs = {}
            for bits in (32, 16):
                runs[bits] = open_llm(args.model, weights, 512)
                set_act_bits(runs[bits], bits)
            f, i, v = (kl_divergence(runs[a].engine, b, text, chunks=args.chunks)
                       for a, b in ((32, reference), (16, reference), (16, runs[32].engine)))
            rows.append({"weights": weights, "chunks": args.chunks, "float32_activations": f.to_dict(),
                         "int16_activations": i.to_dict(), "int16_vs_float32_activations": v.to_dict()})
            print(f"{weights}: PPL float acts {f.ppl:.4f}, int16 acts {i.ppl:.4f} ({100 * (i.ppl / f.ppl - 1):+.3f}%); "
                  f"vs float32 model: KL {f.kl_mean:.5f} -> {i.kl_mean:.5f}, top-1 {100 * f.top1_agreement:.2f}% -> "
                  f"{100 * i.top1_agreement:.2f}%; int16 vs float acts: KL {v.kl_mean:.2e}, top-1 "
                  f"{100 * v.top1_agreement:.2f}%", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
