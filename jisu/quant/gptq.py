"""GPTQ for int8 and int4 weights: rounding that compensates each column's error in the columns not yet rounded.

Rounding each weight to nearest treats the inputs as independent. They are not: with H = mean(x xᵀ) over
calibration text, a layer's output error is (W - Q) H (W - Q)ᵀ, and GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") rounds one input column at a time, spreading
its error over the columns still to come along the Cholesky factor of H⁻¹, largest-input columns first. int8's
scales are those of rounding to nearest (jisu/quant/formats.py), so the blocks are plain int8 the kernels run
unchanged; outlier columns stay float16 and take no part. int4's group scales and zeros are fitted to the weights
first (jisu/quant/int4_grid.py, weighted by H's diagonal) and held fixed while the columns are rounded.

int4 group 64 on SmolLM2-135M (WikiText-2, 20 chunks, against float32's perplexity 29.23): GPTQ on fitted grids
30.95, KL 0.066, top-1 agreement 84.0% (docs/QUANTIZATION.md), against 31.32 / 0.080 / 82.5% for `--weights
int4-g64` (grids fitted on the built-in prompts, rounded to nearest). The same grids fitted on the sampled text and
rounded to nearest measured 30.96, so that gain is the calibration text's, not GPTQ's rounding; on min/max grids
GPTQ measured 35.19 against rounding to nearest's 42.01.

Measured on SmolLM2-135M (`jisu eval kl` on WikiText-2, 20 chunks, against the float32 run of the same file):
int8 per channel with 8 outlier columns agrees on the top-1 token 97.68% rounded to nearest (KL 0.00132) and
98.03% by GPTQ over jisu's sampled calibration text (KL 0.00097); over 60 chunks 97.75% / 0.00126 against
98.28% / 0.00090. Over only the ~1,200 tokens of built-in prompts
GPTQ did worse than rounding to nearest (97.29%, a float32 simulation): too few tokens for a 1,536-input down
projection, whose H is then far from full rank.

Also measured (20 chunks, same calibration text, 8 outlier columns unless said: 97.99% / KL 0.00097 in that run),
none of which moves top-1 clear of the ~0.2% noise of 5,120 positions: 16 outlier columns 98.11% / 0.00087, 32
columns 98.09% / 0.00082 (`--weights int8-o16` / `-o32`: more float16 columns, lower KL; -o32 over 60 chunks:
98.52% / 0.00073, perplexity +0.13%); each row's scale chosen among 1.0-0.8 x its largest weight by input-weighted
rounding error before GPTQ, 98.15% / 0.00095 (with 16 columns 98.07% / 0.00088), so not kept; damping 0.003,
97.97% / 0.00096. Fewer calibration tokens of the same text: 8,192 gave 97.91% / 0.00101 and 4,096 97.48% /
0.00118. That, and the statistics' cost (~95 s for the ~24k tokens here, as much time as the forward itself: every
layer's inputs multiplied by themselves), is why GPTQ stays an offline step rather than what `--weights int8` does
at load.
"""

from __future__ import annotations

import torch

from jisu.errors import InvalidRequestError
from jisu.quant.formats import (
    LinearRounding,
    QuantizedTensor,
    check_int4_shape,
    pack_int4,
    quantize_int4,
    quantize_int8,
)
from jisu.quant.int4_grid import fit_int4_grid
from jisu.quant.outliers import choose_columns

DEFAULT_DAMP = 0.01
"""Added to H's diagonal, as a fraction of its mean: keeps the Cholesky factor stable where inputs correlate. 0.01
is the GPTQ paper's; on SmolLM2-135M 0.1 measured top-1 97.87% / KL 0.00093 against 0.01's 98.03% / 0.00097, the
same within the measurement's noise, so the paper's value stays."""
_BLOCK = 128
"""Columns whose error is spread lazily, one matrix product per block (GPTQ's "lazy batch" update)."""


def gptq_int8(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int | None = None, name: str = "weight",
    outlier_cols: torch.Tensor | None = None, damp: float = DEFAULT_DAMP,
) -> QuantizedTensor:
    """`w` [N, K] in int8 (scales and outlier columns as quantize_int8 chooses them), each column rounded with the
    error of the columns before it compensated; hessian: [K, K] mean(x xᵀ) of the inputs."""
    base = quantize_int8(w, group_size, name, outlier_cols)
    _check_hessian(hessian, base.shape[1], damp, name)
    q = _gptq_levels(w, hessian, base, -127, 127, name, damp)
    return QuantizedTensor(8, q.to(torch.int8), base.scales, None, base.group_size, "gptq", base.outlier_cols,
                           base.outlier_weights)


def gptq_int4(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, name: str = "weight", damp: float = DEFAULT_DAMP,
    fit_grid: bool = True,
) -> QuantizedTensor:
    """`w` [N, K] in int4 groups, each column rounded with the error of the columns before it compensated. Each
    group's scale and zero are fitted to the weights before any compensation (jisu/quant/int4_grid.py, weighted by
    the diagonal of `hessian`; fit_grid=False: min/max, as rounding to nearest), then held fixed."""
    n, k = check_int4_shape(w, group_size, name)
    _check_hessian(hessian, k, damp, name)
    grid = fit_int4_grid(w, group_size, torch.diag(hessian), name) if fit_grid else None
    base = quantize_int4(w, group_size, name, grid)
    q = _gptq_levels(w, hessian, base, 0, 15, name, damp)
    return QuantizedTensor(4, pack_int4(q.to(torch.uint8)), base.scales, base.zeros, group_size, "gptq")


def _check_hessian(hessian, k: int, damp: float, name: str) -> None:
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise InvalidRequestError(f"{name}: GPTQ needs a [{k}, {k}] input second-moment matrix, got {shape}")
    if not 0 <= damp < 1:
        raise InvalidRequestError(f"{name}: GPTQ damping must lie in [0, 1), got {damp}")


def _gptq_levels(w: torch.Tensor, hessian: torch.Tensor, base: QuantizedTensor, lowest: int, highest: int,
                 name: str, damp: float) -> torch.Tensor:
    """The integer levels [N, K] (float64) of `w` on `base`'s grid (its scales, zeros if any, outlier columns),
    clamped to [lowest, highest], rounded column by column in GPTQ's order with each error spread ahead."""
    n, k = base.shape
    h = hessian.detach().double().clone()
    work = w.detach().double().clone()
    if base.outlier_cols is not None:
        # Exact in float16: nothing to round and no error to take.
        h[base.outlier_cols, :] = 0
        h[:, base.outlier_cols] = 0
        work[:, base.outlier_cols] = 0
    silent = torch.diag(h) <= 0  # inputs never active in calibration: rounded to nearest, no error spread
    h[silent, silent] = 1.0
    h += torch.eye(k, dtype=torch.float64) * (damp * torch.diag(h).mean())
    order = torch.argsort(torch.diag(h), descending=True)  # largest inputs first ("act order")
    work, h = work[:, order], h[order][:, order]
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise InvalidRequestError(
            f"{name}: the calibration inputs' second-moment matrix is not positive definite even damped; "
            f"use more calibration text or rounding to nearest"
        ) from None

    def per_column(t: torch.Tensor) -> torch.Tensor:
        return t.double().repeat_interleave(base.group_size, dim=1)[:, order]

    scales = per_column(base.scales)
    zeros = per_column(base.zeros) if base.zeros is not None else torch.zeros_like(scales)
    flat = scales <= 0  # an all-equal (or all-zero) group: every weight is its zero, level 0 as rounding to nearest
    divisors = torch.where(flat, 1.0, scales)
    q = torch.zeros(n, k, dtype=torch.float64)
    for start in range(0, k, _BLOCK):
        stop = min(start + _BLOCK, k)
        block = work[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u = upper[start:stop, start:stop]
        for j in range(stop - start):
            c = start + j
            col = block[:, j]
            qj = ((col - zeros[:, c]) / divisors[:, c]).round().clamp(lowest, highest).masked_fill(flat[:, c], 0)
            q[:, c] = qj
            err = (col - (qj * scales[:, c] + zeros[:, c])) / u[j, j]
            block[:, j:] -= err[:, None] * u[j, j:][None, :]
            errors[:, j] = err
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return q[:, torch.argsort(order)]


def gptq_rounding(statistics: dict[str, torch.Tensor], outlier_columns: int, damp: float = DEFAULT_DAMP,
                  bits: int = 8) -> LinearRounding:
    """int8 (or, bits=4, int4) rounding by GPTQ from `statistics`: every linear matrix's input second moments
    (input_statistics(..., second_moments=True) over calibration text: jisu's sampled text by default). int8's
    outlier columns are chosen from the same statistics (the diagonal). They hold every distinct input's [K, K]
    matrix at once: for SmolLM2-135M 400 MB."""
    if bits not in (4, 8):
        raise InvalidRequestError(f"GPTQ rounds to int8 or int4, not {bits} bits")

    def round_linear(name: str, w: torch.Tensor, group: int | None) -> QuantizedTensor:
        if name not in statistics:
            raise InvalidRequestError(f"{name}: no calibration statistics (not a linear layer the model runs)")
        h = statistics[name]
        if bits == 4:
            return gptq_int4(w, h, group, name, damp)
        cols = choose_columns(torch.diag(h), outlier_columns) if outlier_columns else None
        return gptq_int8(w, h, group, name, cols, damp)

    return round_linear
