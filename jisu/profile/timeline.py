"""The engine's step timeline: what each step did and how long each phase took.

NOTE: recording costs six clock reads and one small object per step (about 2 us against steps of
milliseconds), so it is always on; the log is bounded so a long-running server does not grow without end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

PHASES = ("schedule", "prepare", "forward", "sample", "detokenize", "draft")


@dataclass
class StepRecord:
    index: int
    start: float
    """time.perf_counter() at the start of the step."""
    schedule: float
    prepare: float
    forward: float
    """Host time of the forward pass (including waiting for the device to finish)."""
    sample: float
    detokenize: float
    """Appending tokens, stop checks, detokenization and building outputs for callers / streams."""
    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int
    num_decodes: int
    num_preempted: int = 0
    batch: tuple[tuple[int, int, bool], ...] = ()
    """Per sequence: (new tokens, context length after the step, whether it sampled) — what the roofline
    model needs to cost the step."""
    forward_device: float | None = None
    """Forward time measured with device events (CUDA), when on a GPU."""
    draft: float = 0.0
    """Speculative decoding: proposing the next step's draft tokens (prompt lookup or the draft model's steps).
    Their verification is part of this step's forward (one row per draft) and sample (rejection sampling)."""
    num_draft_tokens: int = 0
    """Draft tokens this step verified."""
    num_accepted_tokens: int = 0
    """Of those, accepted."""

    @property
    def total(self) -> float:
        return self.schedule + self.prepare + self.forward + self.sample + self.detokenize + self.draft

    @property
    def end(self) -> float:
        return self.start + self.total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


class StepLog:
    """The most recent `capacity` steps, oldest first."""

    def __init__(self, capacity: int = 100_000):
        self.records: deque[StepRecord] = deque(maxlen=capacity)
        self.count = 0

    def add(self, record: StepRecord) -> None:
        self.records.append(record)
        self.count += 1

    def since(self, start_index: int) -> list[StepRecord]:
        return [r for r in self.records if r.index >= start_index]

    def clear(self) -> None:
        self.records.clear()
