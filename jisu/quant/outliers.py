"""Outlier columns for int8 weights: the few inputs whose weights stay float16, chosen from calibration activations.

Why: a few inputs of each linear layer run far above the rest. In SmolLM2-135M the same hidden dimensions lead
the attention inputs of layers 2, 10 and 20 on every token (507, 260, 247, ...), and the FFN down projections
of early layers see "massive activations" on the first token (layer 2: 80 against a median token maximum of
1.1). A layer's rounding error in those columns is multiplied by the largest activations. Measured on SmolLM2-135M
(WikiText-2, 20 chunks, against the float32 run of the same weights): int8 per channel agrees on the top-1 token
96.45% of the time, 97.68% with 8 such columns per matrix kept in float16, 98.18% with 64 (the per-channel
default, PER_CHANNEL_OUTLIER_COLUMNS); int8 group 32: 97.44% -> 98.46% with 8. (The first 8 chunks:
the same weights rounded to bfloat16 agree 99.71%, per-channel int8 96.53%, so int8's rounding flips tokens that
a finer rounding keeps.)
(LLM.int8() splits outlier features out of int8 matmuls for the same reason; here only the weights are int8.)

A column is chosen by the mean square of its input over calibration text: jisu's built-in prompts, never the
text a model is evaluated on (`jisu quantize --method gptq` takes them from its own calibration text instead,
jisu/quant/gptq.py). Projections stacked into one matrix (q/k/v, gate/up) read the same input, so they get the
same columns.
"""

from __future__ import annotations

import torch

from jisu.quant.formats import LinearRounding, QuantizedTensor, quantize_int8

GROUPED_OUTLIER_COLUMNS = 8
"""Per int8 matrix with groups: 8 float16 columns add 16 bytes per output row, 2.5 MB over SmolLM2-135M's 137 MB.
With 4, int8 group 32 agreed 98.16% (a float32 simulation, 20 chunks), 8: 98.32%."""

PER_CHANNEL_OUTLIER_COLUMNS = 64
"""Per int8 matrix with one scale per output channel: its rounding step follows the row's largest weight, so more
inputs are kept out of it. Measured on SmolLM2-135M against float32 (`jisu eval kl`, WikiText-2): top-1 agreement
with 8 columns 97.68% (20 chunks) / 97.75% (60), 32: 97.93% (20), 64: 98.18% (20) / 98.30% (60, KL 0.00074,
perplexity +0.11%), 128: 98.48% (20). 64 columns add 128 bytes per output row (~17 MB, 139 -> 157 MB) and cost
3-16% of batch-1 decode (three side-by-side `jisu bench compare` runs: 8 -> 64 columns 131 -> 115, 130 -> 126,
135 -> 113 tok/s; float32 44-45) and ~10% of a 128-token prefill. int8 group 32 keeps 8 and agrees 98.46% at
146 MB (its finer scales leave less to keep)."""


def default_outlier_columns(group_size: int | None) -> int:
    """Outlier columns int8 keeps when none are asked: per channel more than with groups (see above)."""
    return PER_CHANNEL_OUTLIER_COLUMNS if group_size is None else GROUPED_OUTLIER_COLUMNS


def choose_columns(mean_squares: torch.Tensor, k: int) -> torch.Tensor:
    """The k inputs with the largest mean square, ascending (int64)."""
    k = min(k, mean_squares.numel())
    return mean_squares.topk(k).indices.sort().values


def outlier_rounding(statistics: dict[str, torch.Tensor], k: int) -> LinearRounding | None:
    """int8 rounding to nearest that keeps each linear matrix's k outlier columns, chosen by their mean squares in
    `statistics` (input_statistics over the built-in prompts); None when k is 0 (plain rounding)."""
    if not k:
        return None
    columns = {name: choose_columns(ms, k) for name, ms in statistics.items()}

    def round_linear(name: str, w: torch.Tensor, group: int | None) -> QuantizedTensor:
        return quantize_int8(w, group, name, columns.get(name))

    return round_linear
