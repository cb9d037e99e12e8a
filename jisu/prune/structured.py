"""Structured pruning: remove whole FFN channels, kv-head groups or layers, so the matrices (and the config)
really shrink and every later matrix product does less work.

Each unit gets an importance score and the least important go. Scores (see calibration.py for how the
activation statistics are gathered through the engine):

- FFN channel j of layer l, score "activation" (default): ffn_sq[l][j] * ||down[:, j]||^2, the mean squared
  norm of what the channel adds to the layer's output on calibration text, i.e. exactly the output change its
  removal causes at that layer. Score "weight" (no calibration run): ||gate_j|| * ||up_j|| * ||down[:, j]||.
  Every layer loses the same number of channels so intermediate_size stays one number.
- KV group g of layer l (the kv head and the num_heads / num_kv_heads query heads that read it), score
  "activation": head_sq[l][g], the mean squared norm of the group's contribution to o_proj's output.
  "weight": sum over its query heads h of ||W_v[g]|| * ||W_o[:, h]||. Every layer loses the same number of
  groups; head_dim stays explicit in the config, since heads * head_dim no longer equals hidden_size.
- Layer l: mean 1 - cos(hidden in, hidden out) over calibration tokens; the layers that turn the residual
  stream least are dropped and the rest renumbered.

All of them work on HF-named tensors in HF row order: heads are contiguous blocks of head_dim rows in q/k/v
and of head_dim columns in o_proj, whatever order the engine later gives the rows inside a head for rotary.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from jisu.loader.checkpoint import Checkpoint
from jisu.prune.calibration import DEFAULT_NEW_TOKENS, ActivationStats, ensure_stats
from jisu.prune.common import (
    PruneError,
    check_count,
    check_fraction,
    layer_prefix,
    pruned_checkpoint,
    replace_config,
)

SCORES = ("activation", "weight")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise PruneError(f"unknown importance score {score!r}; choose one of: {', '.join(SCORES)}")
    return score


def _stats(checkpoint, stats, calibration, new_tokens) -> ActivationStats:
    return ensure_stats(checkpoint, stats, calibration, new_tokens)


def _calibration(stats: ActivationStats | None, score: str) -> dict[str, Any]:
    if stats is None or score != "activation":
        return {}
    return {"calibration": {"source": stats.source, "tokens": stats.tokens}}


def _float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    t = checkpoint.tensors.get(name)
    if t is None:
        raise PruneError(f"cannot prune {checkpoint.source}: it lacks {name}")
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise PruneError(f"cannot prune {name}: it is {kind}, not a float tensor (prune before quantizing)")
    return t


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores in ascending index order (ties: the earlier index is kept)."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _check_only(checkpoint: Checkpoint, layer: int, allowed: set[str], what: str) -> None:
    """A tensor of a resized module that we would not resize (e.g. a quantized X.qweight) is an error."""
    prefix = layer_prefix(layer)
    for name in checkpoint.tensors:
        if name.startswith(prefix) and any(f".{m}." in name for m in _MODULES[what]) and name not in allowed:
            raise PruneError(f"cannot prune {what} of {checkpoint.source}: it holds {name}, which pruning cannot "
                             "resize (prune before quantizing)")


_MODULES = {"FFN channels": ("gate_proj", "up_proj", "down_proj"),
            "attention heads": ("q_proj", "k_proj", "v_proj", "o_proj")}


# ----------------------------------------------------------------------------- FFN channels


def ffn_scores(checkpoint: Checkpoint, score: str = "activation", stats: ActivationStats | None = None,
               calibration: str | os.PathLike[str] | None = None,
               new_tokens: int = DEFAULT_NEW_TOKENS) -> list[torch.Tensor]:
    """Per layer, the importance of each intermediate channel (higher = keep)."""
    _check_score(score)
    if score == "activation":
        stats = _stats(checkpoint, stats, calibration, new_tokens)
    out = []
    for n in range(checkpoint.config.num_hidden_layers):
        p = layer_prefix(n) + "mlp."
        down = _float(checkpoint, p + "down_proj.weight").float()
        down_sq = down.pow(2).sum(0)
        if score == "activation":
            out.append(stats.ffn_sq[n] * down_sq)
        else:
            gate = _float(checkpoint, p + "gate_proj.weight").float().norm(dim=1)
            up = _float(checkpoint, p + "up_proj.weight").float().norm(dim=1)
            out.append(gate * up * down_sq.sqrt())
    return out


def prune_ffn(checkpoint: Checkpoint, fraction: float, score: str = "activation",
              stats: ActivationStats | None = None, calibration: str | os.PathLike[str] | None = None,
              new_tokens: int = DEFAULT_NEW_TOKENS) -> Checkpoint:
    """Remove round(fraction * intermediate_size) FFN channels from every layer (the least important of each
    layer by `score`); gate/up lose rows, down loses columns. Returns a new Checkpoint."""
    fraction = check_fraction("the ffn fraction", fraction)
    _check_score(score)
    config = checkpoint.config
    inter = config.intermediate_size
    drop = round(fraction * inter)
    check_count("the FFN channel count", drop, inter, f"FFN channels per layer ({inter})")
    tensors = dict(checkpoint.tensors)
    removed: dict[int, list[int]] = {}
    if drop:
        if score == "activation":
            stats = _stats(checkpoint, stats, calibration, new_tokens)
        scores = ffn_scores(checkpoint, score, stats)
        for n, s in enumerate(scores):
            p = layer_prefix(n) + "mlp."
            names = {p + f"{m}.weight" for m in _MODULES["FFN channels"]}
            _check_only(checkpoint, n, names, "FFN channels")
            keep = _top(s, inter - drop)
            removed[n] = sorted(set(range(inter)) - set(keep.tolist()))
            tensors[p + "gate_proj.weight"] = _float(checkpoint, p + "gate_proj.weight").index_select(0, keep)
            tensors[p + "up_proj.weight"] = _float(checkpoint, p + "up_proj.weight").index_select(0, keep)
            tensors[p + "down_proj.weight"] = _float(checkpoint, p + "down_proj.weight").index_select(1, keep)
    report = {"method": "ffn", "amount": fraction, "score": score, "channels_removed_per_layer": drop,
              "intermediate_size": [inter, inter - drop], "removed": removed,
              **_calibration(stats if drop else None, score)}
    return pruned_checkpoint(checkpoint, tensors, report, replace_config(config, intermediate_size=inter - drop))


# ----------------------------------------------------------------------------- attention heads


def head_group_scores(checkpoint: Checkpoint, score: str = "activation", stats: ActivationStats | None = None,
                      calibration: str | os.PathLike[str] | None = None,
                      new_tokens: int = DEFAULT_NEW_TOKENS) -> list[torch.Tensor]:
    """Per layer, the importance of each kv-head group (higher = keep)."""
    _check_score(score)
    if score == "activation":
        return [s.clone() for s in _stats(checkpoint, stats, calibration, new_tokens).head_sq]
    c = checkpoint.config
    kv, group, d = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    out = []
    for n in range(c.num_hidden_layers):
        p = layer_prefix(n) + "self_attn."
        v = _float(checkpoint, p + "v_proj.weight").float().reshape(kv, d, -1).flatten(1).norm(dim=1)
        o = _float(checkpoint, p + "o_proj.weight").float().reshape(c.hidden_size, kv, group, d)
        o = o.permute(1, 2, 0, 3).flatten(2).norm(dim=2)  # [kv, group]
        out.append(v * o.sum(1))
    return out


def heads_to_remove(config, amount: float) -> int:
    """The CLI's --amount for heads as a count of kv groups: a whole number >= 1 is that count; a fraction
    in [0, 1) is that share of the attention (query) heads, which must come to whole kv groups."""
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    group = heads // kv
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise PruneError(f"the heads amount must be a number, got {amount!r}")
    if amount >= 1:
        if not float(amount).is_integer():
            raise PruneError(f"the heads amount is a fraction in [0, 1) of the attention heads or a whole count of "
                             f"kv head groups, got {amount}")
        return int(amount)
    fraction = check_fraction("the heads fraction", amount)
    q_heads = round(fraction * heads)
    if q_heads % group:
        options = ", ".join(f"{k}/{kv} ({k * group} heads)" for k in range(1, kv))
        raise PruneError(
            f"removing {q_heads} of {heads} attention heads ({fraction:g}) breaks GQA grouping: each of the "
            f"{kv} kv heads serves {group} query heads, so heads go in whole groups of {group}"
            + (f"; fractions that fit: {options}" if options else "") + ", or give a count of kv groups"
        )
    return q_heads // group


def prune_heads(checkpoint: Checkpoint, num_kv_heads: int | None = None, num_heads: int | None = None,
                score: str = "activation", stats: ActivationStats | None = None,
                calibration: str | os.PathLike[str] | None = None,
                new_tokens: int = DEFAULT_NEW_TOKENS) -> Checkpoint:
    """Remove `num_kv_heads` kv heads from every layer together with the query heads that read them (or give
    `num_heads`, a count of query heads, which must be a whole number of GQA groups). The least important
    groups of each layer by `score` go. Returns a new Checkpoint."""
    c = checkpoint.config
    kv, heads, d = c.num_key_value_heads, c.num_attention_heads, c.head_dim
    group = heads // kv
    if (num_kv_heads is None) == (num_heads is None):
        raise PruneError("give exactly one of num_kv_heads (kv groups to remove) and num_heads (query heads)")
    if num_heads is not None:
        num_heads = check_count("num_heads", num_heads, heads, "attention heads")
        if num_heads % group:
            raise PruneError(f"removing {num_heads} of {heads} attention heads breaks GQA grouping: each of the {kv} "
                             f"kv heads serves {group} query heads; remove a multiple of {group}")
        num_kv_heads = num_heads // group
    drop = check_count("num_kv_heads", num_kv_heads, kv, f"kv head groups ({heads} query heads in {kv} groups)")
    _check_score(score)
    tensors = dict(checkpoint.tensors)
    removed: dict[int, list[int]] = {}
    if drop:
        if score == "activation":
            stats = _stats(checkpoint, stats, calibration, new_tokens)
        scores = head_group_scores(checkpoint, score, stats)
        for n, s in enumerate(scores):
            p = layer_prefix(n) + "self_attn."
            names = {p + f"{m}.weight" for m in _MODULES["attention heads"]}
            if c.attention_bias:
                names |= {p + f"{m}.bias" for m in ("q_proj", "k_proj", "v_proj")}
            _check_only(checkpoint, n, names, "attention heads")
            keep = _top(s, kv - drop)
            removed[n] = sorted(set(range(kv)) - set(keep.tolist()))
            kv_rows = (keep[:, None] * d + torch.arange(d)).reshape(-1)
            q_heads = (keep[:, None] * group + torch.arange(group)).reshape(-1)
            q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
            for m, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                tensors[p + f"{m}.weight"] = _float(checkpoint, p + f"{m}.weight").index_select(0, rows)
                if p + f"{m}.bias" in checkpoint.tensors:
                    tensors[p + f"{m}.bias"] = _float(checkpoint, p + f"{m}.bias").index_select(0, rows)
            tensors[p + "o_proj.weight"] = _float(checkpoint, p + "o_proj.weight").index_select(1, q_rows)
    new_kv = kv - drop
    report = {"method": "heads", "amount": drop, "score": score, "kv_groups_removed_per_layer": drop,
              "num_attention_heads": [heads, new_kv * group], "num_key_value_heads": [kv, new_kv],
              "removed": removed, **_calibration(stats if drop else None, score)}
    config = replace_config(c, num_attention_heads=new_kv * group, num_key_value_heads=new_kv, head_dim=d)
    return pruned_checkpoint(checkpoint, tensors, report, config)


# ----------------------------------------------------------------------------- layers

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_scores(checkpoint: Checkpoint, stats: ActivationStats | None = None,
                 calibration: str | os.PathLike[str] | None = None,
                 new_tokens: int = DEFAULT_NEW_TOKENS) -> torch.Tensor:
    """[num_hidden_layers]: mean 1 - cos(input, output) per layer (higher = keep)."""
    return _stats(checkpoint, stats, calibration, new_tokens).layer_angular.clone()


def prune_layers(checkpoint: Checkpoint, num_layers: int, stats: ActivationStats | None = None,
                 calibration: str | os.PathLike[str] | None = None,
                 new_tokens: int = DEFAULT_NEW_TOKENS) -> Checkpoint:
    """Drop the `num_layers` layers whose output differs least from their input (by angle) on calibration
    text; the others keep their order and are renumbered. Returns a new Checkpoint."""
    c = checkpoint.config
    drop = check_count("num_layers", num_layers, c.num_hidden_layers, "layers")
    removed: list[int] = []
    scores: list[float] = []
    tensors = dict(checkpoint.tensors)
    if drop:
        stats = _stats(checkpoint, stats, calibration, new_tokens)
        s = layer_scores(checkpoint, stats)
        scores = [round(float(v), 6) for v in s]
        removed = sorted(torch.argsort(s, stable=True)[:drop].tolist())  # lowest scores; ties: earlier layer
        renumber = {old: new for new, old in enumerate(i for i in range(c.num_hidden_layers) if i not in removed)}
        tensors = {}
        for name, t in checkpoint.tensors.items():
            m = _LAYER_NAME.fullmatch(name)
            if m is None:
                tensors[name] = t
            elif int(m.group(1)) in renumber:
                tensors[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = t
    report: dict[str, Any] = {"method": "layers", "amount": drop, "score": "angular", "removed": removed,
                              "layer_scores": scores,
                              "num_hidden_layers": [c.num_hidden_layers, c.num_hidden_layers - drop],
                              **_calibration(stats if drop else None, "activation")}
    config = replace_config(c, num_hidden_layers=c.num_hidden_layers - drop)
    return pruned_checkpoint(checkpoint, tensors, report, config)
