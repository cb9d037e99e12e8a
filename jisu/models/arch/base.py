"""What an architecture module provides: how its config.json and GGUF metadata map onto ModelConfig, its GGUF
tensor names, and a fix-up hook for checkpoint tensors. The blocks themselves are jisu/models/decoder.py's,
switched by ModelConfig fields."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from jisu.models.config import MAX_CONTEXT

# GGUF tensor name -> Hugging Face name, shared by every llama.cpp architecture jisu runs; {n} = layer index.
COMMON_GGUF_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_q.bias": "model.layers.{n}.self_attn.q_proj.bias",
    "blk.{n}.attn_k.bias": "model.layers.{n}.self_attn.k_proj.bias",
    "blk.{n}.attn_v.bias": "model.layers.{n}.self_attn.v_proj.bias",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
}

# config.json activation names -> the decoder's (jisu/models/layers.py ACTIVATIONS); gelu_new, gelu_fast and
# gelu_pytorch_tanh are all GELU's tanh approximation.
HF_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}

Getter = Callable[..., Any]
"""get(key, default=None, required=False): a GGUF `{arch}.key` metadata value."""


class Architecture:
    """One architecture as config.json names it. Subclasses override what differs from Llama."""

    hf_name: str = "LlamaForCausalLM"
    """The config.json architecture name; ModelConfig.architecture."""
    model_type: str = "llama"
    """config.json model_type, written when jisu saves a model of this architecture."""
    gguf_name: str | None = None
    """llama.cpp's general.architecture for it, when llama.cpp runs it."""
    gguf_tensors: dict[str, str] = COMMON_GGUF_TENSORS
    permute_gguf_qk: bool = False
    """llama.cpp's converter permuted q/k rows of this architecture (its "llama" family): undo on load."""

    def normalize(self, d: dict[str, Any]) -> dict[str, Any]:
        """config.json as written -> the flat form from_hf_dict reads (e.g. a text config nested in a multimodal
        one, rope parameters per layer type). Returns a new dict or d itself."""
        return d

    def config_fields(self, d: dict[str, Any], f: Any, common: dict[str, Any]) -> dict[str, Any]:
        """ModelConfig fields this architecture sets beyond the common ones, each read and checked through `f`
        (models.config._Fields); `common` holds those already read (hidden_size, head_dim, ...)."""
        return {}

    @staticmethod
    def activation(d: dict[str, Any], f: Any, key: str, default: str) -> str:
        """The decoder's name for the activation config.json gives under `key` (default when absent)."""
        act = d.get(key) or default
        if act not in HF_ACTIVATIONS:
            f.fail(key, act, ", ".join(HF_ACTIVATIONS))
        return HF_ACTIVATIONS[act]

    @staticmethod
    def optional_window(d: dict[str, Any], f: Any) -> dict[str, Any]:
        """{'sliding_window': n} when config.json sets one; null or 0 means none."""
        return {"sliding_window": f.integer("sliding_window", 1, MAX_CONTEXT)} if d.get("sliding_window") else {}

    @staticmethod
    def layer_types(types: Any, f: Any, n: int) -> tuple[str, ...]:
        """config.json's layer_types (one 'sliding_attention' / 'full_attention' per layer) as ModelConfig's."""
        if not isinstance(types, list) or len(types) != n or any(
            t not in ("sliding_attention", "full_attention") for t in types
        ):
            f.fail("layer_types", types, f"a list of {n} entries, each 'sliding_attention' or 'full_attention'")
        return tuple("sliding" if t == "sliding_attention" else "full" for t in types)

    def gguf_config(self, get: Getter, tensors: dict[str, Any]) -> dict[str, Any]:
        """config.json keys this architecture derives from GGUF metadata (or llama.cpp's built-in defaults)."""
        return {}

    def sanitize(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        """A Hugging Face checkpoint tensor -> the (name, tensor) pairs the model loads (renamed, split,
        transposed, re-based). Also called with meta tensors of the header shapes, to check them before reading."""
        yield name, tensor

    def sanitize_gguf(self, name: str, tensor: Any) -> Any:
        """A GGUF tensor (already under its Hugging Face name) -> the tensor the model loads."""
        return tensor
