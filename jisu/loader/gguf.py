"""Load a llama.cpp GGUF file into a Checkpoint: HF-style config, tensors under HF names, tokenizer.

Parsing is gguf.GGUFReader's and block dequantization is gguf.quants.dequantize; this module maps
names and metadata, undoes llama.cpp's Q/K row permutation, and turns every failure into a
ModelLoadError / UnsupportedModelError that says what was wrong.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from jisu.errors import JisuError, ModelConfigError, ModelLoadError, UnsupportedModelError
from jisu.loader.checkpoint import Checkpoint
from jisu.loader.gguf_blocks import KEPT_BLOCK_FORMATS, block_tensor  # noqa: F401  (re-exported)
from jisu.loader.gguf_scan import scan_gguf
from jisu.loader.gguf_tokenizer import build_gguf_tokenizer
from jisu.loader.validate import check_tensors_fit_config
from jisu.models.arch import GGUF_ARCHITECTURES as _GGUF_MODULES
from jisu.models.arch import for_gguf
from jisu.models.arch.base import COMMON_GGUF_TENSORS, Architecture
from jisu.models.config import ModelConfig
from jisu.models.weights import fused_splitter
from jisu.quant.formats import QuantizedTensor

GGUF_ARCHITECTURES: dict[str, str] = {name: for_gguf(name).hf_name for name in _GGUF_MODULES}
"""GGUF `general.architecture` -> config.json architecture. Mistral GGUFs are written as "llama"."""

Q = GGMLQuantizationType
# F16/BF16 stay in their dtype; the block formats are dequantized to float32 unless kept as blocks
# (KEPT_BLOCK_FORMATS, jisu/loader/gguf_blocks.py: every block type here). Q5_0/Q5_1 are here too
# because llama.cpp's K-quant mixes fall back to them for rows not divisible by 256 (SmolLM2's 576).
SUPPORTED_TENSOR_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^(.+)\.(\d+)\.(weight|bias)$")
# llama.cpp stores Llama 3.1-style rope scaling as per-dimension factors in this tensor, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
# ... and LongRoPE's (Phi-3) per-pair divisors in these two, folded into config.rope_scaling too.
_ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)


ProgressFn = Callable[[int, int, str], None]
"""progress(done, total, what): called as tensors load, e.g. to drive a progress bar."""


def load_gguf(path: str | Path, progress: ProgressFn | None = None, keep_blocks: bool = False) -> Checkpoint:
    """keep_blocks: Q8_0/Q4_0/Q4_1 matrices come as QuantizedTensor (their numbers untouched) instead of
    being dequantized to float32.

    The file is untrusted: its structure is checked by scan_gguf, its metadata by ModelConfig.from_hf_dict
    and the tensor shapes its header states against that config, all before any tensor data is read."""
    return load_gguf_with_config(path, progress, keep_blocks)[0]


def load_gguf_with_config(path: str | Path, progress: ProgressFn | None = None,
                          keep_blocks: bool = False) -> tuple[Checkpoint, dict[str, Any], dict[str, str]]:
    """load_gguf, and the config.json-style dict and field names its ModelConfig was made from (what the cache of
    converted checkpoints stores, jisu/loader/converted_cache.py)."""
    path = Path(path)
    arch = _check_header(path)
    if arch is not None:  # fail fast, before parsing a vocabulary of maybe 250k tokens
        _gguf_architecture(arch, path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise ModelLoadError(f"{path}: GGUF metadata lacks general.architecture")
    spec = _gguf_architecture(arch_name, path, meta)
    hf_arch = spec.hf_name

    by_name = {t.name: t for t in reader.tensors}
    hf_config = gguf_to_hf_config(meta, arch_name, hf_arch, by_name, path)
    names = gguf_field_names(arch_name)
    config = ModelConfig.from_hf_dict(hf_config, str(path), names)
    hf_names: dict[str, str] = {}  # HF name -> GGUF name
    experts: dict[str, int] = {}  # HF name -> its expert's index in a stacked [experts, rows, cols] GGUF tensor
    for gguf_name in by_name:
        if gguf_name == _ROPE_FREQS or gguf_name in _ROPE_FACTORS:
            continue  # folded into config.rope_scaling by gguf_to_hf_config
        hf_name = hf_tensor_name(gguf_name, spec.gguf_tensors)
        if hf_name is None:
            raise UnsupportedModelError(
                f"{path}: unexpected tensor {gguf_name!r} for a {arch_name} model; "
                f"jisu knows: {', '.join(spec.gguf_tensors)}"
            )
        if "{e}" in hf_name:  # llama.cpp's *_exps: every expert's matrix in one tensor, loaded one per expert
            count = _torch_shape(by_name[gguf_name].shape)[0]
            if count != config.num_experts:
                raise ModelLoadError(f"{path}: tensor {gguf_name} stacks {count} experts, the config implies "
                                     f"{config.num_experts}")
            for e in range(count):
                experts[hf_name.replace("{e}", str(e))] = e
                hf_names[hf_name.replace("{e}", str(e))] = gguf_name
            continue
        hf_names[hf_name] = gguf_name
    shapes = {hf: _torch_shape(by_name[g].shape)[hf in experts:] for hf, g in hf_names.items()}
    # A fused projection held whole (Phi-3's attn_qkv and ffn_up, GPT-2's attn_qkv) is checked and loaded as its shards.
    split = fused_splitter(config)
    parts = {p: (hf, tuple(t.shape)) for hf, s in shapes.items() for p, t in split(hf, torch.empty(s, device="meta"))}
    check_tensors_fit_config(config, {p: s for p, (_, s) in parts.items()}, str(path), names,
                             {p: hf_names[hf] for p, (hf, _) in parts.items()})

    try:
        tokenizer = build_gguf_tokenizer(meta)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # e.g. an id stored as a string
        raise ModelLoadError(f"{path}: malformed tokenizer metadata (tokenizer.ggml.*): {e}") from None
    hf_config["bos_token_id"] = tokenizer.bos_token_id
    hf_config["eos_token_id"] = list(tokenizer.eos_token_ids)
    config = ModelConfig.from_hf_dict(hf_config, str(path), names)

    tensors = {}
    for done, (hf_name, gguf_name) in enumerate(hf_names.items(), 1):
        if progress is not None:
            progress(done, len(hf_names), f"loading {path.name}")
        t = by_name[gguf_name]
        # An expert of a stacked tensor: its rows are contiguous, so its blocks are sliced out before converting.
        data = t.data if hf_name not in experts else t.data[experts[hf_name]]
        try:
            if keep_blocks and t.tensor_type in KEPT_BLOCK_FORMATS and len(shapes[hf_name]) == 2:
                w = block_tensor(data, t.tensor_type, shapes[hf_name], gguf_name)
            else:
                w = tensor_to_torch(data, t.tensor_type, shapes[hf_name], gguf_name)
        except JisuError as e:
            raise type(e)(f"{path}: {e}") from None
        if spec.permute_gguf_qk:
            w = _unpermute_qk(w, gguf_name, config)
        tensors.update(split(hf_name, spec.sanitize_gguf(hf_name, w)))
    checkpoint = Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        source=str(path),
        metadata={
            "format": "gguf",
            "gguf_architecture": arch_name,
            "name": meta.get("general.name"),
            "file_type": meta.get("general.file_type"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "tokenizer_model": meta.get("tokenizer.ggml.model"),
            "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        },
    )
    return checkpoint, hf_config, names


# ----------------------------------------------------------------------------- file and metadata


def _check_header(path: Path) -> str | None:
    """Reject what is not a GGUF file with a clear reason; return general.architecture if it comes first."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a GGUF file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes), not a GGUF file")
    if len(head) < 4 and _GGUF_MAGIC.startswith(head):
        raise ModelLoadError(f"{path} is truncated: {size} bytes is shorter than a GGUF header (24 bytes)")
    if head[:4] != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, expected b'GGUF'")
    if len(head) < 24:
        raise ModelLoadError(f"{path} is truncated: {size} bytes is shorter than a GGUF header (24 bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{path}: GGUF version {version} is not supported (jisu reads versions "
            f"{', '.join(map(str, _SUPPORTED_VERSIONS))}); the file may be corrupt or big-endian"
        )
    return _peek_architecture(head, n_kv)  # counts are checked against the file size by scan_gguf


def _peek_architecture(head: bytes, n_kv: int) -> str | None:
    # llama.cpp writes general.architecture first; read string/scalar keys until it or an array shows up.
    scalar_sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    offset = 24
    try:
        for _ in range(min(n_kv, 32)):
            (klen,) = struct.unpack_from("<Q", head, offset)
            key = head[offset + 8 : offset + 8 + klen].decode("utf-8")
            offset += 8 + klen
            (vtype,) = struct.unpack_from("<I", head, offset)
            offset += 4
            if vtype == GGUFValueType.STRING:
                (vlen,) = struct.unpack_from("<Q", head, offset)
                value = head[offset + 8 : offset + 8 + vlen]
                if key == "general.architecture":
                    return value.decode("utf-8")
                offset += 8 + vlen
            elif vtype in scalar_sizes:
                offset += scalar_sizes[vtype]
            else:
                return None
    except (struct.error, UnicodeDecodeError):
        return None  # GGUFReader will give the full story
    return None


class _PlainArrayReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    GGUFReader slices its np.memmap hundreds of thousands of times while parsing a vocabulary, and
    every memmap slice pays for subclass bookkeeping; a plain view of the same mapping parses about
    3x faster (SmolLM2: 2.3 s -> 0.7 s) and its tensor views dequantize 2x faster.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = np.asarray(value)  # keeps the mapping alive through .base


def open_gguf(path: str | Path) -> GGUFReader:
    """GGUFReader, with its parse errors (IndexError, ValueError, ...) turned into a ModelLoadError."""
    path = Path(path)
    _check_header(path)
    scan_gguf(path)  # counts, lengths, types and offsets, before GGUFReader trusts them
    try:
        return _PlainArrayReader(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None
    except Exception as e:  # GGUFReader signals a short or garbled file with assorted numpy errors
        size = path.stat().st_size if path.exists() else 0
        raise ModelLoadError(
            f"{path} is truncated or corrupt ({size} bytes; GGUF parser said: {type(e).__name__}: {e})"
        ) from None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All metadata keys as plain Python values (strings, ints, floats, bools, lists)."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _field_value(field: Any) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1] if len(types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        if sub == GGUFValueType.ARRAY:
            return None  # nested arrays: nothing jisu reads
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    value = field.parts[-1]
    if types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    if types[0] == GGUFValueType.BOOL:
        return bool(value[0])
    if types[0] == GGUFValueType.FLOAT32:
        # The shortest decimal that round-trips through float32: 1e-05, not 9.999999747378752e-06.
        return float(str(np.float32(value[0])))
    return value[0].item()


def _gguf_architecture(arch: str, path: Path, meta: dict[str, Any] | None = None) -> Architecture:
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; jisu runs GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)} ({', '.join(GGUF_ARCHITECTURES.values())})"
        )
    return for_gguf(arch, meta)


def gguf_field_names(arch: str) -> dict[str, str]:
    """config.json key -> the GGUF metadata key it comes from, so errors name what is in the file."""
    names = {
        "vocab_size": "tokenizer.ggml.tokens (its length)",
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_hidden_layers": f"{arch}.block_count",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "max_position_embeddings": f"{arch}.context_length",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "rope_theta": f"{arch}.rope.freq_base",
        "rope_scaling.rope_type": f"{arch}.rope.scaling.type",
        "rope_scaling.factor": f"{arch}.rope.scaling.factor",
        "rope_scaling.original_max_position_embeddings": f"{arch}.rope.scaling.original_context_length",
        "rope_scaling.beta_fast": f"{arch}.rope.scaling.yarn_beta_fast",
        "rope_scaling.beta_slow": f"{arch}.rope.scaling.yarn_beta_slow",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }
    return names


def gguf_to_hf_config(
    meta: dict[str, Any], arch: str, hf_arch: str, tensors: dict[str, Any], path: Path | str = "GGUF"
) -> dict[str, Any]:
    """Translate `{arch}.*` metadata into a config.json-style dict for ModelConfig.from_hf_dict.

    Values pass through as stored, so that from_hf_dict checks their types and ranges in one place; it is
    run here too (naming the GGUF keys) before the rope_freqs tensor is read with the head size."""

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):  # per-layer values; jisu runs uniform layers only
            if not value or any(v != value[0] for v in value):
                raise UnsupportedModelError(f"{path}: {arch}.{key} varies per layer ({value[:8]}...)")
            value = value[0]
        return value

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise ModelConfigError(f"{path}: tokenizer.ggml.tokens is a {type(tokens).__name__}; allowed: an array of strings")
    vocab = len(tokens or []) or get("vocab_size")
    if not vocab:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer.ggml.tokens, so the vocabulary size is unknown")
    hf: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": get("embedding_length", required=True),
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": get("attention.head_count", required=True),
        "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": get("attention.key_length") or get("rope.dimension_count"),
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(name.endswith("attn_q.bias") for name in tensors),
        "rope_scaling": _rope_scaling(get, path),
    }
    hf |= for_gguf(arch, meta).gguf_config(get, tensors)
    names = gguf_field_names(arch)
    config = ModelConfig.from_hf_dict(hf, str(path), names)
    rot = get("rope.dimension_count")
    if rot is not None and rot != (config.rotary_dim or config.head_dim):  # the architecture reads partial rotary
        raise UnsupportedModelError(
            f"{path}: partial rotary embedding ({arch}.rope.dimension_count {rot!r} of {config.head_dim} "
            f"dims) is not supported for {arch}"
        )
    if any(name in tensors for name in _ROPE_FACTORS):
        hf["rope_scaling"] = _longrope_scaling(get, tensors, config, path)
    rope_freqs = tensors.get(_ROPE_FREQS)
    if rope_freqs is not None:
        shape = _torch_shape(rope_freqs.shape)
        if shape != (config.head_dim // 2,):
            raise ModelLoadError(
                f"{path}: tensor {_ROPE_FREQS} has shape {shape}; the head size {config.head_dim} implies "
                f"({config.head_dim // 2},)"
            )
        factors = tensor_to_torch(rope_freqs.data, rope_freqs.tensor_type, shape, _ROPE_FREQS)
        hf["rope_scaling"] = llama3_scaling_from_factors(
            factors.float().numpy(), config.rope_theta, config.head_dim,
            get("rope.scaling.original_context_length"), path,
        )
    return hf


def _rope_scaling(get: Any, path: Path | str) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind is None and get("rope.scale_linear") is not None:  # pre-2024 files
        kind, factor = "linear", get("rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if get("rope.scaling.original_context_length") is not None:
            out["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if get(f"rope.scaling.{gguf_key}") is not None:
                out[hf_key] = get(f"rope.scaling.{gguf_key}")
        return out
    raise UnsupportedModelError(f"{path}: unsupported rope scaling type {kind!r}; jisu supports linear, yarn")


def _longrope_scaling(get: Any, tensors: dict[str, Any], config: ModelConfig, path: Path | str) -> dict[str, Any]:
    """HF's longrope rope_scaling from llama.cpp's rope_factors_long / rope_factors_short tensors (one divisor per
    rotary pair each) and its rope.scaling.attn_factor / original_context_length metadata."""
    pairs = (config.rotary_dim or config.head_dim) // 2
    out: dict[str, Any] = {"rope_type": "longrope"}
    for name, key in _ROPE_FACTORS.items():
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{path}: lacks tensor {name}, the other half of LongRoPE's factors")
        shape = _torch_shape(t.shape)
        if shape != (pairs,):
            raise ModelLoadError(f"{path}: tensor {name} has shape {shape}; {pairs} rotary pairs imply ({pairs},)")
        out[key] = tensor_to_torch(t.data, t.tensor_type, shape, name).float().tolist()
    out["original_max_position_embeddings"] = get("rope.scaling.original_context_length",
                                                  config.max_position_embeddings)
    if get("rope.scaling.attn_factor") is not None:
        out["attention_factor"] = get("rope.scaling.attn_factor")
    return out


def llama3_rope_factors(theta: float, head_dim: int, params: dict[str, Any]) -> np.ndarray:
    """The per-dimension divisors llama.cpp's converter writes as rope_freqs for Llama 3.1-style scaling."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    orig = params["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def llama3_scaling_from_factors(
    factors: np.ndarray, theta: float, head_dim: int, orig_ctx: Any, path: Path | str
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's rope_freqs tensor.

    The tensor keeps only the per-dimension result. It depends on factor and on low/orig and high/orig
    alone, so with orig from the metadata (else Llama 3's 8192) the band edges are read off the
    factors: first the published values (low 1, high 4), else a line fitted through the dims inside
    the band. Whatever is chosen must reproduce the tensor, or the file is refused rather than misread.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(orig_ctx or 8192),
    }

    def matches(p: dict[str, Any]) -> bool:
        expected = llama3_rope_factors(theta, head_dim, p)
        return expected.shape == factors.shape and bool(np.allclose(factors, expected, rtol=1e-3, atol=1e-4))

    if not matches(params):
        params |= _llama3_band(factors, factor, theta, head_dim, params["original_max_position_embeddings"])
    if not matches(params):
        raise UnsupportedModelError(f"{path}: its rope_freqs tensor does not match Llama 3 rope scaling")
    return params


def _llama3_band(factors: np.ndarray, factor: float, theta: float, head_dim: int, orig: int) -> dict[str, float]:
    # With x = orig / wavelength: x < low -> factor, x > high -> 1, and in between the blend weight
    # s = (x - low) / (high - low), which each in-band factor f gives as (1/f - 1/factor) / (1 - 1/factor).
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = orig * freqs / (2 * math.pi)
    if x.shape != factors.shape or factor <= 1:
        return {}
    inside = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    s = (1 / factors[inside] - 1 / factor) / (1 - 1 / factor)
    if inside.sum() >= 2:
        slope, intercept = np.polyfit(x[inside], s, 1)
        if slope <= 0:
            return {}
        low = -intercept / slope
        high = low + 1 / slope
    elif inside.sum() == 1:  # one equation, two edges: keep Llama 3's high = 4 * low
        low = float(x[inside][0] / (1 + 3 * s[0]))
        high = 4 * low
    else:  # no dim inside the band: any edges between the two groups give the same factors
        below = x[factors >= factor * (1 - 1e-6)]
        above = x[factors <= 1 + 1e-6]
        lo_edge = float(below.max()) if below.size else 0.0
        hi_edge = float(above.min()) if above.size else lo_edge * 2 + 1
        gap = hi_edge - lo_edge
        low, high = lo_edge + gap / 3, lo_edge + 2 * gap / 3
    return {"low_freq_factor": float(round(low, 6)), "high_freq_factor": float(round(high, 6))}


# ----------------------------------------------------------------------------- tensors


def hf_tensor_name(gguf_name: str, table: dict[str, str] | None = None) -> str | None:
    """The HF parameter name for a GGUF tensor name under an architecture's table (default: the names every
    architecture shares), or None when it has no entry. A stacked experts tensor's name keeps the table's {e}
    (the loader fills it per expert); an older file's per-expert name (blk.N.ffn_gate.E.weight) gets E."""
    table = COMMON_GGUF_TENSORS if table is None else table
    m = _LAYER_NAME.match(gguf_name)
    if m is None:
        return table.get(gguf_name)
    template, expert = table.get(f"blk.{{n}}.{m.group(2)}"), None
    if template is None and (e := _EXPERT_NAME.match(m.group(2))):
        template, expert = table.get(f"blk.{{n}}.{e.group(1)}.{{e}}.{e.group(3)}"), str(int(e.group(2)))
    if template is None:
        return None
    name = template.replace("{n}", str(int(m.group(1))))
    return name if expert is None else name.replace("{e}", expert)


def _torch_shape(gguf_shape: Any) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first (ne[0] = row length); torch wants rows first.
    return tuple(int(d) for d in reversed(list(gguf_shape)))


def tensor_to_torch(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """One GGUF tensor as a torch tensor: F32/F16/BF16 as they are, block formats dequantized to float32."""
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            f"tensor {name!r} has GGUF type {getattr(qtype, 'name', qtype)}; jisu loads "
            f"{', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}"
        )
    try:
        if qtype == Q.F32:
            arr = np.array(data, dtype=np.float32)  # copies off the read-only memory map
            return torch.from_numpy(arr).reshape(shape)
        if qtype == Q.F16:
            return torch.from_numpy(np.array(data, dtype=np.float16)).reshape(shape)
        if qtype == Q.BF16:
            # The reader hands BF16 as raw bytes; reinterpret them without widening to float32.
            raw = np.ascontiguousarray(data).view(np.int16).copy()
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(dequantize(np.asarray(data), qtype)).reshape(shape)
    except (ValueError, TypeError, AssertionError) as e:
        raise ModelLoadError(f"tensor {name!r} ({qtype.name}, shape {shape}) is corrupt: {e}") from None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter permutation of q/k rows.

    HF's Llama rotates the two halves of each head's dims (rotate_half); llama.cpp's rope pairs
    adjacent dims, so its converter interleaves each head's halves: row (h, i, half) moves to
    (h, 2*i + half). Here we view rows as (head, i, half) and swap back to (head, half, i).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot split {rows} q/k rows into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _unpermute_qk(w, gguf_name: str, config: ModelConfig):
    if ".attn_q." in gguf_name:
        heads = config.num_attention_heads
    elif ".attn_k." in gguf_name:
        heads = config.num_key_value_heads
    else:
        return w
    if isinstance(w, QuantizedTensor):
        return w.map_rows(lambda rows: unpermute_rows(rows, heads))
    return unpermute_rows(w, heads)
