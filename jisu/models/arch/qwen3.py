"""Qwen3: Qwen2 without q/k/v biases, with an RMSNorm on every q and k head before rotary."""

from __future__ import annotations

from typing import Any

from jisu.models.arch.base import COMMON_GGUF_TENSORS, Architecture

QK_NORM_TENSORS = {
    "blk.{n}.attn_q_norm.weight": "model.layers.{n}.self_attn.q_norm.weight",
    "blk.{n}.attn_k_norm.weight": "model.layers.{n}.self_attn.k_norm.weight",
}


class Qwen3(Architecture):
    hf_name = "Qwen3ForCausalLM"
    model_type = "qwen3"
    gguf_name = "qwen3"
    gguf_tensors = COMMON_GGUF_TENSORS | QK_NORM_TENSORS

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        return {"attention_bias": f.boolean("attention_bias", default=False), "qk_norm": True,
                "hidden_act": self.activation(d, f, "hidden_act", "silu")}


ARCHITECTURES = {"Qwen3ForCausalLM": Qwen3()}
GGUF = {"qwen3": ARCHITECTURES["Qwen3ForCausalLM"]}
