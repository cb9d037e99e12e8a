"""int4 scales and zeros fitted by least squares (jisu/quant/int4_grid.py): never worse than min/max, exact on
weights that already lie on a 4-bit grid, and weighted by input importance."""

from __future__ import annotations

import pytest
import torch

from jisu.errors import InvalidRequestError
from jisu.quant.formats import quantize_int4
from jisu.quant.int4_grid import fit_int4_grid


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few far ones, the case min/max handles worst."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    far = torch.randint(0, n * k, (n * k // 40,), generator=g)
    w.view(-1)[far] *= 6
    return w


def _group_errors(w: torch.Tensor, q, group: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    e = (q.dequantize() - w) ** 2
    if importance is not None:
        e = e * importance
    return e.reshape(w.shape[0], -1, group).sum(2)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_fitted_grid_is_never_worse_than_min_max_and_better_overall(group):
    w = _weights(40, 256, seed=group)
    minmax = quantize_int4(w, group)
    fitted = quantize_int4(w, group, grid=fit_int4_grid(w, group))
    e_minmax, e_fit = _group_errors(w, minmax, group), _group_errors(w, fitted, group)
    assert (e_fit <= e_minmax * (1 + 1e-5) + 1e-12).all()
    assert e_fit.sum() < 0.9 * e_minmax.sum()
    assert fitted.scales.dtype == fitted.zeros.dtype == torch.float16 and fitted.scales.shape == (40, 256 // group)


def test_weights_on_a_4bit_grid_keep_it_exactly():
    # Q4_1-like weights (what dequantized GGUF Q4_1 holds): min/max finds their grid, and nothing beats zero error
    w = quantize_int4(_weights(24, 128, seed=3), 32).dequantize()
    fitted = quantize_int4(w, 32, grid=fit_int4_grid(w, 32))
    assert torch.equal(fitted.dequantize(), w)


def test_importance_moves_the_error_to_inputs_that_matter_less():
    w = _weights(64, 128, seed=5)
    importance = torch.ones(128)
    importance[::4] = 50.0  # a quarter of the inputs run far larger
    plain = quantize_int4(w, 64, grid=fit_int4_grid(w, 64))
    weighted = quantize_int4(w, 64, grid=fit_int4_grid(w, 64, importance))
    assert _group_errors(w, weighted, 64, importance).sum() < 0.95 * _group_errors(w, plain, 64, importance).sum()


def test_constant_groups_and_bad_grids():
    w = torch.zeros(3, 64)
    w[1] = 0.5
    w[2, :32] = -1.0
    q = quantize_int4(w, 32, grid=fit_int4_grid(w, 32))
    assert torch.allclose(q.dequantize(), w, atol=1e-3)
    with pytest.raises(InvalidRequestError, match=r"an int4 grid for \[3, 64\] in groups of 32 needs scales and zeros"):
        quantize_int4(w, 32, grid=(torch.ones(3, 1, dtype=torch.float16), torch.zeros(3, 1, dtype=torch.float16)))
