"""GPT-2: LayerNorms with biases, learned absolute positions added to the token embeddings (no RoPE), an ungated
GELU MLP, biases on every projection, a tied output layer.

Its checkpoints store projections as Conv1D weights, [in, out], and q/k/v as one matrix (c_attn); sanitize renames
them to the decoder's names (c_attn -> self_attn.qkv_proj, c_fc -> mlp.up_proj, c_proj -> o_proj / mlp.down_proj)
and transposes them to [out, in]. The fused qkv_proj is then split into q/k/v like any other."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from jisu.models.arch.base import Architecture, Getter

_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
# GPT-2 name (after "transformer.") -> the decoder's; per layer below.
_TOP = {
    "wte.weight": "model.embed_tokens.weight",
    "wpe.weight": "model.embed_positions.weight",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}
_PER_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_attn": "self_attn.qkv_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BUFFERS = ("attn.bias", "attn.masked_bias")
"""The causal mask older checkpoints saved as tensors; the attention builds its own."""

_GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "position_embd.weight": "model.embed_positions.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
} | {
    f"blk.{{n}}.{gguf}.{attr}": f"model.layers.{{n}}.{hf}.{attr}"
    for gguf, hf in (("attn_norm", "input_layernorm"), ("attn_qkv", "self_attn.qkv_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"))
    for attr in ("weight", "bias")
}
# config.json's GPT-2 keys -> the names from_hf_dict reads.
_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
         "n_positions": "max_position_embeddings", "layer_norm_epsilon": "rms_norm_eps"}


class GPT2(Architecture):
    hf_name = "GPT2LMHeadModel"
    model_type = "gpt2"
    gguf_name = "gpt2"
    gguf_tensors = _GGUF_TENSORS

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        for gpt2_key, key in _KEYS.items():
            if d.get(gpt2_key) is not None:
                d[key] = d[gpt2_key]
        d.setdefault("rms_norm_eps", 1e-5)  # GPT2Config's layer_norm_epsilon default
        d.setdefault("max_position_embeddings", 1024)
        d.setdefault("tie_word_embeddings", True)
        if d.get("intermediate_size") is None:
            inner, hidden = d.get("n_inner"), d.get("hidden_size")
            d["intermediate_size"] = inner if inner is not None else (4 * hidden if isinstance(hidden, int) else None)
        d.pop("head_dim", None)  # GPT-2's heads are always hidden_size / n_head
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        act = self.activation(d, f, "activation_function", "gelu_new")
        if f.boolean("scale_attn_by_inverse_layer_idx", default=False):
            f.fail("scale_attn_by_inverse_layer_idx", True, "false (jisu scales every layer's attention alike)")
        if f.boolean("add_cross_attention", default=False):
            f.fail("add_cross_attention", True, "false (a decoder-only model)")
        fields: dict[str, Any] = {
            "norm_type": "layer",
            "gated_mlp": False,
            "hidden_act": act,
            "learned_positions": True,
            "attention_bias": True,
            "o_bias": True,
            "mlp_bias": True,
        }
        if not f.boolean("scale_attn_weights", default=True):
            fields["attn_scale"] = 1.0
        return fields

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"rms_norm_eps": get("attention.layer_norm_epsilon", 1e-5)}

    def sanitize(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        plain = name.removeprefix("transformer.")
        if plain in _TOP:
            yield _TOP[plain], tensor
            return
        m = _LAYER.match(plain)
        if m is None:  # lm_head.weight, or a name already the decoder's (a folder jisu saved)
            yield name, tensor
            return
        layer, rest = m.groups()
        if rest in _BUFFERS:
            return
        module, _, attr = rest.rpartition(".")
        if module not in _PER_LAYER:
            yield name, tensor  # not GPT-2's: the shape check names it
            return
        if module in _CONV1D and attr == "weight":
            tensor = tensor.t().contiguous()  # Conv1D keeps [in, out]
        yield f"model.layers.{layer}.{_PER_LAYER[module]}.{attr}", tensor


ARCHITECTURES = {"GPT2LMHeadModel": GPT2()}
GGUF = {"gpt2": ARCHITECTURES["GPT2LMHeadModel"]}
