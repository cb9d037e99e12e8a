"""The sparse mixture-of-experts MLP of Mixtral and Qwen3-MoE: a router scores every expert for each token, the
top-k experts run, and their outputs are summed weighted by the router's probabilities.

Each expert is a GatedMLP of jisu Linears, so its matrices run on the C++ kernels (int8/int4 kept compressed) like
any other. A step runs each chosen expert once over all the tokens routed to it; a decode step of one token reads
only its k experts' matrices, which is why MoE models run well on CPUs: time per token follows the bytes of weights
read, and most experts are not read at all.

Parameter names are Qwen3-MoE's (`mlp.gate.weight`, `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`); other
layouts are renamed by their architecture's sanitize hook (split_stacked_experts below for transformers' stacked
3-D tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from jisu.models.layers import GatedMLP, Linear


class SparseMoE(nn.Module):
    """Router (`gate`, a Linear [num_experts, hidden]) and `experts`, each a GatedMLP of moe_intermediate_size."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
            for _ in range(config.num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, experts [T, k]) for tokens x [T, hidden]: softmax over all experts in
        float32, the k most probable, renormalised to sum to 1 when norm_topk_prob (Mixtral always; Qwen3-MoE per
        its config), as transformers computes them."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if x.shape[0] == 1:
            return self._one_token(x, weights[0], experts[0])
        return self._grouped(x, weights, experts)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # NOTE: the decode path: no sorting or gathering, only the k chosen experts run. The sum runs in ascending
        # expert order, as _grouped's does, so a sequence gets the same numbers alone or in a batch.
        chosen = experts.tolist()
        ws = weights.unbind()  # 0-d views in x's dtype: a Python float would be converted at every product
        out = torch.zeros_like(x)
        for i in sorted(range(len(chosen)), key=chosen.__getitem__):
            out += self.experts[chosen[i]](x) * ws[i]
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert: each chosen expert runs one product over its tokens; outputs are added back
        per token in ascending expert order."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        routed_weights = weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = tokens[start : start + n]
            out.index_add_(0, rows, self.experts[e](x[rows]) * routed_weights[start : start + n])
            start += n
        return out


# ----------------------------------------------------------------------------- checkpoint layouts

_STACKED_GATE_UP = ".mlp.experts.gate_up_proj"
_STACKED_DOWN = ".mlp.experts.down_proj"


def split_stacked_experts(name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
    """transformers >= 5 holds experts stacked: `mlp.experts.gate_up_proj` [E, 2 * I, H] (gate rows, then up) and
    `mlp.experts.down_proj` [E, H, I]. Those -> one matrix per expert under SparseMoE's names; any other tensor as
    it is. Works on meta tensors (header shapes) too. A stack of the wrong rank is left whole, for the shape check
    to refuse by name."""
    for suffix in (_STACKED_GATE_UP, _STACKED_DOWN):
        if name.endswith(suffix) and getattr(tensor, "ndim", 0) == 3:
            prefix = name[: -len(".gate_up_proj" if suffix == _STACKED_GATE_UP else ".down_proj")]
            for e in range(tensor.shape[0]):
                if suffix == _STACKED_DOWN:
                    yield f"{prefix}.{e}.down_proj.weight", tensor[e]
                    continue
                half = tensor.shape[1] // 2
                yield f"{prefix}.{e}.gate_proj.weight", tensor[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", tensor[e, half:]
            return
    yield name, tensor
