"""Mixtral: Mistral's decoder with a sparse mixture-of-experts MLP in every layer (jisu/models/moe.py): a router
over num_local_experts SwiGLU experts of intermediate_size, the top num_experts_per_tok renormalised.

Its checkpoints name the MoE block `block_sparse_moe` and an expert's matrices w1 (gate), w3 (up), w2 (down); the
sanitize hook renames them to SparseMoE's (Qwen3-MoE's) names. llama.cpp writes Mixtral as general.architecture
"llama" with {arch}.expert_count set (jisu.models.arch.for_gguf tells the two apart), its experts stacked per layer
(ffn_*_exps) or, in older files, one tensor per expert (ffn_gate.E).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from jisu.models.arch.base import COMMON_GGUF_TENSORS, Getter
from jisu.models.arch.llama import Mistral
from jisu.models.config import MAX_INTERMEDIATE
from jisu.models.moe import split_stacked_experts

MAX_EXPERTS = 4096
"""Far above any published MoE (Qwen3: 128, DeepSeek-V3: 256); a config past it is corrupt or hostile."""

# {e}: an expert's index. The *_exps tensors stack every expert ([experts, rows, cols]); the GGUF loader cuts
# them into one matrix per expert.
MOE_GGUF_TENSORS: dict[str, str] = {
    "blk.{n}.ffn_gate_inp.weight": "model.layers.{n}.mlp.gate.weight",
    "blk.{n}.ffn_gate_exps.weight": "model.layers.{n}.mlp.experts.{e}.gate_proj.weight",
    "blk.{n}.ffn_up_exps.weight": "model.layers.{n}.mlp.experts.{e}.up_proj.weight",
    "blk.{n}.ffn_down_exps.weight": "model.layers.{n}.mlp.experts.{e}.down_proj.weight",
    # Files converted before llama.cpp stacked experts (early 2024).
    "blk.{n}.ffn_gate.{e}.weight": "model.layers.{n}.mlp.experts.{e}.gate_proj.weight",
    "blk.{n}.ffn_up.{e}.weight": "model.layers.{n}.mlp.experts.{e}.up_proj.weight",
    "blk.{n}.ffn_down.{e}.weight": "model.layers.{n}.mlp.experts.{e}.down_proj.weight",
}

_EXPERT_MATRIX = re.compile(r"\.experts\.(\d+)\.w([123])\.")
_W_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
"""config.json's expert count, under either name: transformers maps one onto the other for Mixtral and Qwen3-MoE
(and writes Qwen3-MoE's as num_local_experts, which the published configs call num_experts)."""


def moe_fields(d: dict[str, Any], f: Any, intermediate_key: str, norm_topk_prob: bool) -> dict[str, Any]:
    """The ModelConfig MoE fields, read from config.json (`intermediate_key`: where the experts' size is)."""
    experts_key = next((k for k in EXPERT_COUNT_KEYS if d.get(k) is not None), EXPERT_COUNT_KEYS[0])
    experts = f.integer(experts_key, 1, MAX_EXPERTS)
    return {
        "num_experts": experts,
        "num_experts_per_tok": f.integer("num_experts_per_tok", 1, experts,
                                         what=f"an integer from 1 to {experts_key} ({experts})"),
        "moe_intermediate_size": f.integer(intermediate_key, 1, MAX_INTERMEDIATE),
        "norm_topk_prob": norm_topk_prob,
    }


class Mixtral(Mistral):
    hf_name = "MixtralForCausalLM"
    model_type = "mixtral"
    gguf_tensors = COMMON_GGUF_TENSORS | MOE_GGUF_TENSORS

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        return super().config_fields(d, f, common) | moe_fields(d, f, "intermediate_size", True)

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"num_local_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count")}

    def sanitize(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = _EXPERT_MATRIX.sub(lambda m: f".experts.{m.group(1)}.{_W_NAMES[m.group(2)]}.", name)
        yield from split_stacked_experts(name, tensor)


ARCHITECTURES = {"MixtralForCausalLM": Mixtral()}
GGUF: dict[str, Mixtral] = {}
"""None of its own: llama.cpp writes Mixtral as "llama" (see jisu.models.arch.for_gguf)."""
