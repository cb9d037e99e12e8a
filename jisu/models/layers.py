"""Building blocks of the decoder (jisu/models/decoder.py): norms, fused projections, the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. unit_offset (Gemma): the weight is stored as checkpoints hold it, w, and
    applied as (1 + w); the sum is made once per weight, not per call."""

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.unit_offset = unit_offset
        self._applied: tuple[object, torch.Tensor] | None = None
        self.kernels = None
        """jisu's C++ kernels once the loader binds them (CPU): float32 rows then take rowwise.cpp's norm."""

    def applied_weight(self) -> torch.Tensor:
        """The weight the normalised values are multiplied by."""
        w = self.weight
        if not self.unit_offset:
            return w
        key = (w.data_ptr(), w._version)
        if self._applied is None or self._applied[0] != key:
            self._applied = (key, (w.float() + 1).to(w.dtype))
        return self._applied[1]

    def use_kernels(self, kernels) -> None:
        # NOTE: the fused decoder's own norm (rowwise.h): prompt rows normalised here and decode rows normalised
        # there get the same bits, and it is faster than F.rms_norm's composite on CPU (512 x 576 rows, 2 threads:
        # 0.19 -> 0.05 ms).
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.applied_weight()
        if self.kernels is not None and x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu":
            return self.kernels.rms_norm_rows(x, w, self.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with a bias over the last dimension (GPT-2)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(config, size: int | None = None) -> nn.Module:
    """The norm the config's architecture uses, over `size` values (default: hidden_size)."""
    size = size or config.hidden_size
    if config.norm_type == "layer":
        return LayerNorm(size, config.rms_norm_eps)
    return RMSNorm(size, config.rms_norm_eps, config.norm_unit_offset)


class Linear(nn.Linear):
    """nn.Linear (built on the meta device, filled by the loader) that runs on jisu's CPU kernels when they are
    available.

    `kernel_weight` is the matrix as the C++ kernels hold it (a `QWeight`: float32, int8 or int4, see
    jisu/kernels/qlinear.h); when it is set, `weight` may be None (a quantized matrix has no float copy) and
    every product goes through the kernels. Without it this is plain F.linear over `weight`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.kernel_weight = None
        self.kernels = None
        self.quantized = None
        """The matrix as a QuantizedTensor when it is int8/int4 (then `weight` is None)."""
        self.weight_format = "float"
        """'float' or the low-bit format's description, e.g. 'int4 (group 32)'; set by the loader."""

    def use_kernels(self, kernels, kernel_weight) -> None:
        self.kernels, self.kernel_weight = kernels, kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None:
            return self.kernels.qlinear(x, self.kernel_weight)
        return F.linear(x, self.weight, self.bias)


class QuantizedEmbedding(nn.Module):
    """Token embedding over an int8/int4 matrix (usually the one a tied output layer multiplies by): only the
    rows looked up are dequantized, by the C++ kernels once `use_kernels` gave it their copy of the matrix
    (a tied output layer's own: one copy for both)."""

    def __init__(self, quantized, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.quantized = quantized
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = quantized.shape
        self.kernels = self.kernel_weight = None

    def use_kernels(self, kernels, kernel_weight) -> None:
        # NOTE: a decode step looks up one row: ~10 torch ops on the blocks measured 83 us of a ~3.9 ms SmolLM2
        # step, one kernel call a few us; the same float32 numbers either way (scale * q is exact).
        self.kernels, self.kernel_weight = kernels, kernel_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None:
            rows = self.kernels.qweight_dequantize(self.kernel_weight, ids)
        else:
            rows = self.quantized.select_rows(ids.reshape(-1)).dequantize()
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)


class MergedLinear(Linear):
    """One matrix holding several checkpoint projections stacked along the output dimension.

    NOTE: fusing q/k/v and gate/up turns three (two) small products into one; at batch 1 each product is a
    separate pass over memory plus ~10 us of dispatch, so fewer, larger products are faster. The checkpoint
    keeps its own names; `shards` says where each one lands.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards = dict(shards)

    def shard_rows(self, name: str) -> slice:
        start = 0
        for shard, rows in self.shards.items():
            if shard == name:
                return slice(start, start + rows)
            start += rows
        raise KeyError(name)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
KERNEL_ACTIVATIONS = ("silu", "gelu_tanh")
"""The gated activations jisu's C++ kernels compute (rowwise.h); others stay on torch."""


class GateAndMul(nn.Module):
    """act(gate) * up (SiLU: SwiGLU; GELU-tanh: GeGLU). A module (not an inline expression) so the profiler can
    time activations apart."""

    def __init__(self, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.act = act
        self._fn = ACTIVATIONS[act]
        self.kernels = None
        """jisu's C++ kernels once the loader binds them (CPU): float32 rows then take rowwise.cpp's gating."""

    def use_kernels(self, kernels) -> None:
        # NOTE: the fused decoder's own gating (rowwise.h), for the same reason as RMSNorm's; one pass instead of
        # torch's silu over a strided half and a multiply (512 x 2 x 1536, 2 threads: 0.67 -> 0.27 ms).
        self.kernels = kernels if self.act in KERNEL_ACTIVATIONS else None

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and gate_up.dtype == torch.float32 and gate_up.device.type == "cpu":
            return self.kernels.gated_activation(gate_up, self.act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self._fn(gate) * up


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one product."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias=bias
        )
        self.act_fn = GateAndMul(intermediate_size, act)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Activation(nn.Module):
    """act(x), a module so the profiler can time activations apart."""

    def __init__(self, act: str):
        super().__init__()
        self.act = act
        self._fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class MLP(nn.Module):
    """down(act(up(x))): the ungated MLP (GPT-2's c_fc -> GELU -> c_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.act_fn = Activation(act)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def make_mlp(config, layer: int) -> nn.Module:
    """The MLP of one layer: sparse MoE (jisu/models/moe.py), gated, or plain."""
    if config.layer_is_moe(layer):
        from jisu.models.moe import SparseMoE

        return SparseMoE(config)
    if config.gated_mlp:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
    return MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)


def weight_bytes_held(model: nn.Module) -> int:
    """Bytes of distinct weight storage a loaded model holds: parameters, int8/int4 blocks with their scales and
    zeros (and int8's outlier columns), and int4 matrices whose only copy is the C++ kernels' row quads (their
    layer keeps a shape-only QuantizedTensor; counted at its block bytes, without the padding of a last partial
    quad)."""
    seen: dict[object, int] = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    for m in model.modules():
        q = getattr(m, "quantized", None)
        if q is None:
            continue
        if q.qweight.is_meta:
            seen[("kernels", id(m))] = q.nbytes
            continue
        for t in (q.qweight, q.scales, q.zeros, q.outlier_cols, q.outlier_weights):
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
