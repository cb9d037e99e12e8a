"""Attention over a paged KV cache.

The step's tokens arrive flattened: first one token per decoding sequence, then each prefill chunk.
Decodes are attended together in one padded batch (torch's scaled_dot_product_attention; pure decode steps of the
fused C++ stack never come here). Each prefill chunk is attended on its own: on CPU by jisu's C++ flash-style kernel
(jisu/kernels/prefill_attention.cpp) where it is built and the cache is float32 or float16, else by torch's SDPA.
Index tensors are built once per step (see `AttentionMetadata`) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# Without the C++ kernel, long prefill chunks on CPU attend QUERY_BLOCK queries at a time, each block over only the
# keys it can see: torch's CPU SDPA with is_causal still does most of the masked upper triangle. Measured (one thread, SmolLM2's
# 9 query / 3 KV heads, ms per layer, is_causal vs blocks of 32 / 64 / 128): 128 tokens 0.58 vs 0.48 / 0.51,
# 256: 1.97 vs 1.47 / 1.56 / 1.77, 512: 7.8 vs 5.6 / 5.2 / 6.0, 1024: 22.5 vs 19.4 / 18.8 / 19.8.
QUERY_BLOCK = 64
BLOCKED_PREFILL_MIN = 128
# The C++ prefill kernel reads the cache in these dtypes (bfloat16 caches stay on torch's SDPA). Measured against
# the blocks above (benchmarks/bench_prefill_attention.py: SmolLM2's shapes, float16 cache, ms per layer, medians of
# 9 on a noisy shared 2-core host): 2 threads, 512 tokens 7.44 vs 4.09, 4096 tokens (chunks of 1024) 299 vs 206;
# 1 thread 7.92 vs 5.53, 452 vs 380. `jisu profile --input-len 512 --output-len 4`: attention 217 -> 152 ms,
# prefill 354 -> 408 tok/s (medians of 4 and 3 runs).
KERNEL_CACHE_DTYPES = (torch.float32, torch.float16)


def prefill_kernels(device: torch.device, compute_dtype: torch.dtype, cpu_kernels: bool = True):
    """jisu's C++ kernels module where prefill chunks can attend in its prefill_attention: device cpu, float32
    compute, cpu_kernels on and the kernels built (the runner also checks the cache dtype); else None."""
    if torch.device(device).type != "cpu" or compute_dtype != torch.float32 or not cpu_kernels:
        return None
    from jisu.kernels.build import cpu_linear_kernels

    kernels = cpu_linear_kernels()
    return kernels if kernels is not None and hasattr(kernels, "prefill_attention") else None


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[q, k] bool: causal, and within a sliding window (Mistral's) when there is one."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


@dataclass
class QueryBlock:
    """Rows [q0, q1) of a prefill chunk attend over keys [k0, k1) (positions in the sequence) under `mask`."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: torch.Tensor
    """[q1 - q0, k1 - k0] bool, True = attend."""


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
    """[length, context_len] bool, True = attend; None means plain causal (the C++ kernel: always None, it masks
    by position)."""
    query_blocks: list[QueryBlock] | None = None
    """When set (long chunks on CPU without the C++ kernel), attend block by block instead, each over only the keys
    it can see."""

    @property
    def start_pos(self) -> int:
        """Position of the chunk's first token in its sequence."""
        return self.context_len - self.length


def query_blocks(n: int, start_pos: int, window: int | None, device) -> list[QueryBlock]:
    """A chunk of n queries at positions start_pos.. in blocks of QUERY_BLOCK, each with the key range it sees."""
    blocks = []
    for q0 in range(0, n, QUERY_BLOCK):
        q1 = min(n, q0 + QUERY_BLOCK)
        k0 = 0 if window is None else max(0, start_pos + q0 - window + 1)
        k1 = start_pos + q1
        mask = visible(torch.arange(start_pos + q0, start_pos + q1), torch.arange(k0, k1), window)
        blocks.append(QueryBlock(q0, q1, k0, k1, mask.to(device)))
    return blocks


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
    window: int | None = None
    """The sliding window these indices honour (None: the whole context)."""
    by_window: dict[int | None, AttentionMetadata] = field(default_factory=dict)
    """The same step for layers with other windows (models that interleave sliding and global layers)."""
    kernels: object | None = None
    """jisu's C++ kernels module when the prefill chunks attend in its prefill_attention (their masks and query
    blocks are then not built); None: torch's SDPA."""

    def for_window(self, window: int | None) -> AttentionMetadata:
        return self if window == self.window else self.by_window[window]


def _attend(q, k, v, mask, scale: float, softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """softmax(scale q k^T [masked]) v over [B, heads, len, Dh] tensors (k/v may have fewer heads: GQA). With
    softcap, scores pass through cap * tanh(s / cap) before the mask (Gemma 2), which torch's SDPA cannot do."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap
    if is_causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D], in q's dtype or a narrower one (K/V are
    rounded to it when written, and every read, fresh or cached, sees the rounded values). Returns [T, H, D]."""
    narrow = k_cache.dtype != q.dtype
    if narrow:
        # Attention reads what the cache holds, so a token's result does not depend on how its prompt was chunked.
        k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)

    def widen(t: torch.Tensor) -> torch.Tensor:
        return t.to(q.dtype) if narrow else t

    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    d = meta.num_decodes
    if d:
        keys = widen(k_cache[meta.decode_gather].transpose(1, 2))  # [D, KVH, ctx, Dh]
        values = widen(v_cache[meta.decode_gather].transpose(1, 2))
        query = q[:d].unsqueeze(2)  # [D, H, 1, Dh]
        o = _attend(query, keys, values, meta.decode_mask, scale, softcap).squeeze(2)
        if not meta.prefills:
            return o  # a pure decode step needs no assembly (saves two ops per layer)
        out = torch.empty_like(q)
        out[:d] = o
    else:
        out = torch.empty_like(q)
    for c in meta.prefills:
        rows = slice(c.start, c.start + c.length)
        if meta.kernels is not None:
            # The kernel reads the cache (or the chunk's own K/V, rounded above) as stored: no widened copies.
            fresh = c.gather is None
            meta.kernels.prefill_attention(q[rows], k[rows] if fresh else k_cache, v[rows] if fresh else v_cache,
                                           c.gather, c.start_pos, meta.window or 0, scale, softcap or 0.0, out[rows])
            continue
        if c.gather is None:
            keys, values = widen(k[rows]), widen(v[rows])
        else:
            keys, values = widen(k_cache[c.gather]), widen(v_cache[c.gather])
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q[rows], keys, values))  # [1, heads, len, Dh]
        if c.query_blocks:
            for b in c.query_blocks:
                o = _attend(qh[:, :, b.q0 : b.q1], kh[:, :, b.k0 : b.k1], vh[:, :, b.k0 : b.k1], b.mask, scale,
                            softcap)
                out[c.start + b.q0 : c.start + b.q1] = o.squeeze(0).transpose(0, 1)
            continue
        o = _attend(qh, kh, vh, c.mask, scale, softcap, is_causal=c.mask is None)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


class PagedAttention(torch.nn.Module):
    """paged_attention as a module: writes this step's K/V into the layer's cache and attends, within the layer's
    sliding window when it has one."""

    def __init__(self, scale: float, softcap: float | None = None, window: int | None = None):
        super().__init__()
        self.scale = scale
        self.softcap = softcap
        self.window = window

    def forward(self, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        meta = meta.for_window(self.window)
        return paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.softcap)
