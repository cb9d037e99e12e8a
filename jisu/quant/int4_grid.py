"""int4 scales and zeros fitted by least squares, weighted by how large each input runs.

Rounding to nearest on each group's minimum and maximum (GGUF Q4_1's grid) lets one far weight stretch the grid
for the whole group, and treats an input that runs at 50 like one that runs at 0.1. Here each group tries 11
grids (14 to 16 steps across its range, anchored at its minimum), rounds onto each, refits scale and zero by
weighted least squares on the rounded levels (the best affine map from those levels to the weights), and keeps
whichever has the smallest weighted error, min/max included, so it is never worse than min/max and stays exact
on weights already on a 4-bit grid (a Q4_1 file asked as int4 group 32). The weight of input j is its mean square
over calibration text, so the error lands where the layer's output feels it least: E|dW x|^2 = sum_j dW_j^2
E[x_j^2] for independent inputs. llama.cpp's K-quant rounding with an importance matrix searches the same way.

Measured on SmolLM2-135M, int4 group 64 from the Q4_1 file's weights (`jisu eval perplexity`, WikiText-2, 20
chunks; float32 29.23): min/max 42.01; fitted, unweighted 36.69; fitted, weighted by the built-in prompts' mean
squares (what `--weights int4` does) 31.32 (KL 0.080, top-1 agreement 82.5%; min/max: 0.310, 66.9%); weighted by
jisu's ~24k-token sampled text 30.96; GPTQ on min/max grids 35.19, on fitted grids 30.95 (jisu/quant/gptq.py).
Fitting costs ~4 s for the model here on top of the ~2-4 s calibration run that int8's outlier columns also take
(min/max: 0.4 s).
"""

from __future__ import annotations

import torch

from jisu.errors import InvalidRequestError
from jisu.quant.formats import LinearRounding, QuantizedTensor, check_int4_shape, quantize_int4

TRIAL_GRIDS = 11
"""Grids tried per group beside min/max: 14.0, 14.2, ..., 16.0 steps across the group's range (21 trials measured
the same perplexity and cost 60% more time)."""
IMPORTANCE_FLOOR = 1e-3
"""The least weight an input gets, relative to its group's largest."""
_ROWS_PER_PASS = 512
"""Rows fitted at once: bounds the temporaries (a few [rows, K] float32 tensors)."""


def fit_int4_grid(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None, name: str = "weight"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) float16 [N, K/G] for `w` [N, K] (K a multiple of group_size) minimizing each group's
    sum of c_j (scale * q_j + zero - w_j)^2 over q_j in 0..15, among min/max and the trial grids, where c_j is
    importance[j] >= 0 relative to the group's largest, plus IMPORTANCE_FLOOR (default: all equal)."""
    n, k = check_int4_shape(w, group_size, name)
    if importance is not None and tuple(importance.shape) != (k,):
        raise InvalidRequestError(f"{name}: input importance must have one value per input ({k}), got "
                                  f"{tuple(importance.shape)}")
    c = torch.ones(k) if importance is None else importance.detach().float().clamp_min(0)
    c = c.reshape(1, k // group_size, group_size)
    # Per group, relative to its largest input (the sums stay well conditioned in float32), with a floor: an input
    # quiet in calibration may not be quiet in use, and a group no input of which fired is fitted unweighted.
    top = c.amax(2, keepdim=True)
    c = torch.where(top > 0, c / torch.where(top > 0, top, 1.0), 0.0) + IMPORTANCE_FLOOR
    scales, zeros = [], []
    for start in range(0, n, _ROWS_PER_PASS):
        x = w[start:start + _ROWS_PER_PASS].detach().float().reshape(-1, k // group_size, group_size)
        s, z = _fit_groups(x, c)
        scales.append(s)
        zeros.append(z)
    return torch.cat(scales), torch.cat(zeros)


def _fit_groups(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    span = hi - lo
    best_err, best_s, best_z = _error(x, c, (hi - lo.half().float()) / 15, lo)  # quantize_int4's min/max
    sc, scx = c.sum(2, keepdim=True), (c * x).sum(2, keepdim=True)
    per_span = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), 0.0)
    for t in range(TRIAL_GRIDS):
        steps = 14.0 + 2.0 * t / (TRIAL_GRIDS - 1)
        q = ((x - lo) * (per_span * steps)).round_().clamp_(0, 15)
        cq = c * q
        scq, scq2, scqx = cq.sum(2, keepdim=True), (cq * q).sum(2, keepdim=True), (cq * x).sum(2, keepdim=True)
        det = sc * scq2 - scq * scq
        solvable = det > 0  # at least two distinct levels carry weight
        d = torch.where(solvable, det, 1.0)
        s = torch.where(solvable, ((sc * scqx - scq * scx) / d).clamp_min(0), best_s)
        z = torch.where(solvable, (scq2 * scx - scq * scqx) / d, best_z)
        err, s16, z16 = _error(x, c, s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s16, best_s)
        best_z = torch.where(better, z16, best_z)
    return best_s.squeeze(2).half(), best_z.squeeze(2).half()


def _error(x, c, s, z):
    """The weighted error of rounding x onto scale s and zero z as stored (float16), and those stored values."""
    s16, z16 = s.half().float(), z.half().float()
    q = torch.where(s16 > 0, (x - z16) / torch.where(s16 > 0, s16, 1.0), 0.0).round_().clamp_(0, 15)
    err = (c * torch.addcmul(z16 - x, q, s16).square_()).sum(2, keepdim=True)
    return err, s16, z16


def fitted_int4_rounding(statistics: dict[str, torch.Tensor]) -> LinearRounding:
    """int4 rounding to nearest on grids fitted with each input weighted by its mean square in `statistics`
    (input_statistics over jisu's built-in prompts: the statistics int8's outlier columns come from)."""

    def round_linear(name: str, w: torch.Tensor, group: int | None) -> QuantizedTensor:
        return quantize_int4(w, group, name, fit_int4_grid(w, group, statistics.get(name), name))

    return round_linear
