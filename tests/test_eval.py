"""jisu eval: perplexity (llama.cpp method) against transformers, KL / top-1 and greedy agreement, and
the chunking and input checks around them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import corpus, make_tiny_hf_model

from jisu.errors import InvalidRequestError, JisuError
from jisu.eval import (
    greedy_agreement,
    kl_divergence,
    make_chunks,
    open_llm,
    perplexity_of,
    score_batch,
)
from jisu.eval.cli import main as eval_main
from jisu.eval.greedy import common_prefix, load_prompts
from jisu.eval.perplexity import perplexity, ppl_and_stderr

CTX = 64
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="module")
def text() -> str:
    return "\n".join(corpus(300, seed=3))


@pytest.fixture(scope="module")
def f32(tiny_llama_dir):
    return open_llm(str(tiny_llama_dir), "float32", 128)


def _reference_ppl(model, chunks: list[list[int]]) -> float:
    """llama-perplexity's scoring written out directly on transformers' logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
            # The second half of the tokens, each from the logits one position before it.
            for j in range(len(chunk) // 2, len(chunk)):
                total -= torch.log_softmax(logits[j - 1], -1)[chunk[j]].item()
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_transformers(tiny_llama_dir, f32, text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokens = hf_tok(text, add_special_tokens=False)["input_ids"]
    chunks = [tokens[i * CTX : (i + 1) * CTX] for i in range(5)]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    expected = _reference_ppl(model, chunks)

    r = perplexity(f32.engine, text, ctx=CTX, chunks=5)
    assert perplexity_of is perplexity
    assert r.chunks == 5 and r.tokens_scored == 5 * CTX // 2
    assert r.ppl == pytest.approx(expected, rel=1e-4)
    assert r.running_ppl[-1] == pytest.approx(r.ppl)
    assert 0 < r.stderr < r.ppl


def test_scoring_leaves_every_block_free(f32, text):
    blocks = f32.engine.blocks
    perplexity(f32.engine, text, ctx=CTX, chunks=3)
    assert blocks.num_free_blocks == blocks.num_blocks and not blocks.block_tables
    # More than the cache holds at once: a clear error, and nothing stays allocated.
    with pytest.raises(JisuError, match="free blocks"):
        score_batch(f32.engine, [list(range(1, 121)), list(range(1, 121))])
    assert blocks.num_free_blocks == blocks.num_blocks and not blocks.block_tables


def test_batched_scoring_equals_one_at_a_time(tiny_llama_dir, f32):
    llm = open_llm(str(tiny_llama_dir), "float32", 64, num_seqs=3)
    seqs = [list(range(5, 45)), [7], list(range(100, 130))]
    together = score_batch(llm.engine, seqs)
    for seq, logits in zip(seqs, together):
        (alone,) = score_batch(f32.engine, [seq])
        assert logits.shape == (len(seq), llm.engine.model_config.vocab_size)
        torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-5)


def test_chunk_arithmetic():
    tokens = list(range(10 * CTX + 5))
    plan = make_chunks(tokens, CTX)
    assert plan.available == 10 and len(plan.chunks) == 10 and plan.note is None
    assert plan.chunks[3] == tokens[3 * CTX : 4 * CTX]
    plan = make_chunks(tokens, CTX, chunks=25)
    assert len(plan.chunks) == 10 and "asked for 25 chunks" in plan.note and "using 10" in plan.note
    with pytest.raises(InvalidRequestError, match="fewer than one chunk"):
        make_chunks(tokens[: CTX - 1], CTX)
    for bad in ({"ctx": 2}, {"ctx": CTX, "chunks": 0}):
        with pytest.raises(InvalidRequestError, match="--c"):
            make_chunks(tokens, **bad)


def test_perplexity_on_short_text_and_too_many_chunks(tiny_llama_dir, f32, text):
    with pytest.raises(InvalidRequestError, match="fewer than one chunk"):
        perplexity(f32.engine, "the quick brown fox", ctx=CTX)
    with pytest.raises(InvalidRequestError, match="context window"):
        perplexity(f32.engine, text, ctx=4096)
    with pytest.raises(InvalidRequestError, match="256 positions"):
        # An engine window wider than the model's 256 positions is refused before any chunk runs.
        perplexity(open_llm(str(tiny_llama_dir), "float32", 512).engine, text, ctx=512)
    r = perplexity(f32.engine, text[:3000], ctx=CTX, chunks=1000)
    assert r.chunks == r.chunks_available < 1000 and "using" in r.note


def test_stderr_formula():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ppl, err = ppl_and_stderr(nll)
    assert ppl == pytest.approx(math.exp(2.5))
    assert err == pytest.approx(math.exp(2.5) * math.sqrt(1.25 / 3))


def test_kl_against_itself_is_zero(tiny_llama_dir, f32, text):
    other = open_llm(str(tiny_llama_dir), "float32", 128)
    r = kl_divergence(other.engine, f32.engine, text, ctx=CTX, chunks=3)
    assert r.kl_mean == 0 and r.kl_max == 0 and r.top1_agreement == 1.0
    assert r.ppl == r.reference_ppl and r.tokens_scored == 3 * CTX // 2


def test_kl_bfloat16_vs_float32_small_positive(tiny_llama_dir, f32, text):
    bf16 = open_llm(str(tiny_llama_dir), "bfloat16", 128)
    r = kl_divergence(bf16.engine, f32.engine, text, ctx=CTX, chunks=3)
    assert 0 < r.kl_median <= r.kl_p99 <= r.kl_max
    assert 1e-8 < r.kl_mean < 1e-4  # bfloat16 rounding of a float32 model: tiny but not zero
    assert 0.5 < r.top1_agreement <= 1.0
    assert r.ppl == pytest.approx(r.reference_ppl, rel=0.02)


def test_greedy_agreement(tiny_llama_dir, tmp_path):
    a = open_llm(str(tiny_llama_dir), "float32", 96, num_seqs=4)
    b = open_llm(str(tiny_llama_dir), "float32", 96, num_seqs=4)
    prompts = ["the quick brown", "hello world", "def f(x):", "memory batch queue"]
    same = greedy_agreement(a, b, prompts, max_tokens=16)
    assert same.prefix_agreement == 1.0 and same.full_match_rate == 1.0 and same.prompts == 4
    # A model with other weights writes other text: agreement must drop.
    other_dir = make_tiny_hf_model(tmp_path / "other", arch="llama", num_kv_heads=2, seed=7)
    c = open_llm(str(other_dir), "float32", 96, num_seqs=4)
    diff = greedy_agreement(c, a, prompts, max_tokens=16)
    assert diff.prefix_agreement < 1.0 and diff.full_match_rate < 1.0
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2


def test_prompt_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "one"}\n\n"two"\n')
    assert load_prompts(p) == ["one", "two"]
    p.write_text('{"text": "one"}\n')
    with pytest.raises(InvalidRequestError, match="p.jsonl:1"):
        load_prompts(p)
    assert len(load_prompts(None)) >= 4


def test_bad_weights_name(tiny_llama_dir):
    with pytest.raises(InvalidRequestError, match="int3.*allowed: auto, float32, float16, bfloat16, int8"):
        open_llm(str(tiny_llama_dir), "int3", 128)


def test_cli_perplexity_json(tiny_llama_dir, text, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(text[:4000])
    rc = eval_main(["eval", "perplexity", str(f), "--model", str(tiny_llama_dir), "--ctx", str(CTX),
                    "--chunks", "999", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    out = json.loads(captured.out)
    assert out["chunks"] == out["chunks_available"] and out["ppl"] > 1
    assert "asked for 999 chunks" in captured.err
    rc = eval_main(["eval", "kl", str(f), "--model", str(tiny_llama_dir), "--weights", "int9"])
    assert rc == 1 and "int9" in capsys.readouterr().err


def test_cli_kl_against_another_model(tiny_llama_dir, text, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(text[:4000])
    base = ["eval", "kl", str(f), "--model", str(tiny_llama_dir), "--weights", "float32", "--ctx", str(CTX), "--json"]
    assert eval_main(base) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1
    other = make_tiny_hf_model(tmp_path / "other", arch="llama", num_kv_heads=2, seed=7)
    assert eval_main(base + ["--reference-model", str(other)]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["kl_mean"] > 0.01 and diff["ppl"] == same["ppl"] and diff["reference_ppl"] != same["reference_ppl"]


@pytest.mark.real_model
def test_real_model_perplexity_matches_transformers(real_model_path):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is missing")
    from transformers import AutoModelForCausalLM

    text = WIKITEXT.read_text(encoding="utf-8")
    llm = open_llm(str(real_model_path), "float32", 512)
    r = perplexity(llm.engine, text, ctx=512, chunks=4)
    tokens = llm.tokenizer.encode(text, add_special_tokens=False)
    chunks = [tokens[i * 512 : (i + 1) * 512] for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(
        real_model_path.parent, gguf_file=real_model_path.name, dtype=torch.float32
    ).eval()
    expected = _reference_ppl(model, chunks)
    assert r.ppl == pytest.approx(expected, rel=1e-3)
