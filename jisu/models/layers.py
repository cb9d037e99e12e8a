"""Building blocks shared by the Llama family: norm, fused projections, the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MergedLinear(nn.Linear):
    """One matrix holding several checkpoint projections stacked along the output dimension.

    NOTE: fusing q/k/v and gate/up turns three (two) small products into one; at batch 1 each product is a
    separate pass over memory plus ~10 us of dispatch, so fewer, larger products are faster. The checkpoint
    keeps its own names; `shards` says where each one lands.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias, device="meta")
        self.shards = dict(shards)

    def shard_rows(self, name: str) -> slice:
        start = 0
        for shard, rows in self.shards.items():
            if shard == name:
                return slice(start, start + rows)
            start += rows
        raise KeyError(name)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias=False
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
