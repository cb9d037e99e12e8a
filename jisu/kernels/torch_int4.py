"""int4 matrices on torch's own int4 kernels: the CUDA low-bit path, and the CPU fallback where jisu's C++
kernels cannot be built.

On CUDA, torch ships a tensor-core int4 kernel (`aten::_weight_int4pack_mm`, "tinygemm", the kernel gpt-fast
and torchao's int4 weight-only mode run): weights stay packed in 4 bits in a tile layout, bfloat16 activations,
groups of 32/64/128 inputs, each with a scale and a zero. On CPU torch has the same operation over its own
layout (`_weight_int4pack_mm_for_cpu`), same scales-and-zeros tensor, same arithmetic; it runs 10-30x slower
than a float32 matrix-vector product on this project's AVX2 CPUs, so it is used only when int4 is asked for and
jisu's C++ kernels are unavailable (or turned off). Both read the packed matrix directly: nothing dequantizes a
whole matrix per call.

torch's convention is w = (q - 8) * scale + zero with q in 0..15; jisu's (and GGUF Q4_1's) is
w = q * scale + zero'. So zero = zero' + 8 * scale, exact in float32 (CPU). CUDA takes bfloat16 scales and
zeros, which round them to 8 significant bits: a weight moves by at most ~1/64 of its group's step.

NOTE: written against torch's documented layouts (aten/src/ATen/native/cuda/int4mm.cu: [N, K/2] uint8 with
the even input in the high nibble, converted on the device; tiles of 8 output rows and innerKTiles*16 inputs)
and tested on CPU through the CPU operations, which share everything here but the packing call. The packing and
the zero convention (zero = min + 8 * scale) agree with how torch's own int4 test and torchao's tensor-core tiled
layout prepare the CUDA operation's inputs. No session of this project has had a GPU to run the CUDA branch.
"""

from __future__ import annotations

import torch

from jisu.errors import ModelLoadError
from jisu.quant.formats import INT4_GROUP_SIZES, QuantizedTensor, unpack_int4

_ROW_TILE = 16
"""Output rows are padded to a multiple of this: the CPU packing asks for 16, CUDA's tiles for 8."""


def _inner_k_tiles(k: int) -> int:
    """The largest of CUDA's 8/4/2 inner 16-input tiles that divides the inputs (jisu's int4 needs k % 32 == 0,
    so 2 always does)."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ModelLoadError(f"torch's int4 kernel needs a multiple of 32 inputs, got {k}")


class TorchInt4Weight:
    """One int4 matrix packed for torch's int4 kernel on `device`; callable as `w(x) -> x @ W.T (+ bias)`."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None, device: torch.device):
        if q.bits != 4 or q.group_size not in INT4_GROUP_SIZES:
            raise ModelLoadError(
                f"torch's int4 kernel runs int4 with groups of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                f"not {q.describe()}"
            )
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        n, k = q.shape
        self.out_features, self.in_features, self.group_size = n, k, q.group_size
        padded = -(-n // _ROW_TILE) * _ROW_TILE
        values = torch.zeros(padded, k, dtype=torch.int32)
        values[:n] = unpack_int4(q.qweight).to(torch.int32)
        scales = torch.zeros(padded, k // q.group_size)
        zeros = torch.zeros_like(scales)
        scales[:n] = q.scales.float()
        zeros[:n] = q.zeros.float() + 8 * q.scales.float()
        self.act_dtype = torch.bfloat16 if self.cuda else torch.float32
        # [K/G, N, 2]: scale and zero of each group, for every output row.
        pairs_sz = torch.stack([scales.t(), zeros.t()], dim=-1)
        self.scales_and_zeros = pairs_sz.to(self.device, self.act_dtype).contiguous()
        if self.cuda:
            pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)  # even input in the high nibble
            self.packed = torch._convert_weight_to_int4pack(pairs.to(self.device), _inner_k_tiles(k))
            self._mm = torch._weight_int4pack_mm
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(values, _inner_k_tiles(k))
            self._mm = torch._weight_int4pack_mm_for_cpu
        self.bias = None if bias is None else bias.to(self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        y = self._mm(rows, self.packed, self.group_size, self.scales_and_zeros)[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class TorchInt4Kernels:
    """What `Linear.use_kernels` takes: the same `qlinear(x, weight)` entry point as jisu's C++ module."""

    @staticmethod
    def qlinear(x: torch.Tensor, weight: TorchInt4Weight) -> torch.Tensor:
        return weight(x)


def torch_int4_available(device: torch.device) -> str | None:
    """None when torch's int4 kernel runs on `device`, else why not (for an error message)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None if hasattr(torch, "_weight_int4pack_mm_for_cpu") else "this torch has no CPU int4 kernel"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"torch's int4 CUDA kernel needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
        return None
    return f"no int4 kernel for device type {device.type!r}"
