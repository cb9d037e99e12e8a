"""GGUF output for `jisu quantize`, where GGUF has a block type for the format: int8 with group 32 is Q8_0,
int4 with group 32 (scale and zero per group) is Q4_1. The source must be a GGUF file: its metadata
(tokenizer included) is copied as it is and only the tensors change, so llama.cpp reads the result too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

from jisu.errors import InvalidRequestError
from jisu.loader.gguf import hf_tensor_name, open_gguf, read_metadata
from jisu.models.rotary import pairs_adjacent
from jisu.quant.formats import QuantizedTensor

Q = GGMLQuantizationType


def gguf_blocks(t: QuantizedTensor, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """[rows, blocks * block bytes] uint8 in GGUF's Q8_0 / Q4_1 layout."""
    n, k = t.shape
    if t.group_size != 32:
        raise InvalidRequestError(
            f"{name}: GGUF has no block type for {t.describe()}; GGUF output takes int8-g32 (Q8_0) or int4 "
            f"group 32 (Q4_1); write a safetensors folder for other group sizes"
        )
    d = t.scales.to(torch.float16).reshape(n, k // 32, 1).view(torch.uint8)  # [n, blocks, 2]
    if t.bits == 8:
        q = t.qweight.reshape(n, k // 32, 32).view(torch.uint8)
        return torch.cat([d, q], dim=2).reshape(n, -1).numpy(), Q.Q8_0
    m = t.zeros.to(torch.float16).reshape(n, k // 32, 1).view(torch.uint8)
    q = t.qweight.reshape(n, k // 32, 16)
    return torch.cat([d, m, q], dim=2).reshape(n, -1).numpy(), Q.Q4_1


GGUF_OUTPUT_ARCHITECTURES = ("llama", "qwen2")
"""Architectures whose tensors this writer names and lays out as llama.cpp does (the common name table, llama's
q/k row order); others would get wrong names (Gemma's ffn_norm) or values (Gemma's 1 + w norms)."""


def write_gguf(source: str | Path, out: str | Path, tensors: dict, config, bits: int) -> Path:
    """Writes `tensors` (HF names: float tensors or QuantizedTensor) with the metadata of GGUF file `source`."""
    reader = open_gguf(source)
    meta = read_metadata(reader)
    arch = meta["general.architecture"]
    if arch not in GGUF_OUTPUT_ARCHITECTURES or meta.get(f"{arch}.expert_count"):
        raise InvalidRequestError(
            f"GGUF output is written for {', '.join(GGUF_OUTPUT_ARCHITECTURES)} files (not MoE), not {arch!r}; "
            "write a safetensors folder instead"
        )
    out = Path(out)
    writer = GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_1 if bits == 4 else LlamaFileType.MOSTLY_Q8_0)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for t in reader.tensors:
        hf = hf_tensor_name(t.name)
        if hf is None:  # e.g. rope_freqs: carried over as it is
            writer.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(list(t.shape))), raw_dtype=t.tensor_type)
            continue
        value = tensors[hf]
        leaf = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if arch == "llama" and leaf in heads:
            # llama.cpp's q/k row order is rotary pairs adjacent: the same order jisu's model stores
            permute = lambda rows, h=heads[leaf]: pairs_adjacent(rows, h).contiguous()  # noqa: E731
            value = value.map_rows(permute) if isinstance(value, QuantizedTensor) else permute(value)
        if isinstance(value, QuantizedTensor):
            data, qtype = gguf_blocks(value, hf)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, value.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
