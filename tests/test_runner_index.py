"""The runner's decode index (which cache slots each decoding sequence reads, and which of them it attends)
against a per-position reference written from the block-table definition."""

from types import SimpleNamespace

import pytest
import torch

from jisu.runner.runner import ModelRunner


def reference(tables, lens, block_size, window):
    max_ctx = max(lens)
    gather = torch.zeros(len(lens), max_ctx, dtype=torch.long)
    mask = torch.zeros(len(lens), max_ctx, dtype=torch.bool)
    for i, (table, ctx) in enumerate(zip(tables, lens)):
        for pos in range(ctx):
            gather[i, pos] = table[pos // block_size] * block_size + pos % block_size
            mask[i, pos] = window is None or pos > ctx - 1 - window
    return gather, mask[:, None, None, :]


@pytest.mark.parametrize("window", [None, 5, 40])
def test_decode_index_matches_the_block_tables(window):
    g = torch.Generator().manual_seed(0)
    block_size = 16
    lens = [1, 17, 33, 100, 16]
    # Tables may hold more blocks than a sequence needs (allocated ahead); their order is arbitrary.
    tables = [torch.randperm(64, generator=g)[: -(-n // block_size) + extra].tolist() for n, extra in
              zip(lens, [0, 1, 0, 2, 0])]
    runner = ModelRunner(None, SimpleNamespace(attention_windows=(window,)), SimpleNamespace(block_size=block_size),
                         None, "cpu")
    gather, mask = runner._decode_index(tables, lens, window)
    want_gather, want_mask = reference(tables, lens, block_size, window)
    assert torch.equal(gather, want_gather) and torch.equal(mask, want_mask)
    assert gather.dtype == torch.long and mask.dtype == torch.bool
