"""prune(): one entry point over every method (see the package docstring)."""

from __future__ import annotations

import os

from jisu.loader.checkpoint import Checkpoint
from jisu.prune.calibration import (
    DEFAULT_NEW_TOKENS,
    ActivationStats,
    calibration_prompts,
    collect_stats,
)
from jisu.prune.common import (
    PruneError,
    count_nonzero,
    count_parameters,
    linear_weight_names,
)
from jisu.prune.structured import (
    SCORES,
    ffn_scores,
    head_group_scores,
    heads_to_remove,
    layer_scores,
    prune_ffn,
    prune_heads,
    prune_layers,
)
from jisu.prune.unstructured import magnitude_prune, nm_prune, parse_nm

METHODS = ("unstructured", "2:4", "ffn", "heads", "layers")
"""The named methods; any N:M pattern (e.g. 4:8) is accepted as well."""


def prune(
    checkpoint: Checkpoint,
    method: str,
    amount: float | int | None = None,
    *,
    include_output: bool = False,
    score: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    stats: ActivationStats | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
) -> Checkpoint:
    """One entry point for every method. `amount` means:

    - unstructured: the sparsity in [0, 1) of every linear matrix;
    - N:M (2:4, ...): unused (leave None);
    - ffn: the fraction in [0, 1) of intermediate channels removed from every layer;
    - heads: a whole number >= 1 of kv-head groups removed from every layer, or a fraction in [0, 1) of the
      attention heads (it must come to whole GQA groups: 1/3 of SmolLM2's 9 heads = 1 of its 3 groups);
    - layers: the number of layers removed.

    score: "weight" (weights only, no calibration run) or "activation" (statistics of calibration prompts run
    through the engine). Default: "weight" (|w|, magnitude pruning) for unstructured / N:M, "activation" for
    ffn / heads; layers always use activations. include_output: unstructured / N:M also prune lm_head when it
    is not tied to the embedding. calibration: None (built-in prompts), a .jsonl prompt file or a text file.
    stats: activation statistics already gathered with collect_stats (skips the calibration run).
    """
    if not isinstance(method, str):
        raise PruneError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}")
    kw = dict(stats=stats, calibration=calibration, new_tokens=new_tokens)
    if method == "unstructured":
        return magnitude_prune(checkpoint, _required(method, amount), include_output, score or "weight", **kw)
    if ":" in method:
        n, m = parse_nm(method)
        if amount is not None:
            raise PruneError(f"{method} pruning takes no amount (it always keeps {n} of every {m} weights)")
        return nm_prune(checkpoint, n, m, include_output, score or "weight", **kw)
    if method == "ffn":
        return prune_ffn(checkpoint, _required(method, amount), score or "activation", **kw)
    if method == "heads":
        count = heads_to_remove(checkpoint.config, _required(method, amount))
        return prune_heads(checkpoint, count, score=score or "activation", **kw)
    if method == "layers":
        if score not in (None, "activation"):
            raise PruneError("layer pruning always scores layers on calibration activations (score 'activation')")
        return prune_layers(checkpoint, _required(method, amount), **kw)
    raise PruneError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)} (or any N:M like 4:8)")


def _required(method: str, amount):
    if amount is None:
        raise PruneError(f"{method} pruning needs an amount")
    return amount


__all__ = [
    "METHODS", "SCORES", "ActivationStats", "PruneError", "calibration_prompts", "collect_stats", "count_nonzero",
    "count_parameters", "ffn_scores", "head_group_scores", "heads_to_remove", "layer_scores", "linear_weight_names",
    "magnitude_prune", "nm_prune", "parse_nm", "prune", "prune_ffn", "prune_heads", "prune_layers",
]
