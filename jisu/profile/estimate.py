"""How much memory a model needs before loading it: weights (on disk and as jisu would load them), KV cache per
token, and how many tokens and full-length sequences fit in a budget.

Only metadata is read: the GGUF header (metadata and tensor table; the tensor data stays unread in the memory
map) or config.json plus the JSON headers of the safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jisu.capabilities import low_bit_support, resolve_dtype
from jisu.config import CacheConfig, EngineConfig, SchedulerConfig
from jisu.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from jisu.loader.gguf import (
    KEPT_BLOCK_FORMATS,
    GGUF_ARCHITECTURES,
    gguf_to_hf_config,
    hf_tensor_name,
    open_gguf,
    read_metadata,
)
from jisu.loader.validate import expected_shapes
from jisu.loader.resolve import resolve_model
from jisu.models.config import ModelConfig
from jisu.profile.roofline import WeightFormat, decode_cost, parameter_count
from jisu.model_run import cache_dtype_for, context_window, kv_blocks
from jisu.runner.kv_cache import DEFAULT_CPU_KV_BYTES, kv_bytes_per_token

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20  # a safetensors JSON header larger than this is a corrupt length field
_BLOCK_TYPES = {"int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1")}
"""GGUF block types jisu's low-bit kernels run as they are, by the format they run as."""


@dataclass(frozen=True)
class StoredModel:
    """What the metadata says: the model's shape and each tensor's (HF name, elements, bytes) as stored."""

    config: ModelConfig
    tensors: tuple[tuple[str, int, int], ...]
    format: str
    """'gguf' or 'safetensors'."""
    source: str
    file_bytes: int
    tensor_types: tuple[str, ...]
    kept_blocks: tuple[tuple[str, int, str], ...] = ()
    """(HF name, bytes as loaded, format: int8 or int4) of matrices whose blocks jisu's low-bit kernels run as they
    are (GGUF Q8_0/Q4_0/Q4_1; see jisu/quant/plan.py)."""


def read_stored_model(name_or_path: str | os.PathLike[str] | None) -> StoredModel:
    path = resolve_model(name_or_path)
    if path.is_dir():
        return _read_hf_folder(path)
    return _read_gguf(path)


def _read_gguf(path: Path) -> StoredModel:
    reader = open_gguf(path)  # raises ModelLoadError for what is not a readable GGUF file
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; jisu runs {', '.join(GGUF_ARCHITECTURES)}"
        )
    by_name = {t.name: t for t in reader.tensors}
    try:
        config = ModelConfig.from_hf_dict(gguf_to_hf_config(meta, arch, GGUF_ARCHITECTURES[arch], by_name, path))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: malformed GGUF metadata: {e}") from None
    tensors, kept = [], []
    for t in reader.tensors:
        hf = hf_tensor_name(t.name)
        if hf is not None:  # rope_freqs and the like are folded into the config, not weights
            tensors.append((hf, int(t.n_elements), int(t.n_bytes)))
            if t.tensor_type in KEPT_BLOCK_FORMATS and len(t.shape) == 2:
                # loaded as q + float16 scale (+ float16 zero for 4-bit) per 32 weights
                per_block, fmt = (34, "int8") if t.tensor_type.name == "Q8_0" else (20, "int4")
                kept.append((hf, int(t.n_elements) // 32 * per_block, fmt))
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    return StoredModel(config, tuple(tensors), "gguf", str(path), path.stat().st_size, types, tuple(kept))


def _read_hf_folder(folder: Path) -> StoredModel:
    from jisu.loader.hf_folder import read_json

    d = read_json(folder / "config.json", required=True)
    if d.get("quantization_config"):
        raise UnsupportedModelError(f"{folder}: quantized Hugging Face checkpoints are not supported")
    config = ModelConfig.from_hf_dict(d)
    tensors, types, file_bytes = [], set(), 0
    for file in _safetensors_files(folder):
        file_bytes += file.stat().st_size
        for name, dtype, shape in _safetensors_header(file):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if dtype not in _SAFETENSORS_BYTES:
                raise UnsupportedModelError(f"{file}: tensor {name} has dtype {dtype}")
            n = math.prod(shape)
            tensors.append((name, n, n * _SAFETENSORS_BYTES[dtype]))
            types.add(dtype)
    return StoredModel(config, tuple(tensors), "safetensors", str(folder), file_bytes, tuple(sorted(types)))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{index} is unreadable: {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: missing shards {', '.join(missing)}")
    return files


def _safetensors_header(file: Path) -> Iterable[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of each tensor, from the file's leading JSON header only."""
    try:
        with file.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{file} is truncated: no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ModelLoadError(f"{file} is corrupt: header length {n}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} has a corrupt header: {e}") from None
    for name, info in header.items():
        if name != "__metadata__":
            yield name, info["dtype"], list(info["shape"])


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    model: str
    format: str
    tensor_types: tuple[str, ...]
    parameters: int
    dtype: str
    device: str
    file_bytes: int
    weights_stored_bytes: int
    """The weight tensors as stored on disk (quantized, if the file is)."""
    weights_loaded_bytes: int
    """Weights as jisu allocates them now (every tensor in `dtype`)."""
    other_buffers_bytes: int
    """The rotary cos/sin table for max_model_len positions."""
    kv_bytes_per_token: int
    kv_dtype: str
    """What the KV cache stores K/V in (kv_cache_dtype resolved as the engine does)."""
    block_size: int
    max_model_len: int
    memory_budget_bytes: int
    kv_budget_bytes: int
    kv_blocks: int
    """Blocks the KV budget holds."""
    concurrent_tokens: int
    full_length_sequences: int
    kv_allocated_bytes: int
    """What the engine allocates: the budget's blocks, but no more than max_num_seqs full-length sequences fill."""
    decode_weight_bytes_per_token: dict[str, float]
    """Weight bytes one batch-1 decode step reads: as loaded now, and as stored (what a kernel reading the
    stored format would move)."""
    decode_bound_tokens_per_s: dict[str, float] = field(default_factory=dict)
    """bandwidth / those bytes, when a calibration is given."""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tensor_types"] = list(self.tensor_types)
        d["notes"] = list(self.notes)
        return d


def _check_positive(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")


def _rotary_bytes(positions: int, head_dim: int) -> int:
    return positions * (head_dim // 2) * 8  # the complex64 cos/sin table, one row per position


def _kv_plan(
    budget: int | None, weights: int, seq_len: int, head_dim: int, per_token: int, block_size: int
) -> tuple[int, int, int]:
    """(total budget, KV budget, KV blocks it holds): what the weights and the rotary table leave of the budget
    (None: the engine's default CPU KV budget on top), whole blocks of it as jisu.runner.kv_cache.plan_num_blocks
    counts them, before the engine's cap at what max_num_seqs sequences fill (see kv_allocated_bytes)."""
    rotary = _rotary_bytes(seq_len, head_dim)
    if budget is None:
        kv_budget = DEFAULT_CPU_KV_BYTES
        budget = weights + rotary + kv_budget
    else:
        kv_budget = max(0, budget - weights - rotary)
    return budget, kv_budget, kv_budget // (per_token * block_size)


def estimate(
    model_name_or_path: str | os.PathLike[str] | None,
    memory_budget_bytes: int | None = None,
    dtype: str | torch.dtype = "auto",
    max_model_len: int | None = None,
    device: str = "cpu",
    block_size: int = 16,
    max_num_seqs: int = 64,
    cpu_kernels: bool = True,
    calibration: Any = None,
    kv_cache_dtype: str = "auto",
) -> Estimate:
    """Memory for `model_name_or_path` without loading its weights.

    memory_budget_bytes: for weights + KV cache together; None = jisu's default CPU KV cache (1 GiB) on top of
    the weights. max_model_len: None = the model's context window. block_size, max_num_seqs: as LLM(...). cpu_kernels: as LLM(cpu_kernels=...); with
    them off, a tied CPU model keeps a second, column-major copy of the output layer.
    calibration: a jisu.profile.calibrate.Calibration to turn bytes per token into a decode bound.
    kv_cache_dtype: as LLM(kv_cache_dtype=...): auto = `dtype`, or float16 where low-bit blocks stay on the CPU
    kernels (with LLM's default int16 activations).
    """
    _check_positive("memory_budget_bytes", memory_budget_bytes)
    _check_positive("max_model_len", max_model_len)
    _check_positive("block_size", block_size, allow_none=False)
    _check_positive("max_num_seqs", max_num_seqs, allow_none=False)
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and memory_budget_bytes is None:
        raise InvalidRequestError("on cuda, give memory_budget_bytes (jisu sizes the cache from free GPU memory)")
    torch_dtype = resolve_dtype(dtype, device)
    elem = torch.empty((), dtype=torch_dtype).element_size()
    # What runs where, by the rules alone: an estimate builds no kernels and asks no GPU (see jisu/capabilities.py).
    support = low_bit_support(device, torch_dtype, cpu_kernels, probe=False)
    formats = support.formats("auto")

    stored = read_stored_model(model_name_or_path)
    config = stored.config
    notes = []
    shapes = expected_shapes(config)
    loaded = sum(math.prod(s) for s in shapes.values()) * elem
    # weights=auto keeps the blocks of the formats that run here (jisu/quant/plan.py; torch's int4 kernel on CUDA
    # holds 4-bit blocks in as many bytes, jisu/kernels/torch_int4.py); everything else loads as `dtype`
    kept = {n: b for n, b, fmt in stored.kept_blocks if fmt in formats}
    if kept:
        loaded += sum(b - math.prod(shapes[n]) * elem for n, b in kept.items() if n in shapes)
        types = {t for f in formats for t in _BLOCK_TYPES[f]}
        notes.append(f"{len(kept)} quantized matrices ({'/'.join(sorted(set(stored.tensor_types) & types))}) "
                     "stay in their blocks on low-bit kernels")
    tied = config.output_is_tied({n for n, _, _ in stored.tensors})
    if tied and device.startswith("cpu") and not support.cpu_kernels:
        # NOTE: without jisu's kernel the CPU output layer is stored column-major (faster in torch), a copy.
        loaded += config.vocab_size * config.hidden_size * elem
        notes.append("tied output layer kept as a second, column-major copy (no jisu CPU kernel)")
    stored_weights = sum(b for _, _, b in stored.tensors)

    CacheConfig(dtype=kv_cache_dtype)  # a clear error for a dtype the engine would refuse
    # As the engine resolves it, with LLM's default int16 activations.
    kv_dtype = cache_dtype_for(kv_cache_dtype, torch_dtype, support, "int16", bool(kept))
    per_token = kv_bytes_per_token(config, kv_dtype)
    seq_len = max_model_len or config.max_position_embeddings
    budget, kv_budget, blocks = _kv_plan(memory_budget_bytes, loaded, seq_len, config.head_dim, per_token, block_size)
    if max_model_len is None and 0 < blocks * block_size < seq_len:
        # As the engine does: without a max_model_len, the context is capped at what the KV cache holds. A shorter
        # context shrinks the rotary table, which leaves the cache a little more: settle in a few rounds.
        for _ in range(4):
            capped = context_window(config, None, max(blocks, 1) * block_size)
            if capped == seq_len:
                break
            seq_len = capped
            budget, kv_budget, blocks = _kv_plan(
                memory_budget_bytes, loaded, seq_len, config.head_dim, per_token, block_size
            )
        notes.append(f"max_model_len capped at {seq_len} tokens, what the KV cache holds, as the engine does")
    if memory_budget_bytes is None:
        notes.append(f"no budget given: weights + jisu's default CPU KV cache ({DEFAULT_CPU_KV_BYTES >> 20} MiB)")
    elif kv_budget == 0:
        notes.append(f"the budget does not cover the weights ({loaded / 2**20:.0f} MiB): nothing fits")
    rotary = _rotary_bytes(seq_len, config.head_dim)
    # What the engine allocates: the budget's blocks, but no more than max_num_seqs full-length sequences fill.
    settings = EngineConfig(max_model_len=max_model_len, scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
                            cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=max(kv_budget, 1)))
    allocated = kv_blocks(config, settings, kv_dtype, torch.device(device))
    blocks_per_seq = -(-seq_len // block_size)
    if blocks and blocks < blocks_per_seq:
        notes.append(f"the KV cache holds {blocks * block_size} tokens, fewer than max_model_len {seq_len}")
    notes.append("activations and the Python runtime are not counted")

    tensors_by_loaded = [(n, c, kept.get(n, c * elem)) for n, c, _ in stored.tensors]
    formats = {
        "loaded": WeightFormat.from_tensors(tensors_by_loaded, tied, str(torch_dtype).removeprefix("torch.")),
        "stored": WeightFormat.from_tensors(stored.tensors, tied, "/".join(stored.tensor_types)),
    }
    decode_bytes = {k: decode_cost(config, 1, weights=w).bytes.weights_total for k, w in formats.items()}
    bound = {}
    if calibration is not None:
        bound = {k: calibration.bandwidth_bytes_per_s / b for k, b in decode_bytes.items()}
    return Estimate(
        model=stored.source,
        format=stored.format,
        tensor_types=stored.tensor_types,
        parameters=parameter_count(config),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device,
        file_bytes=stored.file_bytes,
        weights_stored_bytes=stored_weights,
        weights_loaded_bytes=loaded,
        other_buffers_bytes=rotary,
        kv_bytes_per_token=per_token,
        kv_dtype=str(kv_dtype).removeprefix("torch."),
        block_size=block_size,
        max_model_len=seq_len,
        memory_budget_bytes=budget,
        kv_budget_bytes=kv_budget,
        kv_blocks=blocks,
        concurrent_tokens=blocks * block_size,
        full_length_sequences=blocks // blocks_per_seq,
        kv_allocated_bytes=allocated * block_size * per_token,
        decode_weight_bytes_per_token=decode_bytes,
        decode_bound_tokens_per_s=bound,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- output


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def estimate_table(e: Estimate):
    from rich.table import Table

    t = Table(title=f"memory estimate: {Path(e.model).name} ({e.format}, {', '.join(e.tensor_types)})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("parameters", f"{e.parameters / 1e6:.1f} M")
    t.add_row("file on disk", _size(e.file_bytes))
    t.add_row("weights as stored", _size(e.weights_stored_bytes))
    t.add_row(f"weights as loaded ({e.dtype}, {e.device})", _size(e.weights_loaded_bytes))
    t.add_row("rotary table", _size(e.other_buffers_bytes))
    t.add_row(f"KV cache per token ({e.kv_dtype})", _size(e.kv_bytes_per_token))
    t.add_row(f"KV cache per full sequence ({e.max_model_len} tokens)", _size(e.kv_bytes_per_token * e.max_model_len))
    t.add_row("memory budget", _size(e.memory_budget_bytes))
    t.add_row("left for the KV cache", _size(e.kv_budget_bytes))
    t.add_row(f"concurrent tokens (blocks of {e.block_size})", f"{e.concurrent_tokens:,}")
    t.add_row(f"full-length sequences ({e.max_model_len} tokens)", f"{e.full_length_sequences:,}")
    t.add_row("KV cache the engine allocates", _size(e.kv_allocated_bytes))
    for kind, b in e.decode_weight_bytes_per_token.items():
        bound = e.decode_bound_tokens_per_s.get(kind)
        extra = f" -> decode bound {bound:.0f} tok/s" if bound else ""
        t.add_row(f"decode weight bytes per token ({kind})", _size(b) + extra)
    if e.notes:
        t.caption = "; ".join(e.notes)
    return t


def cmd_estimate(args: Any) -> int:
    """`jisu estimate [--model M] [--memory-budget SIZE] [--dtype D] [--max-model-len N] [--device D] [--json]`."""
    from rich.console import Console

    from jisu.profile.calibrate import load_calibration

    device = getattr(args, "device", "cpu") or "cpu"
    budget = getattr(args, "memory_budget", None)
    if isinstance(budget, str):
        budget = parse_size(budget)
    # Only a cached calibration: an estimate never spends time measuring.
    usable = device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())
    calibration = load_calibration(device) if usable else None
    e = estimate(getattr(args, "model", None), budget, getattr(args, "dtype", "auto") or "auto",
                 getattr(args, "max_model_len", None), device=device, calibration=calibration,
                 kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto") or "auto")
    if getattr(args, "json", False):
        print(json.dumps(e.to_dict(), indent=2))
    else:
        Console().print(estimate_table(e))
    return 0


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GiB', '512M', '2.5 GB', '1073741824' -> bytes (K/M/G alone are binary, as in most tools' flags)."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise InvalidRequestError(f"cannot read a size from {text!r}; write e.g. 8GiB, 512M or 2000000000") from None
    if unit not in _UNITS or value <= 0:
        raise InvalidRequestError(f"cannot read a size from {text!r}; write e.g. 8GiB, 512M or 2000000000")
    return int(value * _UNITS[unit])
