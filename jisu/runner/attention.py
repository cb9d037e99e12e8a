"""Attention over a paged KV cache, with torch's scaled_dot_product_attention as the kernel.

The step's tokens arrive flattened: first one token per decoding sequence, then each prefill chunk.
Decodes are attended together in one padded batch; each prefill chunk is attended on its own.
Index tensors are built once per step (see `AttentionMetadata`) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int
    """First row of this chunk in the step's flattened tokens."""
    length: int
    context_len: int
    """Tokens of this sequence whose K/V are visible once this chunk is written (cached + chunk)."""
    gather: torch.Tensor | None
    """[context_len] cache slots to read, or None when the chunk is the whole context (use fresh K/V)."""
    mask: torch.Tensor | None
    """[length, context_len] bool, True = attend; None means plain causal."""


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] flat cache slot where each token's K/V is written."""
    num_decodes: int
    decode_gather: torch.Tensor | None = None
    """[D, max_ctx] cache slots read by each decoding sequence (padded with slot 0)."""
    decode_mask: torch.Tensor | None = None
    """[D, 1, 1, max_ctx] bool, True = attend."""
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D]. Returns [T, H, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    d = meta.num_decodes
    if d:
        keys = k_cache[meta.decode_gather].transpose(1, 2)  # [D, KVH, ctx, Dh]
        values = v_cache[meta.decode_gather].transpose(1, 2)
        query = q[:d].unsqueeze(2)  # [D, H, 1, Dh]
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        ).squeeze(2)
        if not meta.prefills:
            return o  # a pure decode step needs no assembly (saves two ops per layer)
        out = torch.empty_like(q)
        out[:d] = o
    else:
        out = torch.empty_like(q)
    for c in meta.prefills:
        rows = slice(c.start, c.start + c.length)
        if c.gather is None:
            keys, values = k[rows], v[rows]
        else:
            keys, values = k_cache[c.gather], v_cache[c.gather]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=c.mask,
            is_causal=c.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


class PagedAttention(torch.nn.Module):
    """paged_attention as a module: writes this step's K/V into the layer's cache and attends."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        return paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
