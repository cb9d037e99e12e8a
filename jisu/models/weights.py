"""Checkpoint tensors -> a model's parameters, in steps: place each tensor (shape check, its rows inside a fused
projection, the stored layout), assemble fused matrices, tie the output layer, then bind every matrix to the
kernels that run it.

Tensors are named as in Hugging Face checkpoints (an architecture's sanitize hook has renamed the rest). A fused
projection (MergedLinear) declares its shards: a checkpoint may hold them apart (q_proj, k_proj, v_proj) or
already fused under the projection's own name (Phi-3's qkv_proj), and either loads.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from jisu.capabilities import low_bit_support
from jisu.errors import ModelLoadError
from jisu.kernels.build import cpu_linear_kernels
from jisu.kernels.torch_int4 import TorchInt4Kernels, TorchInt4Weight
from jisu.models.layers import GateAndMul, Linear, MergedLinear, QuantizedEmbedding, RMSNorm
from jisu.models.rotary import pairs_adjacent
from jisu.quant.formats import QuantizedTensor, concat_rows, quantize

EMBED = "model.embed_tokens.weight"
OUTPUT = "lm_head.weight"


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored in-major: the layout for torch's kernels when jisu's are unavailable.

    NOTE: measured on this project's CPUs (AVX2, 2 threads), F.linear with one input row runs 1.4x faster on
    the 30 SmolLM2 layers and 2.2x faster on its 49152-row output layer when the weight's storage is
    [in, out], and about the same for larger batches. A tied output layer then gets its own copy rather than
    sharing the embedding's row-major storage.
    """
    return weight.t().contiguous().t()


def load_weights(model: nn.Module, tensors: dict, dtype: torch.dtype, device: torch.device, cpu_kernels: bool = True,
                 act_bits: int = 16) -> None:
    """Materialises every parameter of `model` (a DecoderForCausalLM) from `tensors`. Tensors may be
    QuantizedTensor: those matrices run on jisu's int8/int4 C++ kernels as they are, with activations rounded to
    int16 (act_bits 16; int4's to int8 with 8) or kept float32 (32) at decode (see jisu/kernels/qlinear.h); where those are not in use
    (CUDA), int4 runs on torch's int4 kernel (jisu/kernels/torch_int4.py)."""
    support = low_bit_support(device, dtype, cpu_kernels)
    kernels = cpu_linear_kernels() if support.cpu_kernels else None
    for t in tensors.values():
        if isinstance(t, QuantizedTensor) and t.format not in support.kernels:
            raise ModelLoadError(f"{t.describe()} weights cannot run here: {support.refusals[t.format]}; "
                                 "load float weights instead")
    with _one_thread():
        _load_weights(model, tensors, dtype, device, kernels, act_bits)


@contextmanager
def _one_thread():
    """torch (and the kernels' repacking) on one thread while weights are placed.
    NOTE: placing is ~1,000 small copies (q/k row order, fused shards, int4 repacking), each too short to gain from
    a second thread; but each parallel one waits for every thread of the team, and on a 2-core machine where another
    process keeps a core busy that wait is a scheduler time slice: SmolLM2's placement took 0.6-1.1 s on 2 threads
    and 0.26-0.40 s on one, measured alternately on such a machine (issue 25)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_weights(model: nn.Module, tensors: dict, dtype: torch.dtype, device: torch.device, kernels,
                  act_bits: int) -> None:
    floats, quantized = place(model, tensors, dtype, device)
    if model.config.output_is_tied(tensors):
        if EMBED in floats:
            floats[OUTPUT] = floats[EMBED]
        if EMBED in quantized:
            quantized[OUTPUT] = quantized[EMBED]
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(floats) - set(quantized))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks tensors: {shown}")
    _bind(model, floats, quantized, kernels is None, dtype, device)
    tied = EMBED in quantized and quantized.get(OUTPUT) is quantized[EMBED]
    any_quantized = bool(quantized)
    # The modules hold the placed matrices now. Without these references each goes as soon as the kernels have
    # their own copy (int4 is repacked), so a load does not hold two whole copies of the low-bit weights at once.
    floats.clear()
    quantized.clear()
    if kernels is not None:
        _bind_cpu_kernels(model, kernels, tied, act_bits)
    elif any_quantized:
        for module in model.modules():
            if isinstance(module, Linear) and module.quantized is not None:
                bias = None if module.bias is None else module.bias.data
                module.use_kernels(TorchInt4Kernels, TorchInt4Weight(module.quantized, bias, device))
                module.quantized = module.quantized.shape_only()  # torch's tiles are the only copy
    for m in model.modules():
        if m.__class__.__name__ == "RotaryEmbedding":
            m.to(device)


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor a checkpoint for `model` must hold (fused projections by their
    shards' names; the output matrix only when it is not tied)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                parent = module_name.rpartition(".")[0]
                for shard in module.shards:
                    rows = module.shard_rows(shard)
                    shapes[f"{parent}.{shard}.{attr}"] = (rows.stop - rows.start, *p.shape[1:])
            else:
                shapes[f"{module_name}.{attr}"] = tuple(p.shape)
    if model.config.tie_word_embeddings:
        shapes.pop(OUTPUT, None)
    return shapes


def place(model: nn.Module, tensors: dict, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """Checkpoint tensors -> (float parameters by name, QuantizedTensor matrices by name), every shape checked
    against the model, fused projections assembled from their shards."""
    params = dict(model.named_parameters())
    floats: dict[str, torch.Tensor] = {}
    shards: dict[str, list] = {}
    # A fused matrix with any quantized shard is assembled quantized (float shards are converted).
    quantized_targets = {param_for(model, n)[0] for n, t in tensors.items() if isinstance(t, QuantizedTensor)}
    for name, tensor in _split_fused(model, tensors):
        target, rows = param_for(model, name)
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {model.config.architecture}")
        want = params[target].shape if rows is None else (rows.stop - rows.start, *params[target].shape[1:])
        if tuple(want) != tuple(tensor.shape):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(want)}")
        tensor = stored_layout(model.config, name, tensor)
        if target in quantized_targets:
            shards.setdefault(target, []).append((0 if rows is None else rows.start, tensor))
            continue
        if target not in floats:
            floats[target] = torch.empty(params[target].shape, dtype=dtype, device=device)
        dest = floats[target] if rows is None else floats[target][rows]
        dest.copy_(tensor)
    # A matrix of one shard is the checkpoint's own (no copy: the kernels repack int4 into their own layout, and
    # int8 is read where it lies, e.g. in the converted-model cache's mapping of the file).
    quantized = {t: _stack(unify([p for _, p in sorted(parts, key=lambda x: x[0])], t)) for t, parts in shards.items()}
    return floats, quantized


def _stack(parts: list[QuantizedTensor]) -> QuantizedTensor:
    return parts[0] if len(parts) == 1 else concat_rows(parts)


def fused_splitter(config):
    """name, tensor -> the (name, tensor) pairs a checkpoint tensor stands for: a fused projection held whole (Phi-3's
    qkv_proj, GPT-2's c_attn once renamed) as its declared shards, so checks and quantization see each projection's
    own name; any other tensor as it is. Meta tensors too."""
    from jisu.models.registry import model_class

    # NOTE: not under `with torch.device("meta")`: its matrices are built on meta anyway, and running the rest (a
    # one-position rotary table, norm weights) through meta's Python reference ops imports torch._dynamo, 1-2 s.
    model = model_class(config.architecture)(config, max_positions=1)
    return lambda name, tensor: list(_split_fused(model, {name: tensor}))


def _split_fused(model: nn.Module, tensors: dict):
    """(name, tensor) pairs with a fused projection held whole (e.g. Phi-3's qkv_proj) cut into its shards, so
    each shard gets its own stored layout."""
    for name, tensor in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = _submodule(model, module_name)
        if not isinstance(module, MergedLinear):
            yield name, tensor
            continue
        if tensor.shape[0] != module.out_features:
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {module.out_features} rows"
            )
        parent = module_name.rpartition(".")[0]
        for shard in module.shards:
            rows = module.shard_rows(shard)
            yield f"{parent}.{shard}.{attr}", _rows(tensor, rows)


def _rows(tensor, rows: slice):
    if isinstance(tensor, QuantizedTensor):
        return tensor.select_rows(torch.arange(rows.start, rows.stop))
    return tensor[rows]


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def stored_layout(config, name: str, tensor):
    """q/k projections (and q/k norms) are stored with rotary pairs adjacent (see RotaryEmbedding)."""
    leaf = name.rsplit(".", 2)[-2]
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads, "q_norm": 1,
             "k_norm": 1}.get(leaf)
    if heads is None:
        return tensor
    if isinstance(tensor, QuantizedTensor):
        return tensor.map_rows(lambda rows: pairs_adjacent(rows, heads, config.rotary_dim))
    return pairs_adjacent(tensor, heads, config.rotary_dim)


def param_for(model: nn.Module, name: str) -> tuple[str, slice | None]:
    """Checkpoint name -> (parameter name, rows inside a fused projection or None)."""
    module_name, _, attr = name.rpartition(".")
    parent_name, _, leaf = module_name.rpartition(".")
    if parent_name:
        parent = _submodule(model, parent_name)
        if parent is None:
            return name, None
        for child_name, child in parent.named_children():
            if isinstance(child, MergedLinear) and leaf in child.shards:
                return f"{parent_name}.{child_name}.{attr}", child.shard_rows(leaf)
    return name, None


def unify(parts: list[QuantizedTensor | torch.Tensor], name: str) -> list[QuantizedTensor]:
    """Shards stacked into one fused matrix (q/k/v, gate/up) must share a format: a float shard takes the
    others' format; shards of different formats (llama.cpp's mixes) are all requantized to int8 with group
    32, which loses least."""
    quantized = [p for p in parts if isinstance(p, QuantizedTensor)]
    first = quantized[0]
    if all(p.bits == first.bits and p.group_size == first.group_size for p in quantized):
        return [p if isinstance(p, QuantizedTensor) else quantize(p.float(), first.format, first.group_size, name)
                for p in parts]
    floats = [p.dequantize() if isinstance(p, QuantizedTensor) else p.float() for p in parts]
    k = floats[0].shape[1]
    return [quantize(f, "int8", 32 if k % 32 == 0 else None, name) for f in floats]


def _bind(model: nn.Module, floats: dict, quantized: dict, torch_layout: bool, dtype, device) -> None:
    for name, value in floats.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, Linear) and torch_layout and attr == "weight" and value.device.type == "cpu":
            value = column_major(value)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    for name, value in quantized.items():
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantizedEmbedding(value.to(device), dtype))
        else:
            module.weight = None
            module.quantized = value
            module.weight_format = value.describe()


def _bind_cpu_kernels(model: nn.Module, kernels, tied: bool, act_bits: int) -> None:
    """tied: the output layer's matrix is the embedding's (one kernel copy serves both)."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, GateAndMul)):
            module.use_kernels(kernels)
        if isinstance(module, Linear):
            bias = None if module.bias is None else module.bias.data
            q = module.quantized
            kw = q.to_kernel(kernels, bias) if q is not None else kernels.QWeight(32, module.weight.data, bias=bias)
            kw.act_bits = act_bits
            module.use_kernels(kernels, kw)
            if q is not None and kw.repacked:
                module.quantized = q.shape_only()  # keep one copy of the blocks: the kernels'
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        kw = model.lm_head.kernel_weight if tied else embed.quantized.to_kernel(kernels)
        embed.use_kernels(kernels, kw)
        if kw.repacked:
            embed.quantized = embed.quantized.shape_only()
