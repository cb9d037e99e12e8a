"""The eager layers' RMSNorm and gated activation on jisu's C++ kernels (jisu/kernels/rowwise.cpp, the fused
decoder's own row arithmetic in rowwise.h) against float64 references, their binding by the loader, and a loaded
model's logits on them against torch's ops.

Tolerance: float32 arithmetic in a fixed order. RMSNorm: a 576-term sum of squares and two products, measured
max |diff| 8e-7 on outputs of magnitude ~3; the gate: the exp polynomial (<= 1.2 ulp) and a division, measured
1.6e-5 on outputs up to ~60 (torch's own silu differs from float64 by the same). The bounds below are relative,
with room for other CPUs, and far below a wrong row, weight or half (differences of order 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jisu.models.layers import GateAndMul, RMSNorm


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / (want.abs() + 1e-3)).max().item()


@pytest.mark.parametrize("shape", [(7, 576), (1, 5), (3, 4, 64), (2, 13)])
def test_rms_norm_matches_float64(kernels, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    y = kernels.rms_norm_rows(x, w, 1e-5)
    x64 = x.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert y.shape == x.shape and y.dtype == torch.float32
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows,inner", [(5, 1536), (1, 3), (4, 20)])
def test_gated_activation_matches_float64(kernels, act, rows, inner):
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(rows, 2 * inner, generator=g) * 4
    gate, up = gate_up.double().split(inner, dim=-1)
    fn = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    y = kernels.gated_activation(gate_up, act)
    assert y.shape == (rows, inner)
    assert rel_err(y, fn(gate) * up) < 1e-5


def test_non_contiguous_input_reads_its_values(kernels):
    base = torch.randn(6, 40)
    x = base[:, ::2]  # strided rows
    w = torch.rand(20) + 0.5
    assert torch.equal(kernels.rms_norm_rows(x, w, 1e-6), kernels.rms_norm_rows(x.contiguous(), w, 1e-6))


def test_bad_inputs_raise_clear_errors(kernels):
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm_rows(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.rms_norm_rows(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="silu or gelu_tanh"):
        kernels.gated_activation(torch.randn(2, 8), "relu")
    with pytest.raises(RuntimeError, match="even"):
        kernels.gated_activation(torch.randn(2, 7), "silu")


def test_modules_use_the_kernels_only_where_they_apply(kernels):
    norm = RMSNorm(8, 1e-5, unit_offset=True)
    torch.nn.init.uniform_(norm.weight, -0.5, 0.5)
    x = torch.randn(3, 8)
    plain = norm(x)
    norm.use_kernels(kernels)
    assert rel_err(norm(x), plain.double()) < 1e-5  # Gemma's 1 + w reaches the kernel too
    wide = RMSNorm(8, 1e-5).double()
    wide.use_kernels(kernels)
    assert wide(x.double()).dtype == torch.float64  # other dtypes stay on torch
    exact = GateAndMul(4, "gelu")
    exact.use_kernels(kernels)
    assert exact.kernels is None  # exact GELU is not one of the kernels' activations


def test_loaded_model_binds_them_and_keeps_its_logits(kernels, tiny_llama_dir):
    """The loader hands every norm and gate the kernels; a prompt's logits through them match torch's ops (the
    eager layers: not deterministic, whose prompts run on the fused stack)."""
    from jisu import LLM
    from jisu.model_run import score_batch

    llm = LLM(model=str(tiny_llama_dir), deterministic=False)
    bound = [m for m in llm.engine.runner.model.modules() if isinstance(m, (RMSNorm, GateAndMul))]
    assert bound and all(m.kernels is not None for m in bound)
    g = torch.Generator().manual_seed(3)
    prompts = [[int(t) for t in torch.randint(3, 300, (n,), generator=g)] for n in (40, 9)]
    with torch.inference_mode():
        new = score_batch(llm.engine, prompts)
        for m in bound:
            m.kernels = None
        old = score_batch(llm.engine, prompts)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
