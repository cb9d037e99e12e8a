"""Checks that a checkpoint's tensors agree with its config, run on the shapes the file headers state before
any tensor data is read or any model is built. Shared by the GGUF and Hugging Face loaders."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from jisu.errors import ModelConfigError, ModelLoadError
from jisu.models.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for every tensor a model of this config must have: the model's own parameters
    (built on the meta device, so nothing is allocated), fused projections by their shards' names."""
    from jisu.models.registry import model_class
    from jisu.models.weights import checkpoint_shapes

    # Its matrices are built on meta by the model itself; `with torch.device("meta")` around the rest (norms, a
    # one-position rotary table) would run them through meta's Python reference ops, which import torch._dynamo (1-2 s).
    model = model_class(config.architecture)(config, max_positions=1)
    return checkpoint_shapes(model)


def check_shape(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise ModelLoadError unless `name` belongs to the model and has the shape its config implies."""
    want = shapes.get(name)
    if want is None and name == "lm_head.weight":  # a tied checkpoint may still carry the head
        want = shapes["model.embed_tokens.weight"]
    if want is None:
        raise ModelLoadError(f"{what} does not belong to this model (wrong layer count in the config?)")
    if tuple(shape) != want:
        raise ModelLoadError(f"{what} has shape {tuple(shape)}, but the model config implies {want}")


def check_complete(tensors: Mapping[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    missing = [name for name in shapes if name not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")


def check_tensors_fit_config(
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    source: str,
    field_names: Mapping[str, str] | None = None,
    tensor_names: Mapping[str, str] | None = None,
) -> None:
    """Raise ModelConfigError naming the config field that disagrees with the tensors, then ModelLoadError
    for any tensor missing, extra or of the wrong shape.

    shapes: HF name -> shape of every tensor the files hold, as their headers state it. field_names maps
    config keys to the file's own names (GGUF metadata keys); tensor_names maps HF tensor names to the
    file's own (GGUF) tensor names, for messages.
    """
    fields, files = field_names or {}, tensor_names or {}

    def tensor(name: str) -> str:
        return files.get(name, name)

    def fail(key: str, value: int, why: str) -> None:
        raise ModelConfigError(f"{source}: {fields.get(key, key)} is {value}, but {why}")

    layers = sorted({int(m.group(1)) for name in shapes if (m := _LAYER.match(name))})
    if not layers:
        raise ModelLoadError(f"{source}: holds no layer tensors (model.layers.N.*, GGUF blk.N.*)")
    if config.num_hidden_layers != layers[-1] + 1:
        fail("num_hidden_layers", config.num_hidden_layers,
             f"the tensors hold layers 0 to {layers[-1]} ({layers[-1] + 1} layers)")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2:
        if embed[0] != config.vocab_size:
            fail("vocab_size", config.vocab_size, f"{tensor('model.embed_tokens.weight')} has {embed[0]} rows")
        if embed[1] != config.hidden_size:
            fail("hidden_size", config.hidden_size, f"{tensor('model.embed_tokens.weight')} has {embed[1]} columns")
    first = f"model.layers.{layers[0]}."
    gate = shapes.get(first + "mlp.gate_proj.weight")
    if gate is not None and gate[0] != config.intermediate_size:
        fail("intermediate_size", config.intermediate_size,
             f"{tensor(first + 'mlp.gate_proj.weight')} has {gate[0]} rows")
    d = config.head_dim
    for proj, key, heads in (("q_proj", "num_attention_heads", config.num_attention_heads),
                             ("k_proj", "num_key_value_heads", config.num_key_value_heads)):
        w = shapes.get(f"{first}self_attn.{proj}.weight")
        if w is not None and w[0] != heads * d:
            fail(key, heads, f"{heads} heads of {d} dimensions make {heads * d} rows, and "
                             f"{tensor(f'{first}self_attn.{proj}.weight')} has {w[0]}")
    want = expected_shapes(config)
    for name, shape in shapes.items():
        check_shape(name, shape, want, f"{source}: tensor {tensor(name)}" + (f" ({name})" if name in files else ""))
    check_complete(shapes, want, source)


# ----------------------------------------------------------------------------- Hugging Face folders


def weight_file_inside(folder: Path, name: Any, index: Path) -> Path:
    """The file a safetensors index names, which must be a relative path inside the model folder."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelLoadError(f"{index}: weight_map names {name!r}; allowed: a file name inside the model folder")
    rel = PurePosixPath(name)
    if rel.is_absolute() or PureWindowsPath(name).drive or "\\" in name or ".." in rel.parts:
        raise ModelLoadError(
            f"{index}: weight_map names {name!r}, which is outside the model folder; allowed: a file inside "
            f"{folder}"
        )
    path = folder / rel
    check_inside_folder(folder, path)
    return path


def check_inside_folder(folder: Path, path: Path) -> None:
    """Refuse a weight file that is a symlink out of the model folder: a folder from elsewhere must not make
    jisu read arbitrary files. A Hugging Face cache snapshot's links into its own blobs/ are allowed."""
    real, root = path.resolve(), folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    if not any(real.is_relative_to(r) for r in roots):
        raise ModelLoadError(
            f"{folder}: {path.relative_to(folder)} is a link to {real}, outside the model folder; weight files "
            "must lie inside it (copy the file in instead of linking it)"
        )


# safetensors dtype -> bits per element.
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file the library refused, in plain words naming the tensor; None
    when this reading finds nothing (the library's own message then stands). Reads only the header."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes is shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"its header length field says {n} bytes, but only {size - 8} bytes follow"
            if n > _SAFETENSORS_MAX_HEADER:
                return f"its header is {n} bytes; safetensors allows at most {_SAFETENSORS_MAX_HEADER}"
            raw = f.read(n)
    except OSError:
        return None
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        duplicates.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(items)

    try:
        header = json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:
        return f"its header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    if duplicates:
        return f"tensor {duplicates[0]!r} appears twice in the header"
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"the header entry for tensor {name!r} is not an object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_BITS:
            return f"tensor {name!r} has unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            return f"tensor {name!r} has shape {shape!r}; allowed: a list of non-negative integers"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end] with 0 <= begin <= end"
        elements = math.prod(shape)
        n_bytes = (elements * _SAFETENSORS_BITS[dtype] + 7) // 8
        begin, end = offsets
        if end - begin != n_bytes:
            return (f"tensor {name!r} ({dtype}, shape {shape}) needs {n_bytes} bytes, but its data_offsets "
                    f"{offsets} span {end - begin}")
        if end > data:
            return (f"tensor {name!r} has data_offsets {offsets}, past the {data} bytes of data after the header "
                    "(the file is cut short or the header lies)")
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin < covered:
            return f"the data of tensor {name!r} (data_offsets [{begin}, {end}]) overlaps the tensor before it"
        if begin > covered:
            return f"tensor {name!r} starts at data offset {begin}, leaving bytes {covered} to {begin} unused"
        covered = end
    if covered != data:
        return f"the tensors cover {covered} of the {data} bytes of data after the header"
    return None


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
