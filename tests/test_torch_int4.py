"""int4 on torch's own int4 kernel (jisu/kernels/torch_int4.py): the CUDA low-bit path, run here through torch's
CPU operation, which shares the scales-and-zeros tensor and the arithmetic with the CUDA one."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from jisu import LLM
from jisu.errors import ModelLoadError
from jisu.kernels.torch_int4 import TorchInt4Weight
from jisu.loader.gguf import block_tensor
from jisu.quant.formats import quantize_int4, quantize_int8
from jisu.quant.plan import convert_tensors, load_rounding, parse_weights, plan_weights


def _rand(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [7, 50, 96])  # fewer than a 16-row tile, not a multiple of one, a multiple
def test_matches_dequantize_then_matmul(group, rows):
    q = quantize_int4(_rand(rows, 256), group)
    bias = _rand(1, rows, seed=1)[0]
    w = TorchInt4Weight(q, bias, "cpu")
    x = _rand(6, 256, seed=2).reshape(2, 3, 256)  # any leading shape
    want = x @ q.dequantize().T + bias
    got = w(x)
    assert got.shape == (2, 3, rows) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_q4_1_blocks_keep_their_numbers():
    # torch's zero is (q - 8) * scale + zero; Q4_1's minimum moves by 8 scales, exact in float32.
    raw = gguf_quants.quantize(_rand(48, 96).numpy(), Q.Q4_1)
    q41 = block_tensor(raw, Q.Q4_1, (48, 96), "t")
    x = _rand(4, 96, seed=3)
    torch.testing.assert_close(TorchInt4Weight(q41, None, "cpu")(x), x @ q41.dequantize().T, rtol=1e-5, atol=1e-7)


def test_only_int4_in_torch_groups_is_taken():
    with pytest.raises(ModelLoadError, match="runs int4 with groups of 32, 64, 128, not int8"):
        TorchInt4Weight(quantize_int8(_rand(16, 64)), None, "cpu")


def test_convert_keeps_int4_and_makes_int8_float_where_int8_cannot_run():
    raw41 = gguf_quants.quantize(_rand(64, 64).numpy(), Q.Q4_1)
    raw80 = gguf_quants.quantize(_rand(100, 64).numpy(), Q.Q8_0)
    q41, q80 = block_tensor(raw41, Q.Q4_1, (64, 64), "a"), block_tensor(raw80, Q.Q8_0, (100, 64), "b")
    tensors = {"model.layers.0.mlp.up_proj.weight": q41, "model.embed_tokens.weight": q80,
               "model.layers.0.mlp.down_proj.weight": _rand(64, 64)}
    auto = convert_tensors(tensors, parse_weights("auto"), tied=True, int8=False)
    assert auto["model.layers.0.mlp.up_proj.weight"] is q41
    assert torch.equal(auto["model.embed_tokens.weight"], q80.dequantize())  # Q8_0: float, not requantized
    int4 = convert_tensors(tensors, parse_weights("int4"), tied=True, int8=False)
    assert int4["model.layers.0.mlp.down_proj.weight"].format == "int4"
    assert torch.equal(int4["model.embed_tokens.weight"], q80.dequantize())  # the output layer stays float


@pytest.fixture(scope="module")
def on_torch_and_reference(tiny_llama_dir):
    """The tiny model in int4 on torch's kernel, and the very same int4 numbers dequantized into a float32 model."""
    from dataclasses import replace

    from jisu.loader.resolve import load_checkpoint

    kw = {"max_model_len": 128, "max_num_seqs": 2}
    on_torch = LLM(model=str(tiny_llama_dir), weights="int4", cpu_kernels=False, **kw)
    from jisu.quant.calibration import calibration_texts, input_statistics

    ckpt = load_checkpoint(str(tiny_llama_dir))
    spec = parse_weights("int4")
    rounding = load_rounding(spec, input_statistics(ckpt, calibration_texts()))
    int4 = plan_weights(ckpt.tensors, spec, tied=True, int8=False).apply(ckpt.tensors, rounding)
    floats = {n: t.dequantize() if hasattr(t, "dequantize") else t for n, t in int4.items()}
    reference = LLM(model=str(tiny_llama_dir), weights="float32", checkpoint=replace(ckpt, tensors=floats), **kw)
    return on_torch, reference


def test_a_model_runs_its_int4_layers_on_torchs_kernel(on_torch_and_reference):
    on_torch, _ = on_torch_and_reference
    model = on_torch.engine.model
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down.kernel_weight, TorchInt4Weight) and down.weight is None
    assert down.quantized.format == "int4" and down.quantized.qweight.is_meta  # torch's tiles are the only copy
    assert model.fused_decode is None  # the fused C++ step takes only the C++ kernels' weights
    assert model.lm_head.quantized is None and model.lm_head.weight is not None  # no int8 kernel: float output layer


def test_logits_and_text_equal_the_float_run_of_the_same_int4_numbers(on_torch_and_reference):
    from jisu.eval.scoring import score_batch
    from jisu.sampling_params import SamplingParams

    on_torch, reference = on_torch_and_reference
    ids = list(range(5, 69))
    a, b = score_batch(on_torch.engine, [ids])[0], score_batch(reference.engine, [ids])[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    t, r = on_torch.generate([ids[:8]], params)[0], reference.generate([ids[:8]], params)[0]
    assert t.outputs[0].token_ids == r.outputs[0].token_ids and len(t.outputs[0].token_ids) == 12


def test_which_low_bit_formats_run_where(monkeypatch):
    from jisu.capabilities import low_bit_support
    from jisu.errors import InvalidRequestError
    from jisu.kernels import torch_int4

    # A GPU torch's int4 kernel runs on (this machine has none: the check is stood in for).
    monkeypatch.setattr(torch_int4, "torch_int4_available", lambda device: None)
    cuda = low_bit_support("cuda", "auto")
    assert cuda.formats("auto") == ("int4",) and cuda.formats("int4") == ("int4",)  # Q4_1 stays 4-bit
    assert cuda.kernels == {"int4": "torch-int4"}
    # torch's CUDA kernel computes in bfloat16: another compute dtype loads floats, and int4 asked is refused.
    assert low_bit_support("cuda", "float16").formats("auto") == ()
    with pytest.raises(InvalidRequestError, match="int4 weights on cuda compute in bfloat16, not float16"):
        low_bit_support("cuda", "float16").formats("int4")
    with pytest.raises(InvalidRequestError, match=r"int8 weights run on jisu's CPU kernels \(use device cpu\)"):
        cuda.formats("int8")
    # CPU without jisu's C++ kernels: int4 only when asked for (torch's CPU kernel is slower than float32).
    off = low_bit_support("cpu", "auto", cpu_kernels=False)
    assert off.formats("auto") == () and off.formats("int4") == ("int4",) and not off.cpu_kernels
    with pytest.raises(InvalidRequestError, match="int8 weights need jisu's C\\+\\+ CPU kernels"):
        off.formats("int8")
    with pytest.raises(InvalidRequestError, match="int4 weights compute in float32, not bfloat16"):
        low_bit_support("cpu", "bfloat16").formats("int4")
    # An old GPU: int4 is refused with the reason, auto loads floats.
    monkeypatch.setattr(torch_int4, "torch_int4_available", lambda device: "compute capability 7.5 < 8.0")
    old = low_bit_support("cuda", "auto")
    assert old.formats("auto") == ()
    with pytest.raises(InvalidRequestError, match=r"int4 weights need .* or torch's int4 kernel \(compute capability"):
        old.formats("int4")
    # The rules alone (config validation, estimates) assume the kernels would run.
    assert low_bit_support("cuda", "auto", probe=False).formats("auto") == ("int4",)
    assert low_bit_support("cpu", "auto", probe=False).formats("auto") == ("int8", "int4")
