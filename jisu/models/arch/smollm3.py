"""SmolLM3: Llama's decoder where some layers apply no RoPE at all (NoPE): by default every 4th (layers 3, 7, ...).
config.json's `no_rope_layers` lists per layer 1 for a layer that does apply RoPE, 0 for a NoPE layer (as
transformers reads it); without it, `no_rope_layer_interval` n makes every n-th layer NoPE."""

from __future__ import annotations

from typing import Any

from jisu.models.arch.base import COMMON_GGUF_TENSORS, Architecture, Getter
from jisu.models.config import MAX_CONTEXT, MAX_LAYERS

_SMOLLM3_TENSORS = COMMON_GGUF_TENSORS | {
    "blk.{n}.attn_output.bias": "model.layers.{n}.self_attn.o_proj.bias",
    "blk.{n}.ffn_gate.bias": "model.layers.{n}.mlp.gate_proj.bias",
    "blk.{n}.ffn_up.bias": "model.layers.{n}.mlp.up_proj.bias",
    "blk.{n}.ffn_down.bias": "model.layers.{n}.mlp.down_proj.bias",
}
GGUF_NO_ROPE_INTERVAL = 4
"""llama.cpp's SmolLM3 graph skips RoPE on every 4th layer, a constant no GGUF key carries."""


class SmolLM3(Architecture):
    hf_name = "SmolLM3ForCausalLM"
    model_type = "smollm3"
    gguf_name = "smollm3"
    gguf_tensors = _SMOLLM3_TENSORS
    permute_gguf_qk = True  # llama.cpp converts it as a Llama

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d.setdefault("tie_word_embeddings", True)  # SmolLM3Config's default; configs may omit it
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        n = common["num_hidden_layers"]
        rope = _rope_layers(d, f, n)
        bias = f.boolean("attention_bias", default=False)
        fields: dict[str, Any] = {
            "rope_layers": () if all(rope) else rope,
            "attention_bias": bias,
            "o_bias": bias,  # SmolLM3's o_proj follows attention_bias too
            "mlp_bias": f.boolean("mlp_bias", default=False),
            "hidden_act": self.activation(d, f, "hidden_act", "silu"),
        }
        if f.boolean("use_sliding_window", default=False) and d.get("sliding_window"):
            fields["sliding_window"] = f.integer("sliding_window", 1, MAX_CONTEXT)
            types = d.get("layer_types")
            if types is None:  # transformers' default: the NoPE layers slide
                types = ["full_attention" if r else "sliding_attention" for r in rope]
            fields["layer_types"] = self.layer_types(types, f, n)
        return fields

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"no_rope_layer_interval": GGUF_NO_ROPE_INTERVAL,
                "mlp_bias": any(name.endswith("ffn_up.bias") for name in tensors)}


def _rope_layers(d: dict[str, Any], f: Any, n: int) -> tuple[bool, ...]:
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = f.integer("no_rope_layer_interval", 1, MAX_LAYERS, default=4)
        return tuple((i + 1) % interval != 0 for i in range(n))
    # transformers reads the first n entries of a list at least n long.
    if not isinstance(flags, list) or len(flags) < n or any(v not in (0, 1) or isinstance(v, float) for v in flags):
        f.fail("no_rope_layers", flags, f"a list of at least {n} entries, each 1 (RoPE) or 0 (no RoPE)")
    return tuple(bool(v) for v in flags[:n])


ARCHITECTURES = {"SmolLM3ForCausalLM": SmolLM3()}
GGUF = {"smollm3": ARCHITECTURES["SmolLM3ForCausalLM"]}
