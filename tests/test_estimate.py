"""Memory estimates from metadata alone, checked against what jisu allocates when it loads the model."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from jisu import LLM
from jisu.errors import InvalidRequestError, ModelLoadError
from jisu.models.layers import weight_bytes_held
from jisu.profile.estimate import estimate, estimate_table, parse_size
from jisu.profile.roofline import parameter_count
from jisu.runner.kv_cache import kv_bytes_per_token


def _allocated(llm: LLM) -> tuple[int, int]:
    """(bytes of distinct weight storage, bytes of buffers) of a loaded model."""
    model = llm.engine.model
    return weight_bytes_held(model), sum(b.numel() * b.element_size() for b in model.buffers())


def _has_kernel(llm: LLM) -> bool:
    return llm.engine.model.lm_head.kernel_weight is not None


def _check_against(e, llm: LLM) -> None:
    weights, buffers = _allocated(llm)
    k, v = llm.engine.kv_cache.layers[0]
    assert e.kv_allocated_bytes == len(llm.engine.kv_cache.layers) * (k.nbytes + v.nbytes)
    assert e.weights_loaded_bytes == weights
    assert e.other_buffers_bytes == buffers
    assert e.kv_bytes_per_token == kv_bytes_per_token(llm.engine.model_config, llm.engine.kv_dtype)
    assert e.parameters == parameter_count(llm.engine.model_config)


def test_tiny_hf_folder_matches_what_jisu_allocates(tiny_llm, tiny_llama_dir):
    e = estimate(str(tiny_llama_dir), None, "float32", tiny_llm.engine.max_model_len, cpu_kernels=_has_kernel(tiny_llm))
    _check_against(e, tiny_llm)
    # float32 safetensors: stored and loaded are the same bytes.
    assert e.format == "safetensors" and e.weights_stored_bytes == e.weights_loaded_bytes


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_tied_output_layer_copy_is_counted_only_when_jisu_makes_one(tmp_path, cpu_kernels):
    from tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(tmp_path / "tied", tie=True)
    llm = LLM(model=str(folder), cpu_kernels=cpu_kernels, max_model_len=64)
    e = estimate(str(folder), None, "auto", 64, cpu_kernels=_has_kernel(llm))
    _check_against(e, llm)
    cfg = llm.engine.model_config
    copy = cfg.vocab_size * cfg.hidden_size * 4
    assert e.weights_loaded_bytes == 4 * parameter_count(cfg) + (0 if _has_kernel(llm) else copy)


def test_kv_blocks_match_the_engine_for_a_budget(tiny_llama_dir):
    kv_budget = 300_000
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory_bytes=kv_budget, max_model_len=128)
    weights, buffers = _allocated(llm)
    e = estimate(str(tiny_llama_dir), weights + buffers + kv_budget, "float32", 128, cpu_kernels=_has_kernel(llm))
    assert e.kv_budget_bytes == kv_budget
    assert e.kv_blocks == llm.engine.kv_cache.num_blocks
    assert e.concurrent_tokens == llm.engine.kv_cache.num_slots
    assert e.full_length_sequences == e.kv_blocks // math.ceil(128 / 16)


def test_context_is_capped_at_the_kv_capacity_as_the_engine_does(tiny_llama_dir):
    # 8 blocks of 16 tokens: less than the tiny model's 256-position window, so the engine runs 128 tokens.
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory_bytes=8 * 16 * 512)
    assert llm.engine.max_model_len == 128
    weights, buffers = _allocated(llm)
    e = estimate(str(tiny_llama_dir), weights + buffers + 8 * 16 * 512, "float32", None, cpu_kernels=_has_kernel(llm))
    assert (e.max_model_len, e.kv_blocks, e.other_buffers_bytes) == (128, 8, buffers)
    assert e.full_length_sequences == 1


def test_gguf_reads_metadata_only(tiny_llama_gguf, tiny_llama_dir, monkeypatch):
    import jisu.loader.gguf as gguf_loader
    import jisu.loader.hf_folder as hf_loader

    def refuse(*a, **k):
        raise AssertionError("the estimate read tensor data")

    monkeypatch.setattr(gguf_loader, "dequantize", refuse)
    monkeypatch.setattr(gguf_loader, "load_gguf", refuse)
    monkeypatch.setattr(hf_loader, "_load_safetensors", refuse)
    monkeypatch.setattr(hf_loader, "safe_open", refuse)
    g = estimate(str(tiny_llama_gguf), None, "float32", 128)
    h = estimate(str(tiny_llama_dir), None, "float32", 128)
    assert g.format == "gguf" and g.tensor_types == ("F32",)
    assert g.weights_stored_bytes == 4 * g.parameters
    assert (g.weights_loaded_bytes, g.kv_bytes_per_token, g.parameters) == (
        h.weights_loaded_bytes, h.kv_bytes_per_token, h.parameters)
    assert g.file_bytes > g.weights_stored_bytes  # the header and vocabulary come on top


def test_budget_smaller_than_the_weights_fits_nothing(tiny_llama_dir):
    e = estimate(str(tiny_llama_dir), 1000, "float32", 128)
    assert (e.kv_budget_bytes, e.kv_blocks, e.concurrent_tokens, e.full_length_sequences) == (0, 0, 0, 0)
    assert any("does not cover the weights" in n for n in e.notes)


def test_half_precision_halves_weights_and_kv(tiny_llama_dir):
    f32 = estimate(str(tiny_llama_dir), None, "float32", 128)
    bf16 = estimate(str(tiny_llama_dir), None, "bfloat16", 128)
    assert bf16.kv_bytes_per_token * 2 == f32.kv_bytes_per_token
    assert bf16.weights_loaded_bytes * 2 == f32.weights_loaded_bytes


def test_bad_inputs_give_clear_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        estimate(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(ModelLoadError, match="holds no model"):
        estimate(str(tmp_path))
    with pytest.raises(InvalidRequestError, match="dtype"):
        estimate(str(tiny_llama_dir), dtype="float8")
    with pytest.raises(InvalidRequestError, match="memory_budget_bytes"):
        estimate(str(tiny_llama_dir), memory_budget_bytes=-5)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        estimate(str(tiny_llama_dir), max_model_len=0)


def test_sizes_parse():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("2.5 GB") == 2_500_000_000
    assert parse_size("1073741824") == 1 << 30
    for bad in ("lots", "-1G", "5 parsecs"):
        with pytest.raises(InvalidRequestError, match="size"):
            parse_size(bad)


def test_json_and_table_output(tiny_llama_dir):
    e = estimate(str(tiny_llama_dir), None, "float32", 128)
    d = json.loads(json.dumps(e.to_dict()))
    assert d["kv_bytes_per_token"] == e.kv_bytes_per_token and d["concurrent_tokens"] == e.concurrent_tokens
    console = Console(record=True, width=120)
    console.print(estimate_table(e))
    text = console.export_text()
    assert "KV cache per token" in text and f"{e.concurrent_tokens:,}" in text


def test_cmd_estimate_prints_json(tiny_llama_dir, capsys):
    from argparse import Namespace

    from jisu.profile.estimate import cmd_estimate

    args = Namespace(model=str(tiny_llama_dir), memory_budget="64MiB", dtype="float32", max_model_len=128,
                     device="cpu", json=True)
    assert cmd_estimate(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_budget_bytes"] == 64 << 20 and out["max_model_len"] == 128


def test_cmd_calibrate_quick_writes_the_cache(tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    from jisu.profile.calibrate import cmd_calibrate

    monkeypatch.setenv("JISU_CACHE_DIR", str(tmp_path))
    assert cmd_calibrate(Namespace(force=False, quick=True, device="cpu", json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quick"] and out["path"].startswith(str(tmp_path))
    with open(out["path"]) as f:
        assert json.load(f)["fingerprint"] == out["fingerprint"]


@pytest.mark.real_model
def test_default_model_matches_what_jisu_allocates(real_llm, real_model_path):
    e = estimate(str(real_model_path), None, "auto", real_llm.engine.max_model_len, cpu_kernels=_has_kernel(real_llm))
    _check_against(e, real_llm)
    # SmolLM2-135M Q4_1, whose low-bit blocks get a float16 cache: 30 layers x 3 KV heads x 64 dims x K,V x 2 bytes.
    assert e.kv_bytes_per_token == 23040 and e.kv_dtype == "float16" == str(real_llm.engine.kv_dtype)[6:]
    assert e.weights_stored_bytes == 96_576_768
    # weights=auto keeps the Q4_1 / Q8_0 blocks: loaded as stored, not 538 MB of float32
    assert e.dtype == "float32" and e.weights_loaded_bytes == e.weights_stored_bytes


def test_on_cuda_only_4_bit_blocks_stay_and_8_bit_load_as_bfloat16(real_model_path):
    # torch's int4 kernel holds Q4_1 in as many bytes; Q8_0 (the tied embedding / output layer) has no CUDA kernel.
    e = estimate(str(real_model_path), 4 << 30, "auto", 512, device="cuda")
    cpu = estimate(str(real_model_path), 4 << 30, "auto", 512)
    assert e.dtype == "bfloat16"
    embedding = 49152 * 576
    q8_0 = embedding // 32 * 34
    # CPU keeps every block; CUDA trades the Q8_0 blocks for bfloat16 and halves the float32 norms.
    norms = (30 * 2 + 1) * 576
    assert e.weights_loaded_bytes == cpu.weights_loaded_bytes - q8_0 + embedding * 2 - norms * 2
    assert any("(Q4_1) stay in their blocks" in n for n in e.notes)
