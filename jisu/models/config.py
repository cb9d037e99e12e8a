"""The shape of a decoder model, read from a Hugging Face config.json dict.

GGUF files are translated into the same dict by the loader, so there is one path from metadata to model,
and one place (from_hf_dict) where every value is checked before anything is sized from it. What differs
between architectures is read by their module (jisu/models/arch/) into the fields below, which switch the
blocks of jisu/models/decoder.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from jisu.errors import ModelConfigError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")

# Model files are untrusted input. These bounds are far above any published Llama-family model, and a config
# past them is corrupt or hostile: refusing it here keeps model construction and the KV cache from sizing
# anything from it.
MAX_LAYERS = 1024
MAX_HIDDEN = 65536
MAX_INTERMEDIATE = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 8192
MAX_VOCAB = 1 << 22  # 4M tokens
MAX_CONTEXT = 1 << 24  # 16M positions

_MISSING: Any = object()


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
    """q/k/v projections carry biases (Qwen2)."""
    sliding_window: int | None = None
    """The attention window of sliding layers (every layer, unless layer_types says which); attention beyond it
    is masked when the context is longer than the window."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # ---- what varies between architectures (defaults: Llama) ----
    qk_norm: bool = False
    """An RMSNorm over each q and k head before rotary (Qwen3, Gemma 3)."""
    norm_unit_offset: bool = False
    """RMSNorm weights are stored as w and applied as (1 + w) (Gemma)."""
    sandwich_norm: bool = False
    """Norms after attention and after the MLP too, before each residual add (Gemma 2/3)."""
    hidden_act: str = "silu"
    """The MLP's gate activation: silu, gelu_tanh or gelu."""
    embed_scale: float | None = None
    """Embeddings are multiplied by this (Gemma: sqrt(hidden_size), rounded to float32)."""
    attn_scale: float | None = None
    """Attention score scale; None: head_dim ** -0.5."""
    attn_softcap: float | None = None
    """Attention scores pass through cap * tanh(s / cap) (Gemma 2)."""
    final_softcap: float | None = None
    """Output logits pass through cap * tanh(l / cap) (Gemma 2)."""
    layer_types: tuple[str, ...] = ()
    """Per layer 'sliding' or 'full'; () = every layer alike (sliding when sliding_window is set)."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding layers when it differs from rope_theta (Gemma 3); they take no rope scaling."""
    rotary_dim: int | None = None
    """Dimensions of each head that rotate (partial rotary, Phi); None: all of head_dim."""
    rope_layers: tuple[bool, ...] = ()
    """Per layer, whether it applies RoPE (SmolLM3 skips every n-th); () = every layer does."""
    o_bias: bool = False
    """o_proj carries a bias (GPT-2)."""
    mlp_bias: bool = False
    """The MLP's projections carry biases (GPT-2)."""
    norm_type: str = "rms"
    """'rms' (RMSNorm) or 'layer' (LayerNorm with a bias, GPT-2)."""
    gated_mlp: bool = True
    """The MLP is down(act(gate) * up); False: down(act(up)) (GPT-2, whose up is c_fc)."""
    learned_positions: bool = False
    """Absolute position embeddings added to the token embeddings (GPT-2), instead of RoPE."""
    num_experts: int = 0
    """Experts of a sparse MoE MLP (Mixtral, Qwen3-MoE); 0: a dense MLP."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Each expert's intermediate size (Mixtral: intermediate_size)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer, whether its MLP is the MoE one; () = every layer when num_experts > 0."""

    def layer_is_moe(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return not self.moe_layers or self.moe_layers[layer]

    def layer_rope(self, layer: int) -> str | None:
        """Which RoPE table a layer uses: 'global', 'local' (Gemma 3's sliding layers) or None (no RoPE)."""
        if self.learned_positions or (self.rope_layers and not self.rope_layers[layer]):
            return None
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    def layer_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: it sees the whole context)."""
        if self.layer_types and self.layer_types[layer] != "sliding":
            return None
        return self.sliding_window

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the layers, full attention (None) first."""
        seen = {self.layer_window(i) for i in range(self.num_hidden_layers)}
        return tuple(sorted(seen, key=lambda w: -1 if w is None else w))

    def with_rope(self, theta: float, scaling: dict[str, Any] | None) -> "ModelConfig":
        """The same model with another RoPE base and scaling (for a second rotary table)."""
        return dataclasses.replace(self, rope_theta=theta, rope_scaling=scaling)

    def output_is_tied(self, tensor_names) -> bool:
        """Whether the output layer multiplies by the embedding matrix: the config says so, or the checkpoint
        has no output matrix of its own. The one place this is decided."""
        return self.tie_word_embeddings or "lm_head.weight" not in tensor_names

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

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
    def from_hf_dict(
        cls, d: dict[str, Any], source: str | None = None, field_names: Mapping[str, str] | None = None
    ) -> "ModelConfig":
        """The config a config.json dict describes, every value checked for type and range first.

        source (a file path) starts every error message; field_names maps config.json keys (and dotted
        rope_scaling.* keys) to the names the file really uses, e.g. GGUF's "llama.block_count", so the
        message names what the user can find in the file. Raises ModelConfigError (a ModelLoadError)
        for a missing, mistyped or out-of-range value, UnsupportedModelError for a valid but
        unsupported one.
        """
        f = _Fields(d, source, field_names or {})
        if not isinstance(d, dict):
            raise ModelConfigError(f"{f.prefix}the model config is {_show(d)}; allowed: a JSON object")
        from jisu.models.arch import HF_ARCHITECTURES, for_hf

        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            f.fail("architectures", archs, "a list of architecture names, e.g. [\"LlamaForCausalLM\"]")
        arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            found = ", ".join(archs) if archs else f"model_type={d.get('model_type')!r}"
            raise UnsupportedModelError(
                f"{f.prefix}unsupported architecture {found}; jisu runs: {', '.join(HF_ARCHITECTURES)}"
            )
        spec = for_hf(arch)
        d = spec.normalize(d)
        f.d = d
        hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
        heads = f.integer("num_attention_heads", 1, MAX_HEADS)
        kv_heads = f.integer("num_key_value_heads", 1, MAX_HEADS, default=heads)
        if kv_heads > heads or heads % kv_heads:
            f.fail("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({heads})")
        if d.get("head_dim") is None:
            if hidden % heads:
                f.fail("hidden_size", hidden, f"a multiple of num_attention_heads ({heads}), or a head_dim field")
            head_dim = hidden // heads
            if head_dim % 2 or head_dim > MAX_HEAD_DIM:
                f.fail("hidden_size", hidden, f"one that gives an even head size of at most {MAX_HEAD_DIM} "
                       f"(hidden_size / num_attention_heads is {head_dim})")
        else:
            head_dim = f.integer("head_dim", 2, MAX_HEAD_DIM)
            if head_dim % 2:  # rotary embeddings rotate pairs of dimensions
                f.fail("head_dim", head_dim, f"an even integer from 2 to {MAX_HEAD_DIM}")
        vocab = f.integer("vocab_size", 1, MAX_VOCAB)
        max_positions = f.integer("max_position_embeddings", 1, MAX_CONTEXT, default=2048)
        eos = d.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if len(eos_list) > 1024:
            f.fail("eos_token_id", eos, "an id or a list of at most 1024 ids")
        eos_ids = tuple(f.integer("eos_token_id", 0, vocab - 1, value=e, what=f"a token id below vocab_size ({vocab})")
                        for e in eos_list)
        bos = d.get("bos_token_id")
        common = dict(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size", 1, MAX_INTERMEDIATE),
            num_hidden_layers=f.integer("num_hidden_layers", 1, MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=f.number("rms_norm_eps", 0.0, 1.0, default=1e-6, what="a number from 0 to 1"),
            rope_theta=_rope_theta(d, f),
            rope_scaling=_rope_scaling(d, f, head_dim),
            tie_word_embeddings=f.boolean("tie_word_embeddings", default=False),
            bos_token_id=None if bos is None else f.integer("bos_token_id", 0, vocab - 1,
                                                            what=f"a token id below vocab_size ({vocab}), or null"),
            eos_token_ids=eos_ids,
        )
        config = cls(**common, **spec.config_fields(d, f, common))
        if config.max_context > MAX_CONTEXT:
            key = f"{f.rope_key}.factor"
            f.fail(key, config.rope_scaling["factor"],
                   f"one that keeps the scaled context ({config.max_context}) at most {MAX_CONTEXT}")
        return config


class _Fields:
    """Reads config values by key, raising a ModelConfigError that names the file, the field, the value and
    what is allowed."""

    def __init__(self, d: Any, source: str | None, names: Mapping[str, str]):
        self.d = d if isinstance(d, dict) else {}
        self.prefix = f"{source}: " if source else "model config: "
        self.names = names
        self.rope_key = "rope_scaling"
        """Where the rope scaling dict came from (rope_scaling or rope_parameters), for messages."""

    def label(self, key: str) -> str:
        return self.names.get(key, key)

    def fail(self, key: str, value: Any, allowed: str) -> NoReturn:
        raise ModelConfigError(f"{self.prefix}{self.label(key)} is {_show(value)}; allowed: {allowed}")

    def _get(self, key: str, value: Any, default: Any, what: str) -> Any:
        if value is _MISSING:
            value = self.d.get(key)
        if value is None:  # absent, or JSON null
            if default is _MISSING:
                raise ModelConfigError(f"{self.prefix}{self.label(key)} is missing; required: {what}")
        return value

    def integer(self, key: str, lo: int, hi: int, *, default: Any = _MISSING, value: Any = _MISSING,
                what: str | None = None) -> int:
        what = what or f"an integer from {lo} to {hi}"
        v = self._get(key, value, default, what)
        if v is None:
            return default
        # JSON has one number type: 2048.0 is an integer, True is not.
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            self.fail(key, v, what)
        if not lo <= int(v) <= hi:
            self.fail(key, v, what)
        return int(v)

    def number(self, key: str, lo: float, hi: float, *, default: Any = _MISSING, value: Any = _MISSING,
               what: str, above: bool = False) -> float:
        """A finite number in [lo, hi], or (lo, hi] when `above`."""
        v = self._get(key, value, default, what)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, v, what)
        if v > hi or v < lo or (above and v == lo):
            self.fail(key, v, what)
        return float(v)

    def boolean(self, key: str, *, default: Any = _MISSING, value: Any = _MISSING) -> bool:
        v = self._get(key, value, default, "true or false")
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, v, "true or false")
        return v


def _show(value: Any) -> str:
    """A value as the message shows it: short, with its JSON type when that is the problem."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, bool):
        return f"{text} (a boolean)"
    if isinstance(value, (int, float)):
        return text
    kind = {str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(type(value))
    return f"{text} ({kind or type(value).__name__})"


def _rope_theta(d: dict[str, Any], f: _Fields) -> float:
    # transformers >= 5 moves rope_theta into rope_parameters; older configs keep it at the top level.
    what = "a finite number above 1 (at most 1e12)"
    if d.get("rope_theta") is not None:
        return f.number("rope_theta", 1.0, 1e12, what=what, above=True)
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return f.number("rope_parameters.rope_theta", 1.0, 1e12, value=params["rope_theta"], what=what, above=True)
    return 10000.0


def _rope_scaling(d: dict[str, Any], f: _Fields, head_dim: int) -> dict[str, Any] | None:
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            f.fail(key, d[key], "an object with rope_type and factor, or null")
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    raw = d.get(key)
    if not raw:
        return None
    f.rope_key = key
    raw = dict(raw)
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if not isinstance(kind, str):
        f.fail(f"{key}.rope_type", kind, f"one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{f.prefix}unsupported rope scaling {kind!r} in {f.label(key + '.rope_type')}; "
            f"jisu supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    raw["rope_type"] = kind
    raw.pop("type", None)
    raw.pop("rope_theta", None)
    if kind == "default":
        return None

    def number(name: str, default: Any = _MISSING, what: str = "a finite number above 0") -> None:
        if name in raw or default is _MISSING:
            f.number(f"{key}.{name}", 0.0, 1e6, value=raw.get(name), default=default, what=what, above=True)

    def integer(name: str, required: bool) -> None:
        if name in raw or required:
            f.integer(f"{key}.{name}", 1, MAX_CONTEXT, value=raw.get(name), default=None if not required else _MISSING)

    # LongRoPE may leave factor out: it is then max_position_embeddings / original_max_position_embeddings.
    number("factor", default=None if kind == "longrope" else _MISSING, what="a finite number above 0 (at most 1000000)")
    if kind == "dynamic" and head_dim <= 2:  # dynamic NTK raises the base to head_dim / (head_dim - 2)
        f.fail("head_dim", head_dim, "above 2 for dynamic rope scaling")
    if kind == "llama3":
        integer("original_max_position_embeddings", required=True)
        number("low_freq_factor", default=1.0)
        number("high_freq_factor", default=4.0)
        low, high = raw.get("low_freq_factor", 1.0), raw.get("high_freq_factor", 4.0)
        if high <= low:  # the smoothing between the two divides by high - low
            f.fail(f"{key}.high_freq_factor", high, f"a number above low_freq_factor ({low})")
    if kind == "yarn":
        integer("original_max_position_embeddings", required=False)
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            number(name, default=None)
        for name in ("mscale", "mscale_all_dim"):
            if name in raw:
                f.number(f"{key}.{name}", 0.0, 1e6, value=raw[name], default=None, what="a number from 0 to 1000000")
        if "truncate" in raw:
            f.boolean(f"{key}.truncate", value=raw["truncate"], default=None)
    if kind == "longrope":
        integer("original_max_position_embeddings", required=True)
        number("attention_factor", default=None)
        _longrope_factors(raw, f, key, head_dim)
    return raw


def _longrope_factors(raw: dict[str, Any], f: _Fields, key: str, head_dim: int) -> None:
    """LongRoPE's short_factor and long_factor: lists of one positive divisor per rotary pair, of equal length (the
    architecture, which knows the rotary dimensions, checks that length; here it is at most head_dim / 2)."""
    lengths = set()
    for name in ("short_factor", "long_factor"):
        values = raw.get(name)
        what = f"a list of at most {head_dim // 2} numbers above 0, one per rotary pair"
        if not isinstance(values, list) or not 0 < len(values) <= head_dim // 2:
            f.fail(f"{key}.{name}", values, what)
        for v in values:
            f.number(f"{key}.{name}", 0.0, 1e6, value=v, what=what, above=True)
        lengths.add(len(values))
    if len(lengths) > 1:
        f.fail(f"{key}.long_factor", raw["long_factor"], f"a list as long as short_factor ({len(raw['short_factor'])})")
