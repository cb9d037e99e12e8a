"""GPTQ for int8 and int4 (jisu/quant/gptq.py): int8 keeps the scales of rounding to nearest, int4 fits each
group's grid; smaller output error on correlated inputs, exactly rounding to nearest when the inputs are
uncorrelated; `jisu quantize --method gptq`."""

from __future__ import annotations

import json

import pytest
import torch

from jisu import LLM, SamplingParams
from jisu.errors import InvalidRequestError
from jisu.quant.formats import quantize_int4, quantize_int8
from jisu.quant.gptq import gptq_int4, gptq_int8


def _correlated_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """[t, k] inputs driven by a few shared factors (the same for every seed) plus noise, with two inputs far
    larger than the rest."""
    mixing = torch.randn(8, k, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 8, generator=g) @ mixing + 0.3 * torch.randn(t, k, generator=g)
    x[:, 5] *= 20
    x[:, 40] *= 8
    return x


def _output_error(x: torch.Tensor, w: torch.Tensor, q) -> float:
    return ((x @ (w - q.dequantize()).T) ** 2).mean().item()


@pytest.mark.parametrize("group, cols", [(None, None), (32, None), (None, [5, 40]), (32, [5])])
def test_gptq_cuts_the_output_error_on_correlated_inputs(group, cols):
    k, n = 128, 48
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    x = _correlated_inputs(2048, k)
    h = x.T @ x / x.shape[0]
    cols_t = None if cols is None else torch.tensor(cols)
    rtn = quantize_int8(w, group, "w", cols_t)
    gq = gptq_int8(w, h, group, "w", cols_t)
    assert torch.equal(gq.scales, rtn.scales) and gq.group_size == rtn.group_size
    assert gq.qweight.dtype == torch.int8 and gq.qweight.abs().max() <= 127
    if cols is not None:
        assert torch.equal(gq.outlier_cols, rtn.outlier_cols) and torch.equal(gq.outlier_weights, rtn.outlier_weights)
        assert (gq.qweight[:, cols_t] == 0).all()
    # Measured on held-out inputs from the same distribution, not the calibration ones.
    held_out = _correlated_inputs(2048, k, seed=7)
    assert _output_error(held_out, w, gq) < 0.5 * _output_error(held_out, w, rtn)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_gptq_cuts_the_output_error_on_correlated_inputs(group):
    k, n = 256, 40
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    x = _correlated_inputs(4096, k)
    h = x.T @ x / x.shape[0]
    rtn = quantize_int4(w, group, "w")
    gq = gptq_int4(w, h, group, "w")
    on_min_max = gptq_int4(w, h, group, "w", fit_grid=False)
    assert gq.bits == 4 and gq.group_size == group and gq.qweight.shape == rtn.qweight.shape
    assert torch.equal(on_min_max.scales, rtn.scales) and torch.equal(on_min_max.zeros, rtn.zeros)
    held_out = _correlated_inputs(2048, k, seed=7)
    assert _output_error(held_out, w, on_min_max) < 0.7 * _output_error(held_out, w, rtn)
    assert _output_error(held_out, w, gq) < _output_error(held_out, w, on_min_max)


def test_int4_gptq_with_uncorrelated_inputs_on_min_max_is_rounding_to_nearest():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(8)) + 0.1)
    assert torch.equal(gptq_int4(w, h, 64, fit_grid=False).qweight, quantize_int4(w, 64).qweight)


def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest():
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.1)
    assert torch.equal(gptq_int8(w, h, None).qweight, quantize_int8(w, None).qweight)
    h[7, 7] = 0.0  # an input calibration never saw: still rounded, to nearest
    assert torch.equal(gptq_int8(w, h, 32).qweight, quantize_int8(w, 32).qweight)


def test_gptq_refuses_bad_arguments():
    w = torch.randn(8, 64)
    with pytest.raises(InvalidRequestError, match=r"needs a \[64, 64\] input second-moment matrix, got \(32, 32\)"):
        gptq_int8(w, torch.eye(32))
    with pytest.raises(InvalidRequestError, match=r"damping must lie in \[0, 1\)"):
        gptq_int8(w, torch.eye(64), damp=2.0)
    with pytest.raises(InvalidRequestError, match="group size 48 must divide its 64 inputs"):
        gptq_int8(w, torch.eye(64), 48)
    with pytest.raises(InvalidRequestError, match="only 2-D float matrices"):
        gptq_int8(torch.randn(64), torch.eye(64))
    with pytest.raises(InvalidRequestError, match="int4 group size must be one of 32, 64, 128, got 48"):
        gptq_int4(torch.randn(8, 96), torch.eye(96), 48)
    with pytest.raises(InvalidRequestError, match="its 96 inputs are not a multiple of the int4 group size 64"):
        gptq_int4(torch.randn(8, 96), torch.eye(96), 64)
    with pytest.raises(InvalidRequestError, match=r"needs a \[64, 64\] input second-moment matrix"):
        gptq_int4(w, torch.eye(32))


def test_jisu_quantize_by_gptq_writes_a_folder_that_loads(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    from jisu.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60 + "\n\ndef f(x):\n    return x * 2\n" * 20)
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama_dir), "--weights", "int8-o2", "--method", "gptq", "--calibration", str(text)]
    assert main(args + ["--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["jisu.quantization"])
    assert record["method"] == "gptq" and record["calibration"] == str(text)
    assert record["matrices"]["model.layers.0.mlp.down_proj"] == "int8 (per channel, 2 float outlier columns) by GPTQ"
    saved = LLM(model=str(out), max_model_len=128, max_num_seqs=1)
    nearest = LLM(model=str(tiny_llama_dir), weights="int8-o2", max_model_len=128, max_num_seqs=1)
    a = saved.engine.model.model.layers[0].mlp.down_proj.quantized
    b = nearest.engine.model.model.layers[0].mlp.down_proj.quantized
    assert a.num_outliers == b.num_outliers == 2 and not torch.equal(a.qweight, b.qweight)
    out = saved.generate(["The quick brown"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_jisu_quantize_int4_by_gptq_writes_a_folder_that_loads(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    from jisu.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60 + "\n\ndef f(x):\n    return x * 2\n" * 20)
    out, nearest = tmp_path / "q4", tmp_path / "rtn"
    args = ["quantize", str(tiny_llama_dir), "--weights", "int4-g64", "--method", "gptq", "--calibration", str(text)]
    assert main(args + ["--out", str(out)]) == 0
    assert main(["quantize", str(tiny_llama_dir), "--weights", "int4-g64", "--out", str(nearest)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(nearest / "model.safetensors"), "pt") as g:
        record = json.loads(f.metadata()["jisu.quantization"])
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.scales").shape == g.get_tensor(f"{name}.scales").shape
        assert not torch.equal(f.get_tensor(f"{name}.scales"), g.get_tensor(f"{name}.scales"))  # fitted, not min/max
    assert record["method"] == "gptq" and record["weights"] == "int4-g64"
    assert record["matrices"][name] == "int4 (group 64) by GPTQ"
    saved = LLM(model=str(out), max_model_len=128, max_num_seqs=1)
    layer = saved.engine.model.model.layers[0].mlp.down_proj.quantized
    assert layer.bits == 4 and layer.group_size == 64
    out = saved.generate(["The quick brown"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("extra, message", [
    (["--weights", "int8", "--calibration", "x.txt"], "--calibration applies to --method gptq"),
    (["--weights", "int8", "--method", "gptq", "--calibration", "/nonexistent/c.txt"], "cannot read calibration text"),
])
def test_jisu_quantize_method_errors(tiny_llama_dir, tmp_path, capsys, extra, message):
    from jisu.cli import main

    assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *extra]) == 1
    assert message in capsys.readouterr().err


def test_gguf_output_by_gptq_is_q8_0_with_the_same_scales(tiny_llama_gguf, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from jisu.cli import main
    from jisu.loader.gguf import open_gguf

    text = tmp_path / "calibration.txt"
    text.write_text("Once upon a time there was a small model that counted to ten. " * 40)
    files = {}
    for method in ("rtn", "gptq"):
        files[method] = tmp_path / f"{method}.gguf"
        extra = ["--calibration", str(text)] if method == "gptq" else []
        args = ["quantize", str(tiny_llama_gguf), "--weights", "int8-g32", "--method", method, *extra]
        assert main(args + ["--out", str(files[method])]) == 0
    rtn, gptq = ({t.name: t for t in open_gguf(files[m]).tensors} for m in ("rtn", "gptq"))
    down_rtn, down_gptq = rtn["blk.0.ffn_down.weight"], gptq["blk.0.ffn_down.weight"]
    assert down_gptq.tensor_type == Q.Q8_0
    blocks_rtn = np.asarray(down_rtn.data).reshape(-1, 34)
    blocks_gptq = np.asarray(down_gptq.data).reshape(-1, 34)
    assert np.array_equal(blocks_rtn[:, :2], blocks_gptq[:, :2])  # each block's float16 scale
    assert not np.array_equal(blocks_rtn[:, 2:], blocks_gptq[:, 2:])  # the rounding differs
    LLM(model=str(files["gptq"]), max_model_len=64, max_num_seqs=1)
