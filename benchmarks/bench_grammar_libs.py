"""The grammar libraries side by side on the default model's tokenizer, as measured to choose one for structured
output: tokenizer set-up, compiling a nested JSON schema, and the per-token mask over a real 43-token answer.
Runs whichever of llguidance (jisu's dependency) and xgrammar (`pip install xgrammar`, not a dependency) are
installed.

    .venv/bin/python benchmarks/bench_grammar_libs.py
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Alice Smith", "age": 31, "tags": ["a", "c"], "address": {"city": "Paris", "zip": "75001"}}


def report(name: str, setup: float, compile_s: float, masks: list[float], done: bool) -> None:
    print(f"{name:>11}: tokenizer {setup * 1e3:6.0f} ms, compile {compile_s * 1e3:6.1f} ms, mask median "
          f"{statistics.median(masks) * 1e6:5.0f} us, max {max(masks) * 1e6:6.0f} us over {len(masks)} tokens; "
          f"answer complete: {done}")


def run_llguidance(tok, vocab: int, eos: list[int], ids: list[int]) -> None:
    import llguidance
    import torch

    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - t
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    masks = []
    for token in ids:
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        masks.append(time.perf_counter() - t)
        assert matcher.consume_token(token), matcher.get_error()
    report("llguidance", setup, compile_s, masks, matcher.is_accepting())


def run_xgrammar(tok, vocab: int, eos: list[int], ids: list[int]) -> None:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok), vocab_size=vocab,
                                                   stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    masks = []
    for token in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        masks.append(time.perf_counter() - t)
        assert matcher.accept_token(token)
    report("xgrammar", setup, compile_s, masks, matcher.is_terminated() or matcher.accept_token(eos[0]))


def main() -> None:
    from jisu.loader.resolve import load_checkpoint

    ckpt = load_checkpoint(None)
    tok = ckpt.tokenizer.tokenizer
    eos = list(ckpt.tokenizer.eos_token_ids)
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False).ids
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
        try:
            fn(tok, ckpt.config.vocab_size, eos, ids)
        except ImportError:
            print(f"{name:>11}: not installed")


if __name__ == "__main__":
    main()
