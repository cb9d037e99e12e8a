"""The shape of a Llama-family model, read from a Hugging Face config.json dict.

GGUF files are translated into the same dict by the loader, so there is one path from metadata to model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jisu.errors import UnsupportedModelError

# Architecture name (as in config.json "architectures") -> whether q/k/v projections carry a bias.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """The config's rope_scaling / rope_parameters dict with key "rope_type"; None for plain RoPE."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry biases (Qwen2); o_proj never does in this family."""
    sliding_window: int | None = None
    """Mistral's window; attention beyond it is masked when the context is longer than the window."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def max_context(self) -> int:
        """The longest context the positions support: max_position_embeddings, extended by YaRN / dynamic NTK
        scaling (whose configs may keep the pre-scaling window there)."""
        s = self.rope_scaling or {}
        if self.rope_type in ("yarn", "dynamic") and s.get("factor"):
            base = s.get("original_max_position_embeddings") or self.max_position_embeddings
            return max(self.max_position_embeddings, int(base * float(s["factor"])))
        return self.max_position_embeddings

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            found = ", ".join(archs) if archs else f"model_type={d.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {found}; jisu runs: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            rope_scaling = _rope_scaling(d)
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = d.get("sliding_window") if arch == "MistralForCausalLM" else None
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(d)),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=SUPPORTED_ARCHITECTURES[arch] or bool(d.get("attention_bias", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise UnsupportedModelError(f"model config lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UnsupportedModelError(f"model config has a malformed field: {e}") from None


def _rope_theta(d: dict[str, Any]) -> float:
    # transformers >= 5 moves rope_theta into rope_parameters; older configs keep it at the top level.
    params = d.get("rope_parameters") or {}
    return d.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    raw = d.get("rope_scaling") or d.get("rope_parameters")
    if not raw:
        return None
    raw = dict(raw)
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling {kind!r}; jisu supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    raw["rope_type"] = kind
    raw.pop("type", None)
    raw.pop("rope_theta", None)
    return None if kind == "default" else raw
