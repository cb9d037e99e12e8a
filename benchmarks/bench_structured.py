"""What structured output costs per decode step, at batch 1 and 16, on the default model.

1. The sampler alone, on the same logits: a greedy step with every row under a JSON-schema grammar against the same
   step without one. The grammar rows are walked through a real answer token by token, so each step's masks are
   the ones a real answer meets (llguidance's mask computation + applying it).
2. Whole requests: `n` chat requests for a JSON profile, with the schema and without (same max_tokens, EOS
   ignored without), alternating, read from the engine's own step timeline: the sampling part of each decode
   step and the decode rate.

    .venv/bin/python benchmarks/bench_structured.py [--batches 1,16] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jisu import LLM
from jisu.sampling import SamplingRow
from jisu.sampling_params import SamplingParams
from jisu.structured import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                           "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
          "address": {"city": "London", "zip": "10001"}}
ASK = [{"role": "user", "content": "Make up a user profile for our website, as JSON."}]


def sampler_cost(llm: LLM, batch: int, reps: int) -> tuple[float, float]:
    """Median ms of a greedy Sampler call over `batch` rows without and with a grammar on every row."""
    engine = llm.engine
    grammar = engine.structured.compile(StructuredOutputsParams(json=SCHEMA))
    answer = llm.tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    params = SamplingParams(temperature=0)
    logits = torch.randn(batch, engine.model_config.vocab_size, generator=torch.Generator().manual_seed(0))
    plain_rows = [SamplingRow(params, [], [], None) for _ in range(batch)]
    plain, masked = [], []
    for _ in range(reps):
        matchers = [engine.structured.matcher(grammar) for _ in range(batch)]
        for token in answer:
            rows = [SamplingRow(params, [], [], None, m) for m in matchers]
            scratch = logits.clone()  # the engine hands the sampler logits it may overwrite
            t0 = time.perf_counter()
            engine.sampler(logits, plain_rows)
            t1 = time.perf_counter()
            engine.sampler(scratch, rows, overwrite=True)
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            masked.append(t2 - t1)
            for m in matchers:
                m.consume(token)
    return 1e3 * statistics.median(plain), 1e3 * statistics.median(masked)


def request_cost(llm: LLM, batch: int, tokens: int, constrained: bool) -> tuple[float, float, int]:
    """(median sampling ms per decode step, decode tokens/s, tokens generated) for `batch` chat requests."""
    engine = llm.engine
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=tokens, ignore_eos=not constrained,
                             structured_outputs=spec) for i in range(batch)]
    first = engine.step_log.count
    t0 = time.perf_counter()
    outs = llm.chat([ASK] * batch, params)
    wall = time.perf_counter() - t0
    steps = [s for s in engine.step_log.since(first) if s.num_prefill_tokens == 0]
    generated = sum(len(o.token_ids) for o in outs)
    sample_ms = 1e3 * statistics.median(s.sample for s in steps) if steps else float("nan")
    return sample_ms, generated / wall, generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(max_model_len=1024)
    llm.chat(ASK, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=SCHEMA)))  # warm
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {llm.engine.model_config.vocab_size}")
    print("\n1. Sampler call, greedy, the same logits (median over the steps of a real answer, "
          f"{args.rounds} rounds)")
    print(f"{'batch':>5} {'plain ms':>9} {'grammar ms':>11} {'added ms':>9}")
    for b in (int(x) for x in args.batches.split(",")):
        plain, masked = sampler_cost(llm, b, args.rounds)
        print(f"{b:>5} {plain:>9.3f} {masked:>11.3f} {masked - plain:>9.3f}")
    print(f"\n2. Whole requests ({args.tokens} max tokens, temperature 0.7, alternating, {args.rounds} rounds; "
          "medians)")
    print(f"{'batch':>5} {'constraint':>10} {'sample ms/step':>15} {'tok/s':>8} {'tokens':>7}")
    for b in (int(x) for x in args.batches.split(",")):
        results = {False: [], True: []}
        for _ in range(args.rounds):
            for constrained in (False, True):
                results[constrained].append(request_cost(llm, b, args.tokens, constrained))
        for constrained in (False, True):
            r = results[constrained]
            print(f"{b:>5} {'json' if constrained else 'none':>10} {statistics.median(x[0] for x in r):>15.3f} "
                  f"{statistics.median(x[1] for x in r):>8.1f} {statistics.median(x[2] for x in r):>7.0f}")


if __name__ == "__main__":
    main()
