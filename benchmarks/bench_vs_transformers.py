"""jisu vs Hugging Face transformers on the same weights and prompts, side by side in one run.

Measures (definitions as in ../shared/docs/BASELINES.md):
  prefill   batch-1 forward over a 512-token prompt from an empty cache, tokens/s
  decode    batch-1, 128 greedy tokens: 127 / (time of token 128 - time of token 1)
  conc16    16 concurrent prompts, 128 greedy tokens each: total decode tokens/s, i.e. 16 x 127 tokens over the
            time from the first sequence's first token to the last sequence's last token (prefill excluded)
Engines alternate run by run; medians over --runs runs after one warm-up each. Ratios are printed against
transformers, and jisu's 16-concurrent rate against its own batch-1 decode rate.

    python benchmarks/bench_vs_transformers.py [--model PATH] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jisu import LLM, SamplingParams  # noqa: E402
from jisu.loader.resolve import resolve_model  # noqa: E402

PROMPT_LEN = 512
NEW_TOKENS = 128
CONCURRENT = 16


def synthetic_prompt(tokenizer_encode, length: int, salt: int = 0) -> list[int]:
    text = " ".join(f"word{(i * 7919 + salt) % 1000}" for i in range(length))
    ids = tokenizer_encode(text)[:length]
    assert len(ids) == length
    return ids


class Clock:
    """A transformers streamer that only records when each put() (prompt, then each token step) happens."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class JisuEngine:
    name = "jisu"

    def __init__(self, path: str):
        self.llm = LLM(model=path, max_model_len=2048)

    def encode(self, text):
        return self.llm.tokenizer.encode(text, add_special_tokens=False)

    def prefill(self, ids) -> float:
        self.llm.engine.blocks.reset_prefix_cache()  # "from an empty cache": no reuse of the last run's prompt
        t = time.perf_counter()
        self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        return len(ids) / (time.perf_counter() - t)

    def decode(self, ids) -> float:
        out = self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
        return out.metrics.decode_tokens_per_s

    def concurrent(self, prompts) -> float:
        self.llm.engine.blocks.reset_prefix_cache()
        outs = self.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
        first = min(o.outputs[0].timeline.first_token for o in outs)
        last = max(o.outputs[0].timeline.last_token for o in outs)
        return sum(len(o.token_ids) - 1 for o in outs) / (last - first)


class TransformersEngine:
    name = "transformers"

    def __init__(self, path: str):
        import transformers

        p = Path(path)
        kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        d = str(p.parent) if kw else str(p)
        self.tok = transformers.AutoTokenizer.from_pretrained(d, **kw)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def encode(self, text):
        return self.tok(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def prefill(self, ids) -> float:
        t = time.perf_counter()
        self.model(torch.tensor([ids]))
        return len(ids) / (time.perf_counter() - t)

    @torch.no_grad()
    def decode(self, ids) -> float:
        clock = Clock()
        self.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False, streamer=clock, pad_token_id=self.tok.pad_token_id)
        # The first put() is the prompt; then one per generated token.
        return (NEW_TOKENS - 1) / (clock.times[NEW_TOKENS] - clock.times[1])

    @torch.no_grad()
    def concurrent(self, prompts) -> float:
        # transformers batches by left-padding to the longest prompt: its usual way to serve many prompts.
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = Clock()
        # The batch decodes in lockstep: put() #1 is the prompt, #2 the first token of all, the last the last.
        self.model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False, pad_token_id=self.tok.pad_token_id, streamer=clock)
        return len(prompts) * (NEW_TOKENS - 1) / (clock.times[-1] - clock.times[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the default model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="jisu,transformers")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    path = str(resolve_model(args.model))
    print(f"model: {path}\ntorch threads: {torch.get_num_threads()}", flush=True)

    engines = []
    for name in args.engines.split(","):
        cls = {"jisu": JisuEngine, "transformers": TransformersEngine}[name]
        t = time.perf_counter()
        engines.append(cls(path))
        print(f"loaded {name} in {time.perf_counter() - t:.1f} s", flush=True)

    encode = engines[0].encode
    long_prompt = synthetic_prompt(encode, PROMPT_LEN)
    short = [synthetic_prompt(encode, 32 + 4 * i, salt=i) for i in range(CONCURRENT)]
    results = {e.name: {"prefill": [], "decode": [], "conc16": []} for e in engines}

    for e in engines:  # warm-up
        e.prefill(long_prompt[:64])
        e.decode(short[0][:16])
    for run in range(args.runs):
        for e in engines:  # alternate engines run by run
            r = results[e.name]
            r["prefill"].append(e.prefill(long_prompt))
            r["decode"].append(e.decode(short[0]))
            r["conc16"].append(e.concurrent(short))
            print(f"run {run + 1} {e.name:13s} prefill {r['prefill'][-1]:7.1f}  decode {r['decode'][-1]:6.1f}  "
                  f"16-concurrent {r['conc16'][-1]:7.1f} tok/s", flush=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"\nmedians of {args.runs} runs (tokens/s)")
    print(f"{'engine':14s}{'prefill 512':>13s}{'decode b1':>12s}{'decode 16 conc':>16s}")
    for n, m in med.items():
        print(f"{n:14s}{m['prefill']:13.1f}{m['decode']:12.1f}{m['conc16']:16.1f}")
    if "jisu" in med and "transformers" in med:
        j, h = med["jisu"], med["transformers"]
        print("\njisu / transformers: " + ", ".join(f"{k} {j[k] / h[k]:.2f}x" for k in j))
    if "jisu" in med:
        j = med["jisu"]
        print(f"jisu 16-concurrent / jisu batch-1 decode: {j['conc16'] / j['decode']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
