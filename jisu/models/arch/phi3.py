"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's decoder with q/k/v stored as one matrix (qkv_proj) and gate/up as another
(gate_up_proj), which load as they are (jisu's fused projections hold them the same way); LongRoPE scaling for the
long-context models, partial rotary (Phi-4-mini turns 3/4 of each head), and a sliding window where configured."""

from __future__ import annotations

from typing import Any

from jisu.models.arch.base import COMMON_GGUF_TENSORS, Architecture, Getter

_PHI3_TENSORS = COMMON_GGUF_TENSORS | {
    "blk.{n}.attn_qkv.weight": "model.layers.{n}.self_attn.qkv_proj.weight",
    # llama.cpp's Phi-3 ffn_up holds gate and up stacked (2 x intermediate rows), as gate_up_proj does.
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.gate_up_proj.weight",
}
_ORIGINAL_CONTEXT = 4096
"""transformers' Phi3Config default for original_max_position_embeddings, used when config.json leaves it out."""


class Phi3(Architecture):
    hf_name = "Phi3ForCausalLM"
    model_type = "phi3"
    gguf_name = "phi3"
    gguf_tensors = _PHI3_TENSORS

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        rope = d.get(key)
        if not isinstance(rope, dict):
            return d
        d, rope = dict(d), dict(rope)
        if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):  # transformers reads both as LongRoPE for Phi-3
            rope["rope_type"] = "longrope"
            rope.pop("type", None)
        if rope.get("rope_type") == "longrope":
            # As transformers does: the top-level value (or its default) wins over one inside the rope dict.
            orig = d.get("original_max_position_embeddings")
            rope["original_max_position_embeddings"] = _ORIGINAL_CONTEXT if orig is None else orig
        d[key] = rope
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        head_dim = common["head_dim"]
        rotary = _rotary_dim(d, f, head_dim)
        scaling = common["rope_scaling"] or {}
        if scaling.get("rope_type") == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(scaling[name]) != rotary // 2:
                    f.fail(f"{f.rope_key}.{name}", scaling[name],
                           f"a list of {rotary // 2} numbers, one per rotary pair ({rotary} of {head_dim} dims turn)")
        return {
            "rotary_dim": rotary if rotary < head_dim else None,
            "hidden_act": self.activation(d, f, "hidden_act", "silu"),
            **self.optional_window(d, f),
        }

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hidden, heads = get("embedding_length"), get("attention.head_count")
        # llama.cpp writes no key_length for Phi-3, and rope.dimension_count is the rotary part only (Phi-4-mini).
        if get("attention.key_length") is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            out["head_dim"] = hidden // heads
        if get("rope.dimension_count") is not None:
            out["rotary_dim"] = get("rope.dimension_count")
        if get("rope.scaling.original_context_length") is not None:
            out["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
        out["sliding_window"] = get("attention.sliding_window") or None  # 0 marks Phi-4: no window
        return out


def _rotary_dim(d: dict[str, Any], f: Any, head_dim: int) -> int:
    """The dimensions of each head that rotate: `rotary_dim` as given (the GGUF loader's, where the count itself is
    stored), else transformers' int(head_dim * partial_rotary_factor), the factor read from the rope dict first."""
    if d.get("rotary_dim") is not None:
        rotary = f.integer("rotary_dim", 2, head_dim)
    else:
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        key, value = "partial_rotary_factor", d.get("partial_rotary_factor")
        if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
            key, value = f"{f.rope_key}.partial_rotary_factor", rope["partial_rotary_factor"]
        factor = f.number(key, 0.0, 1.0, value=value, default=1.0, what="a number above 0, at most 1", above=True)
        rotary = int(head_dim * factor)
    if rotary < 2 or rotary % 2:  # rotary embeddings turn pairs of dimensions
        f.fail("partial_rotary_factor", rotary / head_dim, f"one that turns an even number of the {head_dim} dims")
    return rotary


ARCHITECTURES = {"Phi3ForCausalLM": Phi3()}
GGUF = {"phi3": ARCHITECTURES["Phi3ForCausalLM"]}
