"""SchedulerOutput -> input tensors -> forward -> logits of the rows that are sampled."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jisu.models.config import ModelConfig
from jisu.runner.attention import BLOCKED_PREFILL_MIN, AttentionMetadata, PrefillChunk, query_blocks, visible
from jisu.runner.kv_cache import KVCache
from jisu.scheduler.blocks import BlockManager
from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class StepInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    """Rows of the flattened tokens whose logits are needed (last token of each sampled sequence)."""
    sampled: list[ScheduledRequest]
    """The sequences that sample, in the order of sample_rows."""


class ModelRunner:
    def __init__(self, model, config: ModelConfig, kv_cache: KVCache, blocks: BlockManager, device):
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size

    def prepare(self, out: SchedulerOutput) -> StepInput:
        # Single-token steps (decodes) first so attention can batch them; then prefill chunks.
        # NOTE: a decode row is built from Python ints (its slot straight from the block table) and all decodes'
        # gather/mask in a few vectorised ops: at batch 1 this step's Python is a visible share of a 4-bit decode
        # step (per-sequence tensor ops measured 0.22 ms of a ~4.5 ms SmolLM2 step).
        ordered = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        decode_slots: list[int] = []
        prefill_slots: list[torch.Tensor] = []
        decode_tables, decode_lens = [], []
        prefills: list[PrefillChunk] = []
        sample_rows, sampled = [], []
        for s in ordered:
            req, n = s.request, s.num_new_tokens
            start_pos = req.num_computed_tokens
            row = len(ids)
            table = self.blocks.table(req.request_id)
            if n == 1:
                ids.append(_token_at(req, start_pos))
                positions.append(start_pos)
                decode_slots.append(table[start_pos // bs] * bs + start_pos % bs)
                decode_tables.append(table)
                decode_lens.append(start_pos + 1)
            else:
                ids.extend(req.all_token_ids[start_pos : start_pos + n])
                positions.extend(range(start_pos, start_pos + n))
                table_t = torch.tensor(table, dtype=torch.long)
                prefill_slots.append(self._slots(table_t, torch.arange(start_pos, start_pos + n)))
                prefills.append(self._prefill_chunk(row, n, start_pos, table_t))
            if s.samples:
                sample_rows.append(row + n - 1)
                sampled.append(s)
        slots = torch.tensor(decode_slots, dtype=torch.long)
        if prefill_slots:
            slots = torch.cat([slots, *prefill_slots])
        meta = AttentionMetadata(slot_mapping=slots.to(self.device), num_decodes=len(decode_lens), prefills=prefills)
        if decode_lens:
            meta.decode_gather, meta.decode_mask = self._decode_index(decode_tables, decode_lens)
        return StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sampled=sampled,
        )

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Returns float32 logits [len(step.sampled), vocab]."""
        if self.device.type == "cuda":
            # Device events time the forward on the GPU itself; host clocks would only see the launches.
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        hidden = self.model(step.input_ids, step.positions, step.meta, self.kv_cache.layers)
        logits = self.model.compute_logits(hidden[step.sample_rows])
        if self.device.type == "cuda":
            self._events[1].record()
        return logits

    def last_forward_device_time(self) -> float | None:
        """Seconds the last forward took on the device (CUDA only); waits for it to finish."""
        events = getattr(self, "_events", None)
        if events is None:
            return None
        events[1].synchronize()
        self._events = None
        return events[0].elapsed_time(events[1]) / 1000.0

    def _slots(self, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _prefill_chunk(self, row: int, n: int, start_pos: int, table: torch.Tensor) -> PrefillChunk:
        ctx = start_pos + n
        window = self.config.sliding_window
        if n >= BLOCKED_PREFILL_MIN and self.device.type == "cpu":
            gather = self._slots(table, torch.arange(ctx)) if start_pos > 0 else None
            blocks = query_blocks(n, start_pos, window, self.device)
            return PrefillChunk(row, n, ctx, gather=_to(gather, self.device), mask=None, query_blocks=blocks)
        if start_pos == 0 and (window is None or window >= n):
            # The chunk is the whole context: attend over its fresh K/V, plain causal.
            return PrefillChunk(row, n, ctx, gather=None, mask=None)
        k_pos = torch.arange(ctx)
        q_pos = torch.arange(start_pos, ctx)
        gather = self._slots(table, k_pos) if start_pos > 0 else None
        mask = visible(q_pos, k_pos, window)
        return PrefillChunk(row, n, ctx, gather=_to(gather, self.device), mask=mask.to(self.device))

    def _decode_index(self, tables: list[list[int]], lens: list[int]):
        """[D, max_ctx] slots of every decoding sequence's positions 0..ctx-1 (0 past its context) and the
        [D, 1, 1, max_ctx] mask of those it attends (all of them, or its sliding window)."""
        # numpy, not torch: these few small ops are dispatch-bound (measured 18 vs 62 us for one sequence).
        bs, max_ctx = self.block_size, max(lens)
        num_blocks = -(-max_ctx // bs)
        padded = [t[:num_blocks] + [0] * (num_blocks - min(len(t), num_blocks)) for t in tables]
        block_slots = np.array(padded, dtype=np.int64)[:, :, None] * bs
        gather = (block_slots + np.arange(bs)).reshape(len(lens), num_blocks * bs)[:, :max_ctx]
        k_pos = np.arange(max_ctx)
        last = np.array(lens, dtype=np.int64)[:, None] - 1  # each sequence's own position
        mask = k_pos <= last
        gather = gather * mask
        window = self.config.sliding_window
        if window is not None:
            mask &= k_pos > last - window
        return torch.from_numpy(gather).to(self.device), torch.from_numpy(mask)[:, None, None, :].to(self.device)


def _token_at(req, pos: int) -> int:
    """Token `pos` of a sequence (prompt, then output) without building the whole list."""
    prompt = req.prompt_token_ids
    return prompt[pos] if pos < len(prompt) else req.output_token_ids[pos - len(prompt)]


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
