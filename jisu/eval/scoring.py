"""Logits for every position of token sequences, computed through jisu's own engine path.

Each sequence is run as one prefill from an empty cache: it gets fresh KV blocks from the engine's block
manager, goes through ModelRunner.prepare/execute like any scheduled step (paged KV cache, same attention
kernels), and its blocks are freed afterwards. The scheduler is bypassed on purpose: it would look up
the prefix cache (a chunk must start from an empty cache) and only return the last row's logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from jisu.errors import InvalidRequestError, JisuError
from jisu.request import Request
from jisu.sampling_params import SamplingParams
from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput

_ids = itertools.count()


def score_batch(engine, sequences: list[list[int]], every_row: bool = True) -> list[torch.Tensor]:
    """float32 logits [len(seq), vocab] for every position of each sequence, all in one forward step (every_row
    False: only each sequence's last position, [1, vocab], for callers that want the step's activations, not
    its scores). Every KV block taken is given back, also on error."""
    if not sequences:
        return []
    limit = engine.max_model_len
    vocab = engine.model_config.vocab_size
    for seq in sequences:
        if not seq:
            raise InvalidRequestError("cannot score an empty token sequence")
        if len(seq) > limit:
            raise InvalidRequestError(f"sequence of {len(seq)} tokens exceeds the context window of {limit}")
        if min(seq) < 0 or max(seq) >= vocab:
            raise InvalidRequestError(f"token ids must lie in [0, {vocab})")
    blocks, runner = engine.blocks, engine.runner
    requests = [Request(f"eval-{next(_ids)}", seq, SamplingParams(max_tokens=1)) for seq in sequences]
    try:
        for req in requests:
            if not blocks.allocate(req.request_id, req.num_tokens):
                raise JisuError(
                    f"the KV cache has {blocks.num_free_blocks} free blocks, too few for {len(sequences)} "
                    f"sequences of up to {max(map(len, sequences))} tokens; score fewer at once"
                )
        out = SchedulerOutput([ScheduledRequest(req, req.num_tokens, samples=True) for req in requests])
        step = runner.prepare(out)
        if every_row:  # the runner's logits for every row instead of only each sequence's last one
            step.sample_rows = torch.arange(out.num_tokens, device=step.input_ids.device)
        logits = runner.execute(step).cpu()
    finally:
        for req in requests:
            blocks.free(req.request_id)
    # prepare() lays single-token sequences (decodes) out first, then the rest, each group in order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]) != 1)
    parts = logits.split([len(sequences[i]) if every_row else 1 for i in order])
    result: list[torch.Tensor] = [None] * len(sequences)  # type: ignore[list-item]
    for i, part in zip(order, parts):
        result[i] = part
    return result


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
