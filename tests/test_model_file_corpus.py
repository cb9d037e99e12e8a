"""A corpus of corrupt model files, made here from tiny valid ones: each must end in a clear jisu error that
names what is wrong, with no traceback, quickly and without a large allocation.

GGUF files are damaged by rewriting them with gguf.GGUFWriter (metadata values) or by patching bytes at
offsets gguf.GGUFReader reports for the valid file (counts, lengths, types, offsets, truncation), so the
corpus does not depend on jisu's own parser to find the structure it breaks. Hugging Face folders are
damaged through config.json, the safetensors index and hand-written safetensors headers.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_hf_model, write_gguf_from_hf

from jisu.errors import JisuError, ModelConfigError, ModelLoadError, UnsupportedModelError
from jisu.loader.resolve import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
V = GGUFValueType


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf_dir, gguf_path): the same tiny 2-layer llama as a Hugging Face folder and as an F32 GGUF."""
    root = tmp_path_factory.mktemp("corpus")
    hf = make_tiny_hf_model(root / "hf", arch="llama", num_kv_heads=2)
    return hf, write_gguf_from_hf(hf, root / "tiny.gguf")


def load_error(path, within_s: float = 10.0) -> JisuError:
    start = time.monotonic()
    with pytest.raises(JisuError) as e:
        load_checkpoint(path)
    assert time.monotonic() - start < within_s
    return e.value


# ----------------------------------------------------------------------------- GGUF helpers


def rewrite_gguf(src: Path, dst: Path, set_kv: dict | None = None, drop_kv=(), drop_tensors=(), add_tensors=None):
    """Copy a GGUF through GGUFWriter with metadata keys set ((value, type) pairs) or dropped, tensors dropped
    or added."""
    r = GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    set_kv = set_kv or {}
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_kv or name in set_kv:
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[-1] if f.types[0] == V.ARRAY else None)
    for name, (value, vtype, *sub) in set_kv.items():
        w.add_key_value(name, value, vtype, sub[0] if sub else None)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.array(t.data))
    for name, a in (add_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def part_offset(field, i: int) -> int:
    """File offset of part i of a GGUFReader field (parts lie back to back from field.offset)."""
    return field.offset + sum(int(p.nbytes) for p in field.parts[:i])


def patched(src: Path, dst: Path, *edits: tuple[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for at, raw in edits:
        data[at : at + len(raw)] = raw
    dst.write_bytes(bytes(data))
    return dst


def tensor_field(reader: GGUFReader, name: str):
    return next(t.field for t in reader.tensors if t.name == name)


# ----------------------------------------------------------------------------- GGUF: truncation


def _boundaries(path: Path) -> dict[str, int]:
    """A cut inside or right after each structural piece of the valid file, from GGUFReader's offsets."""
    r = GGUFReader(path)
    kv = r.fields["llama.block_count"]  # a scalar key
    arr = r.fields["tokenizer.ggml.tokens"]  # a string array
    t0, t1 = r.tensors[0], r.tensors[1]
    infos_end = part_offset(r.tensors[-1].field, len(r.tensors[-1].field.parts))
    return {
        "magic": 2,
        "version": 6,
        "tensor_count": 12,
        "kv_count": 20,
        "kv_key_length": kv.offset + 4,
        "kv_key": part_offset(kv, 1) + 3,
        "kv_type": part_offset(kv, 2) + 2,
        "kv_value": part_offset(kv, 3) + 2,
        "array_item_type": part_offset(arr, 3) + 2,
        "array_count": part_offset(arr, 4) + 4,
        "array_items": part_offset(arr, 4 + 2 * 100),  # in the middle of the token strings
        "tensor_name": part_offset(t1.field, 1) + 2,
        "tensor_dims": part_offset(t1.field, 3) + 4,
        "tensor_type": part_offset(t1.field, 4) + 2,
        "tensor_offset": part_offset(t1.field, 5) + 4,
        "alignment_padding": infos_end + max(0, (r.data_offset - infos_end) // 2),
        "first_tensor_data": t0.data_offset + 8,
        "last_byte": path.stat().st_size - 1,
    }


BOUNDARIES = [
    "magic", "version", "tensor_count", "kv_count", "kv_key_length", "kv_key", "kv_type", "kv_value",
    "array_item_type", "array_count", "array_items", "tensor_name", "tensor_dims", "tensor_type",
    "tensor_offset", "alignment_padding", "first_tensor_data", "last_byte",
]  # fmt: skip


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gguf_truncated_at_each_boundary(base, tmp_path, boundary):
    _, src = base
    cut = _boundaries(src)[boundary]
    path = tmp_path / "cut.gguf"
    path.write_bytes(src.read_bytes()[:cut])
    err = load_error(path)
    assert isinstance(err, ModelLoadError), err
    assert str(path) in str(err) and "truncated" in str(err), str(err)


def test_gguf_rewrite_helper_keeps_a_valid_file(base, tmp_path):
    """The corpus below is only meaningful if an unchanged rewrite still loads."""
    _, src = base
    copy = rewrite_gguf(src, tmp_path / "copy.gguf")
    assert load_checkpoint(copy).config == load_checkpoint(src).config


# ----------------------------------------------------------------------------- GGUF: counts, lengths, types


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _structural(src: Path) -> dict[str, tuple[list[tuple[int, bytes]], str]]:
    """name -> (byte edits, fragment the error must contain)."""
    r = GGUFReader(src)
    arch_kv = r.fields["general.architecture"]
    tokens = r.fields["tokenizer.ggml.tokens"]
    eos = r.fields["tokenizer.ggml.eos_token_id"]
    q = tensor_field(r, "blk.0.attn_q.weight")
    k = tensor_field(r, "blk.0.attn_k.weight")
    last = r.tensors[-1].field
    first_data = r.tensors[0].field
    return {
        "tensor_count_huge": ([(8, _u64(1 << 40))], "1099511627776 tensors"),
        "tensor_count_past_file": ([(8, _u64(100_000))], "100000 tensors"),
        "kv_count_huge": ([(16, _u64(1 << 62))], "metadata keys"),
        "key_length_huge": ([(arch_kv.offset, _u64(1 << 60))], "the name of metadata key #0"),
        "string_value_length_huge": ([(part_offset(arch_kv, 3), _u64(1 << 50))], "general.architecture"),
        "array_count_huge": ([(part_offset(tokens, 4), _u64(1 << 40))], "tokenizer.ggml.tokens"),
        "array_count_past_file": ([(part_offset(tokens, 4), _u64(3_000_000))], "tokenizer.ggml.tokens"),
        "array_of_arrays": ([(part_offset(tokens, 3), _u32(int(V.ARRAY)))], "array of arrays"),
        "unknown_value_type": ([(part_offset(eos, 2), _u32(99))], "unknown value type 99"),
        "unknown_array_item_type": ([(part_offset(tokens, 3), _u32(77))], "unknown value type 77"),
        "duplicate_key": ([(part_offset(eos, 1) + len("tokenizer.ggml."), b"bos")], "appears twice"),
        "tensor_name_length_huge": ([(q.offset, _u64(1 << 58))], "the name of tensor"),
        "tensor_dims_count_absurd": ([(part_offset(q, 2), _u32(1000))], "1000 dimensions"),
        "tensor_dims_overflow": ([(part_offset(q, 3), _u64(1 << 40) + _u64(1 << 40))], "elements"),
        "tensor_dim_zero": ([(part_offset(q, 3), _u64(0))], "dimensions [0,"),
        "unknown_ggml_type": ([(part_offset(q, 4), _u32(99))], "unknown GGML type 99"),
        "tensor_offset_past_end": ([(part_offset(last, 5), _u64(1 << 40))], "past the end of the file"),
        "tensor_offset_unaligned": ([(part_offset(last, 5), _u64(int(last.parts[5][0]) + 4))], "alignment"),
        "tensors_overlap": ([(part_offset(k, 5), bytes(r.tensors[0].field.parts[5]))], "overlap"),
        "duplicate_tensor_name": ([(part_offset(k, 1) + len("blk.0.attn_"), b"q")], "appears twice"),
        "block_type_row_length": ([(part_offset(first_data, 4), _u32(int(gguf.GGMLQuantizationType.Q4_K)))],
                                  "block"),
    }


STRUCTURAL = [
    "tensor_count_huge", "tensor_count_past_file", "kv_count_huge", "key_length_huge", "string_value_length_huge",
    "array_count_huge", "array_count_past_file", "array_of_arrays", "unknown_value_type", "unknown_array_item_type",
    "duplicate_key", "tensor_name_length_huge", "tensor_dims_count_absurd", "tensor_dims_overflow",
    "tensor_dim_zero", "unknown_ggml_type", "tensor_offset_past_end", "tensor_offset_unaligned", "tensors_overlap",
    "duplicate_tensor_name", "block_type_row_length",
]  # fmt: skip


@pytest.mark.parametrize("case", STRUCTURAL)
def test_gguf_structure(base, tmp_path, case):
    _, src = base
    edits, fragment = _structural(src)[case]
    path = patched(src, tmp_path / f"{case}.gguf", *edits)
    err = load_error(path)
    assert isinstance(err, ModelLoadError), err
    assert str(path) in str(err) and fragment in str(err), str(err)


# ----------------------------------------------------------------------------- GGUF: metadata values


GGUF_VALUES = {
    "block_count_1e9": ({"llama.block_count": (1_000_000_000, V.UINT32)}, "llama.block_count is 1000000000"),
    "block_count_more_than_layers": ({"llama.block_count": (3, V.UINT32)}, "llama.block_count is 3, but the tensors"),
    "head_count_zero": ({"llama.attention.head_count": (0, V.UINT32)}, "llama.attention.head_count is 0"),
    "head_count_kv_not_a_divisor": ({"llama.attention.head_count_kv": (3, V.UINT32)},
                                    "llama.attention.head_count_kv is 3"),
    "embedding_length_string": ({"llama.embedding_length": ("64", V.STRING)}, "llama.embedding_length is '64'"),
    "embedding_length_negative": ({"llama.embedding_length": (-64, V.INT32)}, "llama.embedding_length is -64"),
    "feed_forward_mismatch": ({"llama.feed_forward_length": (100, V.UINT32)}, "llama.feed_forward_length is 100"),
    "context_length_absurd": ({"llama.context_length": (1 << 40, V.UINT64)}, "llama.context_length"),
    "freq_base_negative": ({"llama.rope.freq_base": (-1.0, V.FLOAT32)}, "llama.rope.freq_base is -1.0"),
    "rope_factor_string": ({"llama.rope.scaling.type": ("linear", V.STRING),
                            "llama.rope.scaling.factor": ("x", V.STRING)}, "llama.rope.scaling.factor is 'x'"),
    "rope_factor_zero": ({"llama.rope.scaling.type": ("yarn", V.STRING),
                          "llama.rope.scaling.factor": (0.0, V.FLOAT32)}, "llama.rope.scaling.factor is 0.0"),
    "norm_eps_nan": ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)},
                     "llama.attention.layer_norm_rms_epsilon is nan"),
    "head_size_odd": ({"llama.attention.key_length": (15, V.UINT32), "llama.rope.dimension_count": (15, V.UINT32)},
                      "llama.attention.key_length is 15"),
    "alignment_not_power_of_two": ({"general.alignment": (48, V.UINT32)}, "general.alignment is 48"),
    "alignment_wrong_type": ({"general.alignment": ("32", V.STRING)}, "general.alignment has value type STRING"),
}


@pytest.mark.parametrize("case", list(GGUF_VALUES))
def test_gguf_metadata_values(base, tmp_path, case):
    _, src = base
    set_kv, fragment = GGUF_VALUES[case]
    path = rewrite_gguf(src, tmp_path / f"{case}.gguf", set_kv=set_kv)
    err = load_error(path)
    assert isinstance(err, ModelLoadError), err
    assert str(path) in str(err) and fragment in str(err), str(err)


def test_gguf_vocabulary_shorter_than_embedding(base, tmp_path):
    _, src = base
    r = GGUFReader(src)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()[:-1]
    types = r.fields["tokenizer.ggml.token_type"].contents()[:-1]
    path = rewrite_gguf(src, tmp_path / "vocab.gguf", set_kv={
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING), "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32)})
    err = load_error(path)
    assert isinstance(err, ModelConfigError), err
    assert f"tokenizer.ggml.tokens (its length) is {len(tokens)}, but token_embd.weight has {len(tokens) + 1} rows" \
        in str(err)


def test_gguf_missing_and_unknown_tensors(base, tmp_path):
    _, src = base
    missing = rewrite_gguf(src, tmp_path / "missing.gguf", drop_tensors={"blk.1.ffn_up.weight"})
    err = load_error(missing)
    assert isinstance(err, ModelLoadError) and "missing tensors model.layers.1.mlp.up_proj.weight" in str(err)
    extra = rewrite_gguf(src, tmp_path / "extra.gguf", add_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    err = load_error(extra)
    assert isinstance(err, UnsupportedModelError) and "blk.0.mystery.weight" in str(err)
    far = rewrite_gguf(src, tmp_path / "far.gguf", add_tensors={"blk.999999.attn_norm.weight": np.zeros(64, np.float32)})
    err = load_error(far)
    assert isinstance(err, ModelConfigError) and "llama.block_count is 2, but the tensors hold layers 0 to 999999" \
        in str(err)


def test_gguf_required_metadata_missing(base, tmp_path):
    _, src = base
    path = rewrite_gguf(src, tmp_path / "nohead.gguf", drop_kv={"llama.attention.head_count"})
    err = load_error(path)
    assert isinstance(err, ModelConfigError) and "lacks llama.attention.head_count" in str(err)


# ----------------------------------------------------------------------------- Hugging Face folders


@pytest.fixture
def folder(base, tmp_path):
    """A private copy of the tiny folder that a test may damage."""
    return shutil.copytree(base[0], tmp_path / "model")


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
            cfg.get("rope_parameters", {}).pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


_DROP = object()

HF_VALUES = {
    "layers_1e9": (dict(num_hidden_layers=1e9), "num_hidden_layers is 1000000000.0; allowed: an integer from 1 to 1024"),
    "layers_more_than_tensors": (dict(num_hidden_layers=3), "num_hidden_layers is 3, but the tensors hold layers 0 to 1"),
    "heads_zero": (dict(num_attention_heads=0), "num_attention_heads is 0; allowed"),
    "heads_huge": (dict(num_attention_heads=1 << 20), "num_attention_heads is 1048576; allowed"),
    "kv_heads_not_a_divisor": (dict(num_key_value_heads=3), "num_key_value_heads is 3; allowed: a divisor"),
    "hidden_not_divisible": (dict(hidden_size=66, head_dim=_DROP), "hidden_size is 66; allowed: a multiple of num_attention_heads"),
    "hidden_negative": (dict(hidden_size=-64), "hidden_size is -64"),
    "hidden_string": (dict(hidden_size="64"), "hidden_size is '64' (a string)"),
    "hidden_missing": (dict(hidden_size=_DROP), "hidden_size is missing"),
    "head_dim_odd": (dict(head_dim=15), "head_dim is 15; allowed: an even integer"),
    "vocab_mismatch": (dict(vocab_size=500), "vocab_size is 500, but model.embed_tokens.weight has"),
    "vocab_huge": (dict(vocab_size=10**12), "vocab_size is 1000000000000; allowed: an integer from 1 to 4194304"),
    "intermediate_mismatch": (dict(intermediate_size=100), "intermediate_size is 100, but model.layers.0.mlp.gate_proj"),
    "context_absurd": (dict(max_position_embeddings=10**12), "max_position_embeddings is 1000000000000"),
    "context_bool": (dict(max_position_embeddings=True), "max_position_embeddings is True (a boolean)"),
    "rope_factor_string": (dict(rope_scaling={"rope_type": "linear", "factor": "x"}), "rope_scaling.factor is 'x'"),
    "rope_factor_negative": (dict(rope_scaling={"type": "dynamic", "factor": -2}), "rope_scaling.factor is -2"),
    "rope_scaling_string": (dict(rope_scaling="linear"), "rope_scaling is 'linear' (a string)"),
    "rope_type_number": (dict(rope_scaling={"rope_type": 3, "factor": 2.0}), "rope_scaling.rope_type is 3"),
    "rope_llama3_band": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                            "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
                         "rope_scaling.high_freq_factor is 1.0; allowed: a number above low_freq_factor"),
    "rope_theta_zero": (dict(rope_theta=0, rope_parameters=None), "rope_theta is 0; allowed: a finite number above 1"),
    "rope_parameters_list": (dict(rope_parameters=[1, 2]), "rope_parameters is [1, 2] (a list)"),
    "tie_string": (dict(tie_word_embeddings="no"), "tie_word_embeddings is 'no' (a string)"),
    "architectures_string": (dict(architectures="LlamaForCausalLM"), "architectures is 'LlamaForCausalLM'"),
    "eps_negative": (dict(rms_norm_eps=-1e-5), "rms_norm_eps is -1e-05"),
}


@pytest.mark.parametrize("case", list(HF_VALUES))
def test_hf_config_values(folder, case):
    changes, fragment = HF_VALUES[case]
    _edit_config(folder, **changes)
    err = load_error(folder)
    assert isinstance(err, ModelConfigError), err
    assert str(folder / "config.json") in str(err) and fragment in str(err), str(err)


def test_hf_config_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2, 3]")
    err = load_error(folder)
    assert isinstance(err, ModelLoadError) and "config.json should hold a JSON object" in str(err)


def _sharded(folder: Path, target: str) -> Path:
    """Split the weights in two shards with an index whose second entry names `target`."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(folder / "a.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(folder / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in names[::2]} | {k: target for k in names[1::2]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("target", ["../b.safetensors", "sub/../../b.safetensors", "/tmp/b.safetensors", 5])
def test_index_naming_a_file_outside_the_folder(folder, target):
    _sharded(folder, target)
    shutil.copy(folder / "b.safetensors", folder.parent / "b.safetensors")  # there to be read, were it allowed
    err = load_error(folder)
    assert isinstance(err, ModelLoadError), err
    assert "model.safetensors.index.json" in str(err) and repr(target) in str(err), str(err)


def test_index_naming_a_symlink_out_of_the_folder(folder):
    _sharded(folder, "b.safetensors")
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "b.safetensors").rename(outside)
    (folder / "b.safetensors").symlink_to(outside)
    err = load_error(folder)
    assert isinstance(err, ModelLoadError) and "outside the model folder" in str(err) and str(outside) in str(err)
    # A link that stays inside the folder is fine.
    (folder / "b.safetensors").unlink()
    (folder / "weights").mkdir()
    outside.rename(folder / "weights" / "b.safetensors")
    (folder / "b.safetensors").symlink_to(folder / "weights" / "b.safetensors")
    assert load_checkpoint(folder).config.num_hidden_layers == 2


def test_same_tensor_in_two_shards(folder):
    _sharded(folder, "b.safetensors")
    tensors = load_file(str(folder / "a.safetensors"))
    name = sorted(tensors)[0]
    save_file({**load_file(str(folder / "b.safetensors")), name: tensors[name]}, str(folder / "b.safetensors"))
    err = load_error(folder)
    assert isinstance(err, ModelLoadError) and f"tensor {name} is in both a.safetensors and b.safetensors" in str(err)


# ----------------------------------------------------------------------------- safetensors headers that lie


def _with_header(folder: Path, edit) -> Path:
    """Rewrite model.safetensors with edit(header dict) -> header (dict or raw bytes), keeping the data bytes."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    new = edit(header)
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _set(header: dict, **changes) -> dict:
    header[_first(header)].update(changes)
    return header


SAFETENSORS = {
    "not_json": (lambda h: b"{not json at all", "its header is not valid JSON"),
    "not_an_object": (lambda h: b"[1, 2, 3]", "its header is a JSON list, not an object"),
    "offsets_past_end": (lambda h: _set(h, data_offsets=[h[_first(h)]["data_offsets"][0], 1 << 40]),
                         "needs"),
    "negative_offset": (lambda h: _set(h, data_offsets=[-8, h[_first(h)]["data_offsets"][1]]), "data_offsets [-8,"),
    "shape_mismatch": (lambda h: _set(h, shape=[3, 3]), "shape [3, 3]) needs 36 bytes"),
    "dtype_mismatch": (lambda h: _set(h, dtype="F16"), "(F16, shape"),
    "unknown_dtype": (lambda h: _set(h, dtype="F99"), "unknown dtype 'F99'"),
    "negative_shape": (lambda h: _set(h, shape=[-1, 64]), "shape [-1, 64]; allowed: a list of non-negative"),
    "overflowing_shape": (lambda h: _set(h, shape=[1 << 40, 1 << 40]), "needs"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_safetensors_header_lies(folder, case):
    edit, fragment = SAFETENSORS[case]
    path = _with_header(folder, edit)
    err = load_error(folder)
    assert isinstance(err, ModelLoadError), err
    assert str(path) in str(err) and "truncated or corrupt" in str(err) and fragment in str(err), str(err)


def test_safetensors_overlapping_tensors(folder):
    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        if a["shape"] == b["shape"]:
            b["data_offsets"] = list(a["data_offsets"])
        else:  # same byte length, shifted back onto the one before
            width = b["data_offsets"][1] - b["data_offsets"][0]
            b["data_offsets"] = [a["data_offsets"][1] - 4, a["data_offsets"][1] - 4 + width]
        return h

    path = _with_header(folder, overlap)
    err = load_error(folder)
    assert isinstance(err, ModelLoadError) and str(path) in str(err) and "overlaps" in str(err), str(err)


@pytest.mark.parametrize("length", [1 << 40, 10**6, 7])
def test_safetensors_absurd_header_length(folder, length):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    err = load_error(folder)
    assert isinstance(err, ModelLoadError) and str(path) in str(err), str(err)
    assert "header" in str(err), str(err)


# ----------------------------------------------------------------------------- through the CLI, with limits

_AS_LIMIT = 4 << 30  # a guard for the machine, should a regression try to allocate: address space, not RSS
_PEAK_RSS_LIMIT_KB = 1 << 20  # 1 GiB: importing torch takes about a third of it


# The child reports its own peak RSS (VmHWM) at exit: getrusage's ru_maxrss would also count the pytest process
# it was forked from (several GB late in the suite), as Linux keeps the pre-exec high-water mark.
_CLI_WITH_PEAK = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["JISU_TEST_PEAK_FILE"], "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv = ["jisu"] + sys.argv[1:]
runpy.run_module("jisu.cli", run_name="__main__", alter_sys=True)
"""


def run_cli(model: Path, timeout_s: float = 30.0) -> tuple[int, str, int, float]:
    """`jisu generate` on `model` in a child process: (exit code, stderr, peak RSS in KiB, seconds)."""
    peak_file = Path(tempfile.mkdtemp()) / "peak"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JISU_TEST_PEAK_FILE=str(peak_file))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (_AS_LIMIT, _AS_LIMIT))

    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI_WITH_PEAK, "generate", "hi", "--model", str(model), "--max-tokens", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=limit,
        )
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
        err.seek(0)
        peak_kb = int(peak_file.read_text()) if peak_file.exists() else 1 << 40  # killed: no report
        shutil.rmtree(peak_file.parent, ignore_errors=True)
        return proc.returncode, err.read().decode(errors="replace"), peak_kb, seconds


def _cli_cases(hf: Path, src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    r = GGUFReader(src)
    tokens = r.fields["tokenizer.ggml.tokens"]
    q = tensor_field(r, "blk.0.attn_q.weight")
    folder = shutil.copytree(hf, root / "layers")
    _edit_config(folder, num_hidden_layers=10**9)
    lying = shutil.copytree(hf, root / "header")
    weights = lying / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 1 << 40) + weights.read_bytes()[8:])
    return {
        "gguf_block_count": (rewrite_gguf(src, root / "layers.gguf", {"llama.block_count": (10**9, V.UINT32)}),
                             "llama.block_count is 1000000000"),
        "gguf_array_count": (patched(src, root / "array.gguf", (part_offset(tokens, 4), _u64(1 << 40))),
                             "claims 1099511627776 elements"),
        "gguf_tensor_count": (patched(src, root / "tensors.gguf", (8, _u64(1 << 40))), "1099511627776 tensors"),
        "gguf_dims_overflow": (patched(src, root / "dims.gguf", (part_offset(q, 3), _u64(1 << 62) + _u64(1 << 62))),
                               "blk.0.attn_q.weight"),
        "hf_layers": (folder, "num_hidden_layers is 1000000000"),
        "safetensors_header_length": (lying, "header length field says 1099511627776 bytes"),
    }


@pytest.mark.parametrize(
    "case", ["gguf_block_count", "gguf_array_count", "gguf_tensor_count", "gguf_dims_overflow", "hf_layers",
             "safetensors_header_length"],
)
def test_cli_refuses_absurd_counts_quickly_and_small(base, tmp_path, case):
    model, fragment = _cli_cases(*base, tmp_path)[case]
    code, stderr, peak_kb, seconds = run_cli(model)
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("jisu: error: ") and fragment in stderr, stderr
    assert peak_kb < _PEAK_RSS_LIMIT_KB, f"peak RSS {peak_kb} KiB"
    assert seconds < 10, f"took {seconds:.1f} s"
