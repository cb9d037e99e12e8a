"""Qwen3-MoE: Qwen3's attention (q/k norms, no biases) with a sparse mixture-of-experts MLP (jisu/models/moe.py):
num_experts SwiGLU experts of moe_intermediate_size, the top num_experts_per_tok renormalised only when
norm_topk_prob. Layers listed in mlp_only_layers, or off the decoder_sparse_step stride, keep a dense MLP of
intermediate_size. Checkpoints already use SparseMoE's names; transformers' stacked 3-D experts are split per expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jisu.models.arch.base import Getter
from jisu.models.arch.mixtral import MOE_GGUF_TENSORS, moe_fields
from jisu.models.arch.qwen3 import Qwen3
from jisu.models.moe import split_stacked_experts


class Qwen3Moe(Qwen3):
    hf_name = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    gguf_name = "qwen3moe"
    gguf_tensors = Qwen3.gguf_tensors | MOE_GGUF_TENSORS

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        fields = super().config_fields(d, f, common)
        # transformers' default is False; the published Qwen3-MoE configs all say true.
        fields |= moe_fields(d, f, "moe_intermediate_size", f.boolean("norm_topk_prob", default=False))
        n = common["num_hidden_layers"]
        step = f.integer("decoder_sparse_step", 1, n, default=1)
        dense = d.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
            f.fail("mlp_only_layers", dense, "a list of layer indices")
        # As transformers decides: a layer is MoE unless listed dense, and only every step-th layer is.
        moe = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
        fields["moe_layers"] = () if all(moe) else moe
        return fields

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        layers = get("block_count")
        out: dict[str, Any] = {
            "num_experts": get("expert_count"),
            "num_experts_per_tok": get("expert_used_count"),
            "moe_intermediate_size": get("expert_feed_forward_length"),
            # llama.cpp always renormalises Qwen3-MoE's top-k weights.
            "norm_topk_prob": get("expert_weights_norm", True),
        }
        if isinstance(layers, int) and 0 < layers <= 1024:  # layers without a router are dense
            out["mlp_only_layers"] = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
        return out

    def sanitize(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        yield from split_stacked_experts(name, tensor)


ARCHITECTURES = {"Qwen3MoeForCausalLM": Qwen3Moe()}
GGUF = {"qwen3moe": ARCHITECTURES["Qwen3MoeForCausalLM"]}
