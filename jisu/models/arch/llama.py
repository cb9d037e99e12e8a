"""Llama, Mistral and Qwen2: the plain pre-norm decoder (RMSNorm, rotary, SwiGLU) every other module varies."""

from __future__ import annotations

from typing import Any

from jisu.models.arch.base import Architecture


class Llama(Architecture):
    hf_name = "LlamaForCausalLM"
    model_type = "llama"
    gguf_name = "llama"
    permute_gguf_qk = True

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        return {"attention_bias": f.boolean("attention_bias", default=False),
                "hidden_act": self.activation(d, f, "hidden_act", "silu")}


class Mistral(Llama):
    hf_name = "MistralForCausalLM"
    model_type = "mistral"

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        return super().config_fields(d, f, common) | self.optional_window(d, f)


class Qwen2(Llama):
    hf_name = "Qwen2ForCausalLM"
    model_type = "qwen2"
    gguf_name = "qwen2"
    permute_gguf_qk = False

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        return {"attention_bias": True,  # q/k/v always carry biases
                "hidden_act": self.activation(d, f, "hidden_act", "silu")}


ARCHITECTURES = {a.hf_name: a for a in (Llama(), Mistral(), Qwen2())}
GGUF = {"llama": ARCHITECTURES["LlamaForCausalLM"], "qwen2": ARCHITECTURES["Qwen2ForCausalLM"]}
