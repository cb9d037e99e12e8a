"""Zero-shot classification by likelihood: LLM.classify scores every label as a continuation of each text and picks
the likeliest (one batched engine run; each pair's logprobs come from its own prefill).

    python examples/classify.py                       # the default model on examples/sentiment.jsonl
    python examples/classify.py --model gemma3-270m --normalize tokens

Prints each text's label, the model's probability for it among the labels, and the accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jisu import LLM

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to load (default: jisu's default model)")
    ap.add_argument("--data", default=str(HERE / "sentiment.jsonl"), help="JSONL lines of {text, label}")
    ap.add_argument("--template", default="Review: {text}\nSentiment (positive or negative):")
    ap.add_argument("--normalize", choices=["tokens", "chars"], default=None,
                    help="divide each label's log-likelihood by its length")
    ap.add_argument("--method", choices=["likelihood", "choice"], default="likelihood",
                    help="score every label (default) or decode under a choice constraint")
    args = ap.parse_args()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    labels = sorted({r["label"] for r in rows})
    llm = LLM(model=args.model)
    start = time.perf_counter()
    outs = llm.classify([r["text"] for r in rows], labels, template=args.template, normalize=args.normalize,
                        method=args.method)
    seconds = time.perf_counter() - start
    correct = 0
    for r, o in zip(rows, outs):
        ok = o.label == r["label"]
        correct += ok
        p = f"p={o.probs[o.label]:.2f}" if o.probs else ""
        print(f"{'ok ' if ok else 'BAD'} {o.label:>9} {p:6}  {r['text']}")
    print(f"accuracy {correct}/{len(rows)} = {correct / len(rows):.1%} "
          f"({seconds:.2f} s)")


if __name__ == "__main__":
    main()
