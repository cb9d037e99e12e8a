"""What every pruning method shares: argument checks, which tensors are linear layers, parameter counts, and
building the pruned Checkpoint (a new object; the input checkpoint and its tensors are never modified)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import torch

from jisu.errors import InvalidRequestError
from jisu.loader.checkpoint import Checkpoint
from jisu.models.config import ModelConfig

LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_LAYER = "lm_head.weight"
_LAYER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LINEAR_PROJECTIONS) + r")\.weight")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class PruneError(InvalidRequestError):
    """A pruning request that cannot be carried out: the message names the argument and what is allowed."""


def check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1): the share of something to remove."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PruneError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise PruneError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_count(name: str, value: Any, available: int, what: str, keep_one: bool = True) -> int:
    """A whole number of things to remove, leaving at least one when keep_one."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PruneError(f"{name} must be a whole number >= 0, got {value!r}")
    limit = available - 1 if keep_one else available
    if value > limit:
        raise PruneError(
            f"cannot remove {value} of the model's {available} {what}"
            + ("; at least one must remain" if keep_one else "")
        )
    return value


def linear_weight_names(checkpoint: Checkpoint, include_output: bool = False) -> list[str]:
    """The linear layers' weight matrices: q/k/v/o and gate/up/down of every layer, plus lm_head when
    include_output and the output layer is its own matrix (a tied one is the embedding, which is never pruned).
    Embeddings, norms and biases are never included."""
    names = [n for n in checkpoint.tensors if _LAYER_LINEAR.fullmatch(n)]
    if include_output and not checkpoint.config.tie_word_embeddings and OUTPUT_LAYER in checkpoint.tensors:
        names.append(OUTPUT_LAYER)
    for n in names:
        t = checkpoint.tensors[n]
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS or t.dim() != 2:
            kind = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise PruneError(f"cannot prune {n}: it is {kind}, not a float matrix (prune before quantizing)")
    return names


def count_parameters(checkpoint: Checkpoint) -> int:
    """Stored parameters (a tied output layer counts once: it is the embedding)."""
    return sum(t.numel() for n, t in _unique(checkpoint))


def count_nonzero(checkpoint: Checkpoint) -> int:
    return sum(int(torch.count_nonzero(t)) for n, t in _unique(checkpoint))


def _unique(checkpoint: Checkpoint):
    for name, t in checkpoint.tensors.items():
        if name == OUTPUT_LAYER and checkpoint.config.tie_word_embeddings:
            continue
        yield name, t


def pruned_checkpoint(
    source: Checkpoint, tensors: dict[str, torch.Tensor], report: dict[str, Any], config: ModelConfig | None = None
) -> Checkpoint:
    """A new Checkpoint with `tensors` (untouched tensors may be shared with `source`: nothing modifies them) and
    the report appended to metadata["pruning"], a list of every pruning step applied so far."""
    config = config or source.config
    before = count_parameters(source)
    result = Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=source.tokenizer,
        source=source.source,
        metadata={**source.metadata},
    )
    report = {**report, "params_before": before, "params_after": count_parameters(result)}
    result.metadata["pruning"] = [*source.metadata.get("pruning", []), report]
    return result


def replace_config(config: ModelConfig, **changes: Any) -> ModelConfig:
    return replace(config, **changes)


def layer_prefix(n: int) -> str:
    return f"model.layers.{n}."
