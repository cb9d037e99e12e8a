"""--kv-cache-dtype: K/V stored narrower than the compute dtype (float16 by default in llama.cpp)."""

from __future__ import annotations

import json

import pytest
import torch

from jisu import LLM, SamplingParams
from jisu.errors import InvalidRequestError
from jisu.eval.scoring import score_batch
from jisu.runner.kv_cache import kv_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [[int(t) for t in torch.randint(3, 300, (n,), generator=g)] for n in (7, 40, 23)]


@pytest.fixture(scope="module")
def kv16(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), kv_cache_dtype="float16", max_model_len=128, max_num_seqs=4)


def test_cache_holds_float16_in_half_the_bytes(kv16, tiny_llm):
    k, v = kv16.engine.kv_cache.layers[0]
    assert k.dtype == v.dtype == torch.float16 and kv16.engine.dtype == torch.float32
    config = kv16.engine.model_config
    assert kv_bytes_per_token(config, kv16.engine.kv_dtype) * 2 == kv_bytes_per_token(config, torch.float32)


def test_logits_stay_close_to_a_float32_cache(kv16, tiny_llm):
    ids = list(range(5, 69))
    a, b = score_batch(kv16.engine, [ids])[0], score_batch(tiny_llm.engine, [ids])[0]
    # Only K/V are rounded, to 11 significant bits: far below any change in the argmax here.
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * b.abs().max().item())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_chunking_and_batching_do_not_change_the_output(kv16, tiny_llama_dir):
    # A fresh prompt chunk attends the rounded K/V too, so a prompt gets the same numbers however it is cut.
    ps = _prompts()
    expected = [o.outputs[0].token_ids for o in (kv16.generate([p], GREEDY)[0] for p in ps)]
    assert [o.outputs[0].token_ids for o in kv16.generate(ps, GREEDY)] == expected
    chunked = LLM(model=str(tiny_llama_dir), kv_cache_dtype="float16", max_model_len=128, max_num_batched_tokens=5)
    assert [o.outputs[0].token_ids for o in chunked.generate(ps, GREEDY)] == expected


def test_bfloat16_cache_runs_the_eager_layers(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), kv_cache_dtype="bfloat16", max_model_len=128)
    assert llm.engine.kv_cache.layers[0][0].dtype == torch.bfloat16
    out = llm.generate(_prompts()[:1], GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 10


def test_unknown_kv_cache_dtype_is_refused(tiny_llama_dir):
    with pytest.raises(InvalidRequestError, match="kv cache dtype must be one of auto, float32, float16, bfloat16, "
                                                  "got 'fp8'"):
        LLM(model=str(tiny_llama_dir), kv_cache_dtype="fp8")


def test_default_model_keeps_its_greedy_text_with_a_float16_cache(real_model_path):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompt = "Explain in two sentences why the sky is blue."
    runs = [LLM(model=str(real_model_path), kv_cache_dtype=kv, max_model_len=256, max_num_seqs=1) for kv in
            ("auto", "float16")]
    texts = [llm.generate([prompt], params)[0].outputs[0].token_ids for llm in runs]
    assert runs[1].engine.model.fused_decode is not None  # the fused C++ step reads the float16 cache
    assert texts[0] == texts[1]


def test_estimate_counts_the_narrower_cache_as_the_engine_allocates_it(kv16, tiny_llama_dir):
    from jisu.profile.estimate import estimate

    e = estimate(str(tiny_llama_dir), 64 << 20, "float32", 128, kv_cache_dtype="float16")
    k, v = kv16.engine.kv_cache.layers[0]
    assert e.kv_bytes_per_token == kv_bytes_per_token(kv16.engine.model_config, torch.float16)
    assert e.kv_bytes_per_token * kv16.engine.kv_cache.block_size * kv16.engine.kv_cache.num_blocks == (
        len(kv16.engine.kv_cache.layers) * (k.nbytes + v.nbytes)
    )


def test_bench_compare_takes_a_kv_cache_dtype_per_jisu_engine():
    from jisu.bench.compare import parse_engines

    assert parse_engines("jisu,jisu:auto:float16,jisu:float32") == ["jisu", "jisu:auto:float16", "jisu:float32"]
    with pytest.raises(InvalidRequestError, match="kv cache dtype must be one of"):
        parse_engines("jisu:auto:fp8")
    with pytest.raises(InvalidRequestError, match="unknown weight format"):
        parse_engines("jisu:int3:float16")


def test_cli_takes_the_option_and_refuses_unknown_ones(tiny_llama_gguf):
    from test_cli import assert_clean_error, jisu

    common = ["generate", "hello world", "--model", str(tiny_llama_gguf), "--json", "--temperature", "0",
              "--max-tokens", "5", "--ignore-eos"]
    plain, kv16 = jisu(*common), jisu(*common, "--kv-cache-dtype", "float16")
    assert kv16.returncode == 0, kv16.stderr
    assert json.loads(kv16.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert_clean_error(jisu(*common, "--kv-cache-dtype", "fp8"), "--kv-cache-dtype", "float16")


def test_profile_counts_the_cache_bytes_it_reads(kv16, tiny_llm):
    from jisu.profile.run import _cost

    costs = []
    for llm in (kv16, tiny_llm):
        llm.generate(_prompts()[:1], GREEDY)
        step = list(llm.engine.step_log.records)[-1]  # a decode step
        costs.append(_cost(llm.engine, step).bytes)
    assert costs[0].kv_read * 2 == costs[1].kv_read > 0
    assert costs[0].weights_total == costs[1].weights_total
