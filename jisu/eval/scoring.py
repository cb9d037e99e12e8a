"""Logits for every position of token sequences, computed through jisu's own engine path.

Each sequence is run as one prefill from an empty cache: it gets fresh KV blocks from the engine's block
manager, goes through ModelRunner.prepare/execute like any scheduled step (paged KV cache, same attention
kernels), and its blocks are freed afterwards. The scheduler is bypassed on purpose: it would look up
the prefix cache (a chunk must start from an empty cache) and only return the last row's logits.
score_batch lives with the model it runs (jisu/model_run.py), as calibration runs it on a model without an engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from jisu.model_run import score_batch

__all__ = ["score_batch", "score_chunks"]


def score_chunks(engine, chunks: Iterable[list[int]], batch_tokens: int = 1024) -> Iterator[torch.Tensor]:
    """score_batch over many sequences, packing up to `batch_tokens` tokens (and the KV cache's room) a step;
    yields each sequence's logits in order."""
    pending: list[list[int]] = []
    size = 0
    seqs_room = engine.config.scheduler.max_num_seqs
    for chunk in chunks:
        if pending and (size + len(chunk) > batch_tokens or len(pending) >= seqs_room):
            yield from score_batch(engine, pending)
            pending, size = [], 0
        pending.append(list(chunk))
        size += len(chunk)
    if pending:
        yield from score_batch(engine, pending)
