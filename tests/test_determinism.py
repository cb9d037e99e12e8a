"""Deterministic by default: a request's tokens and logprobs, bit for bit, do not depend on what shares its steps,
on prefix-cache hits, on how its prompt was chunked, on preemption or on streaming, for every weights format,
activation rounding and KV-cache dtype, on the C++ kernels and on the eager fallback (jisu/runner/runner.py)."""

from __future__ import annotations

import pytest

from jisu import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=0.9, seed=11, max_tokens=8, ignore_eos=True, logprobs=2)

# (weights, activations, kv cache, C++ kernels): every combination the CPU offers. float32 weights take no
# activation rounding; without C++ kernels only float weights run (int4's torch fallback is tested elsewhere).
CONFIGS = [
    (w, a, kv, True)
    for w, acts in (("float32", ("float32",)), ("int8", ("int16", "float32")), ("int4", ("int16", "float32")))
    for a in acts
    for kv in ("float32", "float16", "bfloat16")
] + [("float32", "float32", kv, False) for kv in ("float32", "float16", "bfloat16")]


def prompt(i: int, length: int) -> list[int]:
    return [(13 * i + 7 * j) % 250 + 3 for j in range(length)]


def answer(out) -> tuple:
    """Tokens and every logprob of one completion: equal only if the logits were equal bit for bit."""
    c = out.outputs[0]
    return tuple(c.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in c.logprobs)


def make(model_dir, weights, activations, kv, kernels, **kw) -> LLM:
    return LLM(model=str(model_dir), weights=weights, activations=activations, kv_cache_dtype=kv,
               cpu_kernels=kernels, **kw)


@pytest.mark.parametrize("weights,activations,kv,kernels", CONFIGS, ids=lambda v: str(v))
def test_tokens_do_not_depend_on_cache_batch_chunking_preemption_or_streaming(
    tiny_llama_dir, weights, activations, kv, kernels
):
    # 40 tokens: two full 16-token blocks come from the prefix cache on the second run, 8 are computed then.
    target = prompt(0, 40)
    others = [prompt(i, 5 + 9 * i) for i in range(1, 6)]
    llm = make(tiny_llama_dir, weights, activations, kv, kernels)
    # Prompts prefilled 13 tokens a step (the target's last token alone: a row computed by itself, as a decode
    # is), and so few KV blocks that sequences are preempted and recomputed.
    small = make(tiny_llama_dir, weights, activations, kv, kernels, max_num_batched_tokens=13, num_kv_blocks=8,
                 enable_prefix_caching=False)
    for params in (GREEDY, SEEDED):
        llm.engine.blocks.reset_prefix_cache()
        cold = answer(llm.generate([target], params)[0])
        warm = llm.generate([target], params)[0]
        assert warm.metrics.cached_prompt_tokens == 32
        assert answer(warm) == cold, "a prefix-cache hit changed the answer"
        batched = llm.generate(others[:3] + [target] + others[3:], [GREEDY] * 3 + [params] + [GREEDY] * 2)
        assert answer(batched[3]) == cold, "sharing the batch changed the answer"
        streamed = list(llm.stream_outputs(target, params))[-1]
        assert answer(streamed) == cold, "streaming changed the answer"

        assert answer(small.generate([target], params)[0]) == cold, "chunked prefill changed the answer"
        seen = small.engine.step_log.count
        crowd = small.generate([target] + others[2:5], [params] + [GREEDY] * 3)
        assert any(r.num_preempted for r in small.engine.step_log.since(seen)), "the crowd should force preemption"
        assert answer(crowd[0]) == cold, "preemption changed the answer"


def test_faster_kernels_are_one_flag_away(tiny_llama_dir):
    llm = make(tiny_llama_dir, "int4", "int16", "float16", True, deterministic=False)
    assert llm.engine.runner.row_group() is None
    assert make(tiny_llama_dir, "int4", "int16", "float16", True).engine.runner.row_group() == 128
    assert make(tiny_llama_dir, "float32", "float32", "float32", False).engine.runner.row_group() == 1


# ---- the default model: the reported case, in-process and through the server with the official openai client

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def default_llm(real_model_path):
    return LLM(model=str(real_model_path), max_model_len=1024)


def test_default_model_cold_and_warm_chat_agree(default_llm):
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3)
    cold = default_llm.chat(HELLO, params)[0]
    warm = default_llm.chat(HELLO, params)[0]
    assert cold.metrics.cached_prompt_tokens == 0 and warm.metrics.cached_prompt_tokens == 32
    assert answer(warm) == answer(cold)
    streamed = list(default_llm.stream_outputs(default_llm.tokenizer.encode_chat(HELLO), params))[-1]
    assert answer(streamed) == answer(cold)


# int8 on the default model is left to the tiny models above: its load calibrates outlier columns (a minute here).
@pytest.mark.parametrize("kw", [dict(kv_cache_dtype="float32"), dict(activations="float32")],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_default_model_prompt_chunks_do_not_matter(real_model_path, kw):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
    text = "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France"
    whole = LLM(model=str(real_model_path), max_model_len=256, **kw)
    cold = answer(whole.generate(text, params)[0])
    assert answer(whole.generate(text, params)[0]) == cold  # its first 16 tokens from the prefix cache
    chunked = LLM(model=str(real_model_path), max_model_len=256, max_num_batched_tokens=5, **kw)
    assert answer(chunked.generate(text, params)[0]) == cold


def test_server_answers_alike_cold_warm_streamed(default_llm):
    openai = pytest.importorskip("openai")
    from jisu.server.app import create_app
    from jisu.server.serve import ServerThread

    default_llm.engine.blocks.reset_prefix_cache()
    with ServerThread(create_app(default_llm.engine, model_name="default")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = dict(model="default", messages=HELLO, max_tokens=16, temperature=0)
        cold = client.chat.completions.create(**ask)
        warm = client.chat.completions.create(**ask)
        chunks = client.chat.completions.create(**ask, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert cold.choices[0].message.content == warm.choices[0].message.content == streamed
    assert cold.choices[0].message.content.startswith("Hello")
