"""Weight-level pruning: zeros inside matrices whose shapes stay the same.

- magnitude_prune: per matrix, the round(sparsity * size) least important weights become 0.
- nm_prune (2:4 and other N:M patterns): in every group of M consecutive inputs of each output row, all but
  the N most important weights become 0 (the pattern sparse tensor cores accelerate).

Importance is |w| (score "weight", the default) or, with score "activation", |w_ij| * sqrt(mean x_j^2) where
x_j is input j of the matrix on calibration text (Wanda's criterion: a small weight on a loud input matters).

Only linear layers are touched (q/k/v/o, gate/up/down; lm_head only with include_output and only when it is
not tied to the embedding). NOTE: the matrices stay dense, so jisu's dense kernels run exactly as fast as
before; what this buys is a model a sparse kernel or a compressor could exploit, at a measured quality cost.
"""

from __future__ import annotations

import os

import torch

from jisu.loader.checkpoint import Checkpoint
from jisu.prune.calibration import DEFAULT_NEW_TOKENS, ActivationStats, ensure_stats
from jisu.prune.common import (
    PruneError,
    check_fraction,
    linear_weight_names,
    pruned_checkpoint,
)

UNSTRUCTURED_SCORES = ("weight", "activation")
"""weight: |w| (magnitude pruning, the default); activation: |w_ij| * sqrt(mean x_j^2) on calibration inputs."""


def _importance(name: str, w: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """|w|, or with activation statistics |w_ij| * sqrt(mean x_j^2) (Wanda's criterion)."""
    score = w.detach().abs().float()
    if stats is not None:
        score = score * stats.input_sq[name].sqrt()[None, :]
    return score


def _smallest(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the k smallest entries; of equal values, the earlier positions go first (what a stable
    sort would pick, in O(n) with a k-th value selection)."""
    threshold = importance.kthvalue(k).values
    mask = importance < threshold
    ties = (importance == threshold).nonzero().squeeze(1)
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def _scoring(checkpoint: Checkpoint, score: str, stats, calibration, new_tokens) -> ActivationStats | None:
    if score not in UNSTRUCTURED_SCORES:
        raise PruneError(f"unknown importance score {score!r}; choose one of: {', '.join(UNSTRUCTURED_SCORES)}")
    return ensure_stats(checkpoint, stats, calibration, new_tokens) if score == "activation" else None


def magnitude_prune(
    checkpoint: Checkpoint,
    sparsity: float,
    include_output: bool = False,
    score: str = "weight",
    stats: ActivationStats | None = None,
    calibration: str | os.PathLike[str] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
) -> Checkpoint:
    """Zero the least important share `sparsity` of every linear matrix (exactly round(sparsity * numel) of
    them, ties broken by position). score "weight": smallest |w| (magnitude pruning); "activation": smallest
    |w_ij| * sqrt(mean x_j^2) over calibration inputs. Returns a new Checkpoint."""
    sparsity = check_fraction("sparsity", sparsity)
    names = linear_weight_names(checkpoint, include_output)
    stats = _scoring(checkpoint, score, stats, calibration, new_tokens) if sparsity else None
    tensors = dict(checkpoint.tensors)
    zeroed = 0
    for name in names:
        w = tensors[name]
        k = round(sparsity * w.numel())
        if k == 0:
            continue
        drop = _smallest(_importance(name, w, stats).reshape(-1), k)
        tensors[name] = w.detach().reshape(-1).masked_fill(drop, 0).reshape(w.shape)
        zeroed += k
    report = {"method": "unstructured", "amount": sparsity, "score": score, "matrices": len(names),
              "weights_zeroed": zeroed, "include_output": include_output, **_calibrated(stats)}
    return pruned_checkpoint(checkpoint, tensors, report)


def _calibrated(stats: ActivationStats | None) -> dict:
    return {"calibration": {"source": stats.source, "tokens": stats.tokens}} if stats is not None else {}


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    try:
        n_text, m_text = str(pattern).split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise PruneError(f"an N:M pattern is two whole numbers like 2:4, got {pattern!r}") from None
    if not 0 < n <= m:
        raise PruneError(f"N:M pattern {pattern!r} must keep 1 <= N <= M weights of every M")
    return n, m


def nm_prune(
    checkpoint: Checkpoint,
    n: int = 2,
    m: int = 4,
    include_output: bool = False,
    score: str = "weight",
    stats: ActivationStats | None = None,
    calibration: str | os.PathLike[str] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
) -> Checkpoint:
    """In every group of `m` consecutive inputs of each row of every linear matrix keep the `n` most important
    weights (score as in magnitude_prune; ties: the earlier input) and zero the rest. Returns a new Checkpoint."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) or not 0 < n <= m:
        raise PruneError(f"N:M pruning keeps N of every M weights with 1 <= N <= M, got {n}:{m}")
    names = linear_weight_names(checkpoint, include_output)
    for name in names:
        if checkpoint.tensors[name].shape[1] % m:
            raise PruneError(f"{n}:{m} pruning needs the input size of every matrix divisible by {m}; "
                             f"{name} has {checkpoint.tensors[name].shape[1]} inputs")
    stats = _scoring(checkpoint, score, stats, calibration, new_tokens) if n < m else None
    tensors = dict(checkpoint.tensors)
    zeroed = 0
    for name in names:
        w = tensors[name].detach()
        if n == m:
            continue
        rows, cols = w.shape
        groups = w.reshape(rows, cols // m, m)
        importance = _importance(name, w, stats).reshape(rows, cols // m, m)
        # A stable descending sort: of equal importance, the earlier input is kept.
        order = torch.argsort(importance, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        tensors[name] = groups.masked_fill(~keep, 0).reshape(rows, cols)
        zeroed += rows * (cols // m) * (m - n)
    report = {"method": f"{n}:{m}", "amount": f"{n}:{m}", "score": score, "matrices": len(names),
              "weights_zeroed": zeroed, "include_output": include_output, **_calibrated(stats)}
    return pruned_checkpoint(checkpoint, tensors, report)
