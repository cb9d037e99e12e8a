"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from jisu import SamplingParams  # noqa: E402

pytestmark = pytest.mark.real_model
NEW_TOKENS = 32
TOP_N = 5


@pytest.fixture(scope="module")
def hf(real_model_path):
    d, name = str(real_model_path.parent), real_model_path.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def hf_greedy(model, ids: list[int]):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
            return_dict_in_generate=True, pad_token_id=model.config.eos_token_id, eos_token_id=None,
        )
    tokens = out.sequences[0, len(ids):].tolist()
    tops = [s[0].topk(TOP_N).indices.tolist() for s in out.scores]
    return tokens, tops


def assert_parity(ours, our_tops, theirs, their_tops):
    """vLLM's rule: equal greedy tokens; at the first difference each is in the other's top-N."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in their_tops[i] and b in our_tops[i], (
                f"first difference at token {i}: jisu {a} (transformers top-{TOP_N} {their_tops[i]}), "
                f"transformers {b} (jisu top-{TOP_N} {our_tops[i]})"
            )
            return
    assert len(ours) == len(theirs) == NEW_TOKENS


def check(real_llm, model, ids):
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_N)
    out = real_llm.generate([ids], sp)[0]
    our_tops = [[t for t, _ in lp.top] for lp in out.outputs[0].logprobs]
    theirs, their_tops = hf_greedy(model, ids)
    assert_parity(out.token_ids, our_tops, theirs, their_tops)


def test_plain_prompt_greedy_matches_transformers(real_llm, hf):
    tok, model = hf
    text = "The three primary colours are"
    ids = real_llm.tokenizer.encode(text)
    assert ids == tok(text).input_ids
    check(real_llm, model, ids)


def test_chat_prompt_greedy_matches_transformers(real_llm, hf):
    tok, model = hf
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ids = real_llm.tokenizer.encode_chat(messages)
    theirs = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ids == list(theirs)
    check(real_llm, model, ids)


def test_chat_answer_is_sensible(real_llm):
    out = real_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
