"""SchedulerOutput -> input tensors -> forward -> logits of the rows that are sampled.

NOTE: deterministic (batch-invariant) steps. A token's numbers must not depend on what shares its step: other
sequences, the rest of its prompt chunk, or whether its prefix came from the prefix cache (then its first rows
are computed in a step of their own). Products over a batch of rows (GEMMs, batched attention with padding)
sum in orders that depend on the batch's shape, and the int8/int4 kernels round activations to int16 only up to
192 rows, so a prompt prefilled in one chunk and the same prompt with a cached prefix gave different tokens at
temperature 0. In deterministic mode every token is computed as a decode row at its own position (attending
the cache slots up to it) in groups that only row-invariant code runs: the fused C++ stack (every product on
`qweight_matvec`, whose per-row order depends on neither the row count nor the thread split; attention chunked
by the row's own context length) takes up to MAX_FUSED_SEQS rows a call; without it (no C++ kernels, CUDA) each
row is a forward of its own. Rows of one sequence stay in position order, so a row's earlier tokens are in the
cache (written earlier in the same call, or by an earlier group) when it attends.

NOTE: prompt rows. A request with prompt_logprobs (or a pooling request) keeps the rows of its prompt positions
from the same forward that fills the cache, not a second run: StepInput.logprob_rows / hidden_rows say which,
execute() fills StepInput.prompt_logprobs / hidden, and the engine stores them by position (a recompute after
preemption overwrites). Logprob rows pass the output layer in groups (logits_group rows in deterministic steps),
so a long prompt never holds [prompt_len, vocab] logits, and vLLM's rule holds: such a request skips the prefix
cache, since its rows must be computed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from jisu.models.config import ModelConfig
from jisu.models.fused_decode import FUSED_KV_DTYPES, MAX_FUSED_SEQS
from jisu.runner.attention import (
    BLOCKED_PREFILL_MIN,
    KERNEL_CACHE_DTYPES,
    AttentionMetadata,
    PrefillChunk,
    query_blocks,
    visible,
)
from jisu.runner.kv_cache import KVCache
from jisu.scheduler.blocks import BlockManager
from jisu.request import Request
from jisu.sampling import TokenLogprobs
from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput

LOGITS_ROWS = 128
"""Whole steps push kept prompt rows through the output layer at most this many at a time: a long prompt's
[prompt_len, vocab] logits are never held at once (deterministic steps use their own, smaller, logits_group)."""


@dataclass
class RowGroup:
    """Rows [start, end) of a step's flattened tokens that run through the model in one forward."""

    start: int
    end: int
    meta: AttentionMetadata


@dataclass
class KeptRows:
    """Rows [row, row + count) of a step's flattened tokens, positions pos.., whose results the request keeps:
    prompt logprobs (the row at p scores prompt token p + 1) or final hidden states for pooling."""

    request: Request
    row: int
    pos: int
    count: int


@dataclass
class StepInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    """The whole step's attention metadata (the first group's when the step runs in several groups)."""
    sample_rows: torch.Tensor
    """Rows of the flattened tokens whose logits are needed (last token of each sampled sequence; with k draft
    tokens to verify, its last 1 + k rows)."""
    sampled: list[ScheduledRequest]
    """The sequences that sample, in the order of sample_rows."""
    sample_counts: list[int] = field(default_factory=list)
    """Rows of sample_rows per sampled sequence: 1, or 1 + its draft tokens (speculative decoding verifies
    them all in this forward; in deterministic steps each is the row plain decoding would compute there)."""
    batch: list[tuple[int, int, bool]] = field(default_factory=list)
    """Per scheduled sequence, in row order: (tokens computed, context length after them, whether it samples)."""
    groups: list[RowGroup] | None = None
    """Deterministic steps: the forwards that compute the rows, in order (None: one forward of every row)."""
    logits_group: int | None = None
    """Deterministic steps: sampled rows go through the output layer at most this many at a time."""
    logprob_rows: list[KeptRows] = field(default_factory=list)
    """Rows whose logits score the next prompt token (requests with prompt_logprobs)."""
    hidden_rows: list[KeptRows] = field(default_factory=list)
    """Rows whose final hidden states a pooling request keeps."""
    prompt_logprobs: list[tuple[Request, int, list[TokenLogprobs]]] = field(default_factory=list)
    """Filled by execute: (request, position of the first row, logprobs of the prompt tokens after each row)."""
    hidden: list[tuple[Request, int, torch.Tensor]] = field(default_factory=list)
    """Filled by execute: (request, position of the first row, float32 hidden states on the CPU)."""


class ModelRunner:
    def __init__(self, model, config: ModelConfig, kv_cache: KVCache, blocks: BlockManager, device,
                 deterministic: bool = False):
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size
        self.deterministic = deterministic
        """Batch-invariant steps (see the module's NOTE)."""
        self.windows = config.attention_windows
        """The layers' distinct attention windows: a step's indices are built once for each."""
        self.prefill_kernels = _prefill_kernels(model, kv_cache)
        """jisu's C++ kernels when prefill chunks attend in them (CPU), else None (torch's SDPA)."""

    def row_group(self) -> int | None:
        """How many rows one deterministic forward may take: MAX_FUSED_SEQS on the fused C++ stack, 1 on the
        eager layers; None when steps run whole (not deterministic, or module hooks are installed: the profiler and
        calibration measure the eager layers on the step's real shapes)."""
        if not self.deterministic:
            return None
        model = self.model
        fused = getattr(model, "fused_decode", None)
        if fused is not None and not getattr(model, "use_fused_decode", True):
            return None
        if fused is not None and self.kv_cache.layers[0][0].dtype in FUSED_KV_DTYPES:
            return MAX_FUSED_SEQS
        return 1

    def prepare(self, out: SchedulerOutput) -> StepInput:
        group = self.row_group()
        # A step of at most `group` decodes is already one row-invariant forward.
        if group is not None and not (len(out.scheduled) <= group and all(s.num_new_tokens == 1 for s in out.scheduled)):
            return self._prepare_rows(out, group)
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
        batch = []
        logprob_rows, hidden_rows = [], []
        for s in ordered:
            req, n = s.request, s.num_new_tokens
            start_pos = req.num_computed_tokens
            batch.append((n, start_pos + n, s.samples))
            row = len(ids)
            _kept_rows(req, row, start_pos, n, logprob_rows, hidden_rows)
            table = self.blocks.table(req.request_id)
            if n == 1:
                ids.append(_token_at(req, start_pos))
                positions.append(start_pos)
                decode_slots.append(table[start_pos // bs] * bs + start_pos % bs)
                decode_tables.append(table)
                decode_lens.append(start_pos + 1)
            else:
                ids.extend(_tokens(req, start_pos, n, s.num_spec))
                positions.extend(range(start_pos, start_pos + n))
                table_t = torch.tensor(table, dtype=torch.long)
                prefill_slots.append(self._slots(table_t, torch.arange(start_pos, start_pos + n)))
                prefills.append((row, n, start_pos, table_t))
            if s.samples:
                sample_rows.extend(range(row + n - 1 - s.num_spec, row + n))
                sampled.append(s)
        slots = torch.tensor(decode_slots, dtype=torch.long)
        if prefill_slots:
            slots = torch.cat([slots, *prefill_slots])
        slots = slots.to(self.device)
        metas = []
        for window in self.windows:
            meta = AttentionMetadata(slot_mapping=slots, num_decodes=len(decode_lens), window=window,
                                     prefills=[self._prefill_chunk(*p, window) for p in prefills],
                                     kernels=self.prefill_kernels if prefills else None)
            if decode_lens:
                meta.decode_gather, meta.decode_mask = self._decode_index(decode_tables, decode_lens, window)
            metas.append(meta)
        meta = _with_others(metas)
        return StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sampled=sampled,
            sample_counts=[1 + s.num_spec for s in sampled],
            batch=batch,
            logprob_rows=logprob_rows,
            hidden_rows=hidden_rows,
        )

    def _prepare_rows(self, out: SchedulerOutput, group: int) -> StepInput:
        """A deterministic step: every token a decode-shaped row at its own position, in forwards of at most
        `group` rows (see the module's NOTE)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        sample_rows, sampled = [], []
        batch = []
        logprob_rows, hidden_rows = [], []
        # Rows in prepare()'s order (decodes first), which callers of the runner rely on (eval.scoring).
        for s in sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1):
            req, n = s.request, s.num_new_tokens
            start_pos = req.num_computed_tokens
            batch.append((n, start_pos + n, s.samples))
            _kept_rows(req, len(ids), start_pos, n, logprob_rows, hidden_rows)
            table = self.blocks.table(req.request_id)
            for pos in range(start_pos, start_pos + n):
                ids.append(_token_at(req, pos))
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
                tables.append(table)
            if s.samples:
                sample_rows.extend(range(len(ids) - 1 - s.num_spec, len(ids)))
                sampled.append(s)
        slot_t = torch.tensor(slots, dtype=torch.long)
        groups = []
        for start in range(0, len(ids), group):
            end = min(len(ids), start + group)
            metas = []
            for window in self.windows:
                meta = AttentionMetadata(slot_mapping=slot_t[start:end].to(self.device), num_decodes=end - start,
                                         window=window)
                meta.decode_gather, meta.decode_mask = self._decode_index(
                    tables[start:end], [p + 1 for p in positions[start:end]], window
                )
                metas.append(meta)
            groups.append(RowGroup(start, end, _with_others(metas)))
        return StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=groups[0].meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sampled=sampled,
            sample_counts=[1 + s.num_spec for s in sampled],
            batch=batch,
            groups=groups,
            logits_group=group,
            logprob_rows=logprob_rows,
            hidden_rows=hidden_rows,
        )

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Returns float32 logits [len(step.sample_rows), vocab]: one row per sampled sequence, 1 + k for one
        verifying k draft tokens (step.sample_counts)."""
        if self.device.type == "cuda":
            # Device events time the forward on the GPU itself; host clocks would only see the launches.
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        if step.groups is None:
            hidden = self.model(step.input_ids, step.positions, step.meta, self.kv_cache.layers)
            logits = self.model.compute_logits(hidden[step.sample_rows])
            # A deterministic step comes here only as <= row_group() decode rows: keep its logits group.
            self._keep_rows(step, hidden, 0, hidden.shape[0], step.logits_group or self.row_group() or LOGITS_ROWS)
        else:
            logits = self._execute_groups(step)
        if self.device.type == "cuda":
            self._events[1].record()
        return logits

    def _execute_groups(self, step: StepInput) -> torch.Tensor:
        sample_rows = step.sample_rows.tolist()
        kept: list[torch.Tensor] = []
        i = 0
        for g in step.groups:
            hidden = self.model(step.input_ids[g.start : g.end], step.positions[g.start : g.end], g.meta,
                                self.kv_cache.layers)
            self._keep_rows(step, hidden, g.start, g.end, step.logits_group)
            j = i
            while j < len(sample_rows) and sample_rows[j] < g.end:
                j += 1
            if j > i:
                kept.append(hidden[torch.tensor(sample_rows[i:j], device=hidden.device) - g.start])
            i = j
        if not kept:  # a step of prefill chunks that do not end their prompts
            return torch.empty((0, self.config.vocab_size), device=self.device)
        hidden = torch.cat(kept)
        n = step.logits_group
        return torch.cat([self.model.compute_logits(hidden[r : r + n]) for r in range(0, hidden.shape[0], n)])

    def _keep_rows(self, step: StepInput, hidden: torch.Tensor, lo: int, hi: int, group: int) -> None:
        """The kept rows among rows [lo, hi) (`hidden` holds exactly those): prompt logprobs, and hidden states
        copied out for pooling. Every request's logprob rows go through the output layer together, `group` rows a
        call: a call reads the whole output matrix, and up to `group` rows (deterministic steps) a row's logits
        depend on that row alone, so a prompt's logprobs do not depend on its chunking or batch."""
        pieces = []  # (request, position of its first row here, first row, end row)
        for kept in step.logprob_rows:
            a, b = max(kept.row, lo), min(kept.row + kept.count, hi)
            if a < b:
                pieces.append((kept.request, kept.pos + (a - kept.row), a, b))
        if pieces:
            rows = [r - lo for _, _, a, b in pieces for r in range(a, b)]
            targets = [t for req, pos, a, b in pieces for t in req.prompt_token_ids[pos + 1 : pos + 1 + b - a]]
            k = max(req.prompt_logprobs_k for req, *_ in pieces)
            index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
            entries: list[TokenLogprobs] = []
            for r in range(0, len(rows), group):
                logits = self.model.compute_logits(hidden[index[r : r + group]])
                entries.extend(token_logprobs(logits, targets[r : r + group], k))
            start = 0
            for req, pos, a, b in pieces:
                mine = entries[start : start + b - a]
                start += b - a
                if req.prompt_logprobs_k < k:
                    for e in mine:
                        e.top = e.top[: req.prompt_logprobs_k]
                step.prompt_logprobs.append((req, pos, mine))
        for kept in step.hidden_rows:
            a, b = max(kept.row, lo), min(kept.row + kept.count, hi)
            if a < b:
                rows = hidden[a - lo : b - lo].to(device="cpu", dtype=torch.float32)
                step.hidden.append((kept.request, kept.pos + (a - kept.row), rows))

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

    def _prefill_chunk(self, row: int, n: int, start_pos: int, table: torch.Tensor, window: int | None) -> PrefillChunk:
        ctx = start_pos + n
        if self.prefill_kernels is not None:
            # The C++ kernel masks by position: it needs only the slots to read (none: the chunk's own K/V).
            gather = self._slots(table, torch.arange(ctx)) if start_pos > 0 else None
            return PrefillChunk(row, n, ctx, gather=gather, mask=None)
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

    def _decode_index(self, tables: list[list[int]], lens: list[int], window: int | None):
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
        if window is not None:
            mask &= k_pos > last - window
        return torch.from_numpy(gather).to(self.device), torch.from_numpy(mask)[:, None, None, :].to(self.device)


def _kept_rows(req: Request, row: int, start_pos: int, n: int, logprob_rows: list, hidden_rows: list) -> None:
    """The rows of a chunk (positions start_pos..start_pos + n - 1 at rows row..) the request keeps. Only prompt
    positions count: a recompute after preemption also runs output tokens, which are scored by sampling."""
    prompt_len = len(req.prompt_token_ids)
    if req.prompt_logprobs is not None:
        end = min(start_pos + n, prompt_len - 1)  # the row at p scores token p + 1, a prompt token
        if end > start_pos:
            logprob_rows.append(KeptRows(req, row, start_pos, end - start_pos))
    if req.pooling is not None:
        if req.pooling.kind == "mean":
            end = min(start_pos + n, prompt_len)
            if end > start_pos:
                hidden_rows.append(KeptRows(req, row, start_pos, end - start_pos))
        elif start_pos <= prompt_len - 1 < start_pos + n:
            hidden_rows.append(KeptRows(req, row + prompt_len - 1 - start_pos, prompt_len - 1, 1))


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Per row of `logits`, the log-softmax of its target token, that token's rank (1 = most likely) and the
    top `k` (token id, logprob): the same numbers Sampler gives a sampled token."""
    lp = torch.log_softmax(logits.to(torch.float32), dim=1)
    target = torch.tensor(targets, dtype=torch.long, device=lp.device).unsqueeze(1)
    chosen = lp.gather(1, target)
    ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
    chosen = chosen.squeeze(1).tolist()
    if k:
        top_values, top_ids = lp.topk(min(k, lp.shape[1]), dim=1)
        top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_values.tolist())]
    else:
        top = [[] for _ in targets]
    return [TokenLogprobs(token_id=t, logprob=c, rank=r, top=tp) for t, c, r, tp in zip(targets, chosen, ranks, top)]


def _prefill_kernels(model, kv_cache):
    """The model's attention kernels (DecoderForCausalLM.attention_kernels: CPU, float32, C++ kernels on) where its
    cache dtype is one they read; else None."""
    kernels = getattr(model, "attention_kernels", None)
    if kernels is None or kv_cache.layers[0][0].dtype not in KERNEL_CACHE_DTYPES:
        return None
    return kernels


def _with_others(metas: list[AttentionMetadata]) -> AttentionMetadata:
    """The first window's metadata, carrying the others' for layers with another window."""
    first = metas[0]
    if len(metas) > 1:
        first.by_window = {m.window: m for m in metas[1:]}
    return first


def _token_at(req, pos: int) -> int:
    """Token `pos` of a sequence (prompt, then output, then draft tokens) without building the whole list."""
    prompt = req.prompt_token_ids
    if pos < len(prompt):
        return prompt[pos]
    out = req.output_token_ids
    i = pos - len(prompt)
    return out[i] if i < len(out) else req.spec_token_ids[i - len(out)]


def _tokens(req, start: int, n: int, num_spec: int) -> list[int]:
    """Tokens start .. start + n - 1 of a sequence, draft tokens included when the step verifies them."""
    ids = req.all_token_ids
    return (ids + req.spec_token_ids if num_spec else ids)[start : start + n]


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
