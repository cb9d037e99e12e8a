"""Blocked prefill attention (jisu/runner/attention.py) against one masked attention call over the whole chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jisu.runner.attention import AttentionMetadata, PrefillChunk, paged_attention, query_blocks, visible

H, KVH, DH = 6, 2, 16


@pytest.mark.parametrize(
    "n, start_pos, window",
    [(128, 0, None), (200, 0, None), (131, 70, None), (300, 0, 100), (150, 90, 64), (129, 0, 1)],
)
def test_blocked_prefill_equals_one_masked_call(n, start_pos, window):
    g = torch.Generator().manual_seed(n + start_pos)
    ctx = start_pos + n
    q = torch.randn(n, H, DH, generator=g)
    k_all, v_all = torch.randn(ctx, KVH, DH, generator=g), torch.randn(ctx, KVH, DH, generator=g)
    # The cache holds the sequence's positions at shuffled slots; this step writes the chunk's K/V.
    slots = torch.randperm(ctx + 7, generator=g)[:ctx]
    k_cache, v_cache = torch.zeros(ctx + 7, KVH, DH), torch.zeros(ctx + 7, KVH, DH)
    k_cache[slots[:start_pos]], v_cache[slots[:start_pos]] = k_all[:start_pos], v_all[:start_pos]
    chunk = PrefillChunk(
        start=0, length=n, context_len=ctx, gather=slots if start_pos else None, mask=None,
        query_blocks=query_blocks(n, start_pos, window, torch.device("cpu")),
    )
    meta = AttentionMetadata(slot_mapping=slots[start_pos:], num_decodes=0, prefills=[chunk])
    got = paged_attention(q, k_all[start_pos:], v_all[start_pos:], k_cache, v_cache, meta, scale=0.25)

    mask = visible(torch.arange(start_pos, ctx), torch.arange(ctx), window)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), attn_mask=mask, scale=0.25, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache[slots], k_all)  # the chunk's K/V were written too


def test_blocks_cover_the_chunk_and_only_visible_keys():
    blocks = query_blocks(200, 50, 80, torch.device("cpu"))
    assert [b.q0 for b in blocks] == [0, 64, 128, 192] and blocks[-1].q1 == 200
    for b in blocks:
        full = visible(torch.arange(50 + b.q0, 50 + b.q1), torch.arange(250), 80)
        assert not full[:, : b.k0].any() and not full[:, b.k1 :].any()  # nothing visible is cut off
        assert torch.equal(full[:, b.k0 : b.k1], b.mask)
