"""Gemma 2 and Gemma 3 (text): sandwich norms around attention and the MLP, `(1 + w)` RMSNorm, embeddings scaled
by sqrt(hidden), GELU-tanh gating, sliding-window layers interleaved with global ones; Gemma 2 soft-caps
attention scores and final logits, Gemma 3 normalises q and k and gives sliding layers their own RoPE base."""

from __future__ import annotations

import math
from typing import Any

import torch

from jisu.models.arch.base import COMMON_GGUF_TENSORS, Architecture, Getter
from jisu.models.arch.qwen3 import QK_NORM_TENSORS
from jisu.models.config import MAX_CONTEXT

_GEMMA_TENSORS = COMMON_GGUF_TENSORS | {
    # Gemma's post_attention_layernorm follows attention (before the residual add); its MLP norm is separate.
    "blk.{n}.post_attention_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.pre_feedforward_layernorm.weight",
    "blk.{n}.post_ffw_norm.weight": "model.layers.{n}.post_feedforward_layernorm.weight",
}


class Gemma2(Architecture):
    hf_name = "Gemma2ForCausalLM"
    model_type = "gemma2"
    gguf_name = "gemma2"
    gguf_tensors = _GEMMA_TENSORS
    pattern = 2
    """llama.cpp's sliding-window pattern: of every `pattern` layers, all but the last are sliding."""

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d.setdefault("tie_word_embeddings", True)  # transformers' default for Gemma; configs often omit it
        if not d.get("layer_types") and d.get("num_hidden_layers") is not None:
            n = d["num_hidden_layers"]
            if isinstance(n, int) and 0 < n <= 1024:
                p = d.get("sliding_window_pattern") or self.pattern
                p = p if isinstance(p, int) and p > 0 else self.pattern
                d["layer_types"] = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        key = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
        act = self.activation(d, f, key, "gelu_pytorch_tanh")
        window = f.integer("sliding_window", 1, MAX_CONTEXT, default=4096)
        scalar = f.number("query_pre_attn_scalar", 0.0, 1e9, default=float(common["head_dim"]),
                          what="a number above 0", above=True)
        fields = {
            "norm_unit_offset": True,
            "sandwich_norm": True,
            "hidden_act": act,
            "embed_scale": float(torch.tensor(math.sqrt(common["hidden_size"]), dtype=torch.float32)),
            "attn_scale": scalar**-0.5,
            "layer_types": self.layer_types(d.get("layer_types"), f, common["num_hidden_layers"]),
            "sliding_window": window,
            "attention_bias": f.boolean("attention_bias", default=False),
        }
        for key, field in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
            if d.get(key) is not None:
                fields[field] = f.number(key, 0.0, 1e6, what="a number above 0, or null", above=True)
        return fields

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        layers, heads, hidden = get("block_count"), get("attention.head_count"), get("embedding_length")
        key_length = get("attention.key_length")
        out: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensors}
        if isinstance(layers, int) and 0 < layers <= 1024:
            out["layer_types"] = [
                "sliding_attention" if i % self.pattern < self.pattern - 1 else "full_attention" for i in range(layers)
            ]
        # llama.cpp scales queries by 1/sqrt(head size), except the 27B models (62 or 46 layers) by hidden/heads.
        if layers in (46, 62) and isinstance(hidden, int) and isinstance(heads, int) and heads:
            out["query_pre_attn_scalar"] = hidden // heads
        elif key_length is not None:
            out["query_pre_attn_scalar"] = key_length
        if get("attention.sliding_window") is not None:
            out["sliding_window"] = get("attention.sliding_window")
        for gguf_key, key in (("attn_logit_softcapping", "attn_logit_softcapping"),
                              ("final_logit_softcapping", "final_logit_softcapping")):
            if get(gguf_key) is not None:
                out[key] = get(gguf_key)
        return out

    def sanitize_gguf(self, name: str, tensor: Any) -> Any:
        # llama.cpp's converter stores Gemma's norm weights as 1 + w; the model keeps Hugging Face's w.
        return tensor - 1 if name.endswith("norm.weight") else tensor


class Gemma3(Gemma2):
    hf_name = "Gemma3ForCausalLM"
    model_type = "gemma3_text"
    gguf_name = "gemma3"
    gguf_tensors = _GEMMA_TENSORS | QK_NORM_TENSORS
    pattern = 6

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        d = super().normalize(d)
        params = d.get("rope_parameters")
        # transformers >= 5 nests RoPE per layer type; older configs give rope_local_base_freq beside rope_theta.
        if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
            local = params.get("sliding_attention") or {}
            d["rope_parameters"] = params["full_attention"]
            if isinstance(local, dict) and local.get("rope_theta") is not None:
                d["rope_local_base_freq"] = local["rope_theta"]
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        fields = super().config_fields(d, f, common)
        fields["qk_norm"] = True
        fields["rope_local_theta"] = f.number("rope_local_base_freq", 1.0, 1e12, default=10000.0,
                                              what="a finite number above 1", above=True)
        return fields

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        out = super().gguf_config(get, tensors)
        out["rope_local_base_freq"] = 10000.0  # llama.cpp's fixed base for Gemma 3's sliding layers
        return out


ARCHITECTURES = {a.hf_name: a for a in (Gemma2(), Gemma3())}
GGUF = {"gemma2": ARCHITECTURES["Gemma2ForCausalLM"], "gemma3": ARCHITECTURES["Gemma3ForCausalLM"]}
