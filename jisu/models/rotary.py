"""Rotary position embeddings with the scaling kinds Llama-family configs use.

Each kind only changes the inverse frequencies (and, for YaRN, a constant factor on cos/sin); the cos/sin
table is then precomputed once for every position up to the context window and indexed per token.
"""

from __future__ import annotations

import math

import torch

from jisu.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig, max_positions: int | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [rotary_dim/2], attention_factor) for the config's rope kind, for a context of
    `max_positions` (default: the model's max_position_embeddings; only LongRoPE depends on it)."""
    dim = config.rotary_dim or config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        # NOTE: dynamic NTK rescales the base once the sequence outgrows the original window. Engines with a
        # KV cache cannot re-rotate cached keys, so (like vLLM) the base is fixed for the full scaled window.
        # Within the original window this equals plain RoPE, as in transformers.
        orig = config.max_position_embeddings
        seq_len = orig * factor
        new_base = base * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        if seq_len <= orig:
            return inv_freq, 1.0
        return 1.0 / (new_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(config, scaling)
    if kind == "longrope":
        return _longrope(config, scaling, max_positions or config.max_position_embeddings)
    raise ValueError(f"unknown rope kind {kind!r}")


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    orig = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(config: ModelConfig, s: dict) -> tuple[torch.Tensor, float]:
    dim, base = config.rotary_dim or config.head_dim, config.rope_theta
    factor = float(s["factor"])
    orig = s.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _longrope(config: ModelConfig, s: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    # NOTE: transformers picks LongRoPE's short or long factors by the length of the sequence it is running, for all
    # of its positions: once a sequence outgrows original_max_position_embeddings every key is rotated anew. A KV
    # cache holds keys rotated when they were written and cannot re-rotate them, so (like vLLM and llama.cpp) the
    # choice is made once, by the context window this model is built for: long factors when it exceeds the original
    # window, short ones otherwise. Equal to transformers whenever the window stays within the original one, and for
    # any sequence longer than it; a shorter sequence under a longer window gets the long factors where transformers
    # uses the short ones.
    dim, base = config.rotary_dim or config.head_dim, config.rope_theta
    orig = int(s["original_max_position_embeddings"])
    chosen = s["long_factor"] if max_positions > orig else s["short_factor"]
    if len(chosen) != dim // 2:
        raise ValueError(f"LongRoPE has {len(chosen)} factors for {dim // 2} rotary pairs")
    factors = torch.tensor(chosen, dtype=torch.float32)
    inv_freq = 1.0 / (factors * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factor = s.get("factor") or config.max_position_embeddings / orig
    attention_factor = s.get("attention_factor")
    if attention_factor is None:  # the LongRoPE paper's, from the context extension ratio
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Rotations for positions [0, max_positions), applied as one complex multiply per step.

    NOTE: Hugging Face checkpoints pair dimension i with i + head_dim/2 ("rotate half"). The model stores q/k
    projection rows with each pair adjacent instead (see `pairs_adjacent`), so q and k of all heads rotate in
    a single complex multiply: a handful of tensor ops per layer instead of about fifteen, which matters when
    a decode step is bound by per-op dispatch. Dot products q.k are unchanged by the shared reordering.
    """

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq, attention_factor = inverse_frequencies(config, max_positions)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        table = torch.polar(torch.full_like(angles, attention_factor), angles)
        rest = config.head_dim // 2 - table.shape[1]
        if rest:  # partial rotary: the other pairs turn by 1 + 0j, which leaves them exactly as they are
            table = torch.cat([table, torch.ones(max_positions, rest, dtype=table.dtype)], dim=1)
        self.register_buffer("table", table, persistent=False)

    def for_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[T] positions -> [T, 1, head_dim/2] complex rotations, shared by every layer of a step."""
        return self.table[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim] with rotary pairs adjacent; returns the rotated [T, heads, head_dim] float."""
        t, h, d = x.shape
        pairs = torch.view_as_complex(x.float().reshape(t, h, d // 2, 2))
        return torch.view_as_real(pairs * rotation).reshape(t, h, d).to(x.dtype)


class ApplyRotary(torch.nn.Module):
    """RotaryEmbedding.apply as a module, so the profiler can time rotary work apart."""

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        return RotaryEmbedding.apply(x, rotation)


def pairs_adjacent(rows: torch.Tensor, num_heads: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Reorders q/k projection rows (weight [heads*head_dim, in] or bias [heads*head_dim]; a q/k norm's weight
    [head_dim] with num_heads 1) of each head from Hugging Face's (first halves, second halves) to (x0, x_half,
    x1, x_half+1, ...). With partial rotary only the first rotary_dim rows of a head rotate and are reordered."""
    shape = rows.shape
    head_dim = shape[0] // num_heads
    rot = rotary_dim or head_dim
    per_head = rows.reshape(num_heads, head_dim, *shape[1:])
    turned = per_head[:, :rot].reshape(num_heads, 2, rot // 2, *shape[1:]).transpose(1, 2).reshape(
        num_heads, rot, *shape[1:])
    if rot < head_dim:
        turned = torch.cat([turned, per_head[:, rot:]], dim=1)
    return turned.reshape(shape)
