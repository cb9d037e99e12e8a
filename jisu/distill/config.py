"""What a distillation run is told: its schedule, loss and what it trains. Free of torch, so `jisu --help` stays
fast."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jisu.errors import InvalidRequestError

TRAINABLE = ("layers", "all", "attention", "mlp", "norms", "embeddings")
"""What --train may name (comma-separated): layers = every weight of every layer plus the final norm (default);
all = layers + embeddings (and an untied output layer); the others are those parts alone."""
STATE_FILE = "distill-state.pt"


@dataclass
class DistillConfig:
    steps: int = 300
    minutes: float | None = None
    """Wall-time budget; the schedule follows elapsed time when it is the tighter limit."""
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    """Weight of the hidden-state loss (0: logits only)."""
    train: str = "layers"
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    device: str = "cpu"

    def check(self) -> None:
        def need(ok: bool, flag: str, value: Any, allowed: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{flag} is {value!r}; allowed: {allowed}")

        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(whole(self.steps) and self.steps >= 1, "--steps", self.steps, "an integer >= 1")
        need(self.minutes is None or (isinstance(self.minutes, (int, float)) and 0 < self.minutes < 1e6
                                      and math.isfinite(self.minutes)), "--minutes", self.minutes, "a number > 0")
        need(whole(self.batch_size) and 1 <= self.batch_size <= 4096, "--batch-size", self.batch_size,
             "an integer from 1 to 4096")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "--lr", self.lr, "a number in (0, 1)")
        need(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio", self.min_lr_ratio, "a number in [0, 1]")
        need(whole(self.warmup_steps) and self.warmup_steps >= 0, "--warmup-steps", self.warmup_steps,
             "an integer >= 0")
        need(0 <= self.weight_decay < 1, "--weight-decay", self.weight_decay, "a number in [0, 1)")
        need(isinstance(self.temperature, (int, float)) and 0.05 <= self.temperature <= 100, "--temperature",
             self.temperature, "a number from 0.05 to 100")
        need(isinstance(self.hidden_weight, (int, float)) and 0 <= self.hidden_weight <= 1e4, "--hidden-weight",
             self.hidden_weight, "a number >= 0")
        need(self.grad_clip > 0, "--grad-clip", self.grad_clip, "a number > 0")
        need(whole(self.checkpoint_every) and self.checkpoint_every >= 1, "--checkpoint-every",
             self.checkpoint_every, "an integer >= 1")
        parts = [p.strip() for p in str(self.train).split(",") if p.strip()]
        bad = [p for p in parts if p not in TRAINABLE]
        need(bool(parts) and not bad, "--train", self.train, f"a comma-separated list of {', '.join(TRAINABLE)}")


