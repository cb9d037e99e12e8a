"""jisu's low-bit weight formats: how a float matrix becomes int8/int4 blocks and back.

Layouts (the C++ kernels read exactly these; see jisu/kernels/qlinear.h):
- int8: q int8 [N, K], scales float16 [N, K/G];          w = scale * q,         q in -127..127.
- int4: q uint8 [N, K/2], scales, zeros float16 [N, K/G]; w = scale * q + zero,  q in 0..15, two per byte:
  byte j of each 32-input block holds input j (low nibble) and input j + 16 (high nibble), GGUF's Q4 layout,
  so Q4_0/Q4_1 tensors load by copying bytes.

Scales and zeros are rounded to float16 *before* q is chosen, so q is the best grid point for the stored
scale rather than for one that no longer exists.

Outlier columns (optional, jisu/quant/outliers.py): a few inputs keep their weights in float16 beside the blocks
(outlier_cols int64 [C], outlier_weights float16 [N, C]); q is 0 there and the scales are chosen without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from jisu.errors import InvalidRequestError

INT4_GROUP_SIZES = (32, 64, 128)
BLOCK = 32
"""Inputs per packed int4 block (and per GGUF Q4/Q8 block)."""


@dataclass
class QuantizedTensor:
    """One [N, K] matrix in int8 or int4 blocks."""

    bits: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    origin: str = ""
    """Where the numbers came from: 'Q4_1' (kept from a GGUF file), 'int4' (quantized by jisu), ..."""
    outlier_cols: torch.Tensor | None = None
    """Inputs whose weights are kept in float16 (int64 [C]); None: none."""
    outlier_weights: torch.Tensor | None = None
    """Those weights, float16 [N, C]."""
    fidelity: str = ""
    """How the numbers compare with the file's own (GGUF blocks, jisu/loader/gguf_blocks.py): 'exact' (dequantize()
    gives the file's dequantized values bit for bit), 'scales rounded' (the file's integers kept, its per-group
    scales / zeros rounded to float16: each value moves by at most 2^-11 (|scale * q| + |zero|)), 'requantized'
    (rounded again onto a new grid); '' where it does not apply (quantized by jisu)."""

    @property
    def exact(self) -> bool:
        """Whether these are a file's own numbers, bit for bit."""
        return self.fidelity == "exact"

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_cols is None else self.outlier_cols.numel()

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def shape(self) -> tuple[int, int]:
        n, cols = self.qweight.shape
        return n, cols * (2 if self.bits == 4 else 1)

    def numel(self) -> int:
        n, k = self.shape
        return n * k

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales, self.zeros, self.outlier_cols, self.outlier_weights]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def describe(self) -> str:
        group = "per channel" if self.group_size == self.shape[1] and self.bits == 8 else f"group {self.group_size}"
        cols = f", {self.num_outliers} float outlier columns" if self.num_outliers else ""
        return f"{self.format} ({group}{cols})"

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] matrix (pure torch: the reference the kernels are tested against)."""
        n, k = self.shape
        if self.bits == 8:
            q = self.qweight.float()
        else:
            q = unpack_int4(self.qweight).float()
        scale = self.scales.float().repeat_interleave(self.group_size, dim=1)
        w = q * scale
        if self.zeros is not None:
            w = w + self.zeros.float().repeat_interleave(self.group_size, dim=1)
        w = w.reshape(n, k)
        if self.outlier_cols is not None:
            w[:, self.outlier_cols] = self.outlier_weights.float()
        return w

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """The same matrix with its rows rearranged by `fn` (which must only move whole rows: applied alike
        to q, scales and zeros)."""
        return QuantizedTensor(
            self.bits, fn(self.qweight), fn(self.scales), None if self.zeros is None else fn(self.zeros),
            self.group_size, self.origin, self.outlier_cols,
            None if self.outlier_weights is None else fn(self.outlier_weights), self.fidelity,
        )

    def shape_only(self) -> QuantizedTensor:
        """The same description (format, shape, bytes, origin) with no blocks behind it (meta tensors): what a
        layer keeps once the C++ kernels hold the only copy (int4, repacked into row quads, jisu/kernels/qlinear.h)."""
        def meta(t):
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")

        return QuantizedTensor(
            self.bits, meta(self.qweight), meta(self.scales), meta(self.zeros), self.group_size, self.origin,
            meta(self.outlier_cols), meta(self.outlier_weights), self.fidelity,
        )

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same matrix with every tensor on `device` (itself when it is there already: a tied output layer
        and its embedding keep sharing one copy)."""
        if self.qweight.device == torch.device(device):
            return self
        moved = self.map_rows(lambda t: t.to(device))
        if moved.outlier_cols is not None:
            moved.outlier_cols = moved.outlier_cols.to(device)
        return moved

    def select_rows(self, ids: torch.Tensor) -> QuantizedTensor:
        return self.map_rows(lambda t: t[ids])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to save under `prefix` (a layer's name without '.weight')."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        if self.outlier_cols is not None:
            out[f"{prefix}.outlier_cols"] = self.outlier_cols
            out[f"{prefix}.outlier_weights"] = self.outlier_weights
        return out

    def to_kernel(self, kernels, bias: torch.Tensor | None = None):
        """The C++ kernels' QWeight over the same storage."""
        return kernels.QWeight(
            self.bits, self.qweight, self.scales, self.zeros, self.group_size, bias,
            self.outlier_cols, self.outlier_weights,
        )


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stacks matrices along the output dimension (fused q/k/v, gate/up); they must share format and group."""
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
        kinds = ", ".join(p.describe() for p in parts)
        raise InvalidRequestError(f"cannot stack matrices of different formats ({kinds}) into one")
    cols = [p.outlier_cols for p in parts]
    if any((c is None) != (cols[0] is None) or (c is not None and not torch.equal(c, cols[0])) for c in cols):
        # Stacked matrices read the same input, so their outlier columns are chosen alike (outliers.py).
        raise InvalidRequestError("cannot stack matrices with different outlier columns into one")
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    origin = "/".join(sorted({p.origin for p in parts}))
    # The least faithful part's; '' (does not apply) when any part was quantized by jisu.
    fidelities = {p.fidelity for p in parts}
    fidelity = "" if "" in fidelities else max(fidelities, key=lambda f: _FIDELITY_ORDER.index(f))
    return QuantizedTensor(
        first.bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
        first.group_size, origin, cols[0],
        None if cols[0] is None else torch.cat([p.outlier_weights for p in parts]), fidelity,
    )


_FIDELITY_ORDER = ("exact", "scales rounded", "requantized")


def _check_matrix(w: torch.Tensor, what: str) -> tuple[int, int]:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise InvalidRequestError(f"{what}: only 2-D float matrices can be quantized, got {shape}")
    return w.shape


def quantize_int8(
    w: torch.Tensor, group_size: int | None = None, name: str = "weight", outlier_cols: torch.Tensor | None = None
) -> QuantizedTensor:
    """Symmetric int8 weight-only quantization; group_size None = one scale per output channel. `outlier_cols`
    (distinct input indices) keep their weights in float16 and are left out of the scales."""
    n, k = _check_matrix(w, name)
    g = k if group_size is None else group_size
    if g <= 0 or k % g:
        raise InvalidRequestError(f"{name}: int8 group size {g} must divide its {k} inputs")
    w = w.detach().float()
    cols = kept = None
    if outlier_cols is not None and outlier_cols.numel():
        cols = torch.as_tensor(outlier_cols, dtype=torch.long)
        check_outlier_columns(8, cols, None, n, k, name)
        cols = cols.sort().values
        kept = w[:, cols].to(torch.float16)
        w = w.clone()
        w[:, cols] = 0.0
    groups = w.reshape(n, k // g, g)
    scales = (groups.abs().amax(dim=2) / 127.0).to(torch.float16)
    s = scales.float().unsqueeze(2)
    q = torch.where(s > 0, groups / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-127, 127)
    return QuantizedTensor(8, q.to(torch.int8).reshape(n, k), scales, None, g, "int8", cols, kept)


def check_outlier_columns(bits: int, cols: torch.Tensor, weights: torch.Tensor | None, n: int, k: int,
                          name: str) -> None:
    """The rules the kernels hold outlier columns to: int8 only, distinct int64 inputs in [0, k), and (when given)
    float16 weights [n, len(cols)]."""
    if bits != 8:
        raise InvalidRequestError(f"{name}: only int8 matrices keep outlier columns, not int{bits}")
    if cols.dtype != torch.int64 or cols.dim() != 1 or cols.unique().numel() != cols.numel() or (
        cols.numel() and (cols.min() < 0 or cols.max() >= k)
    ):
        raise InvalidRequestError(f"{name}: outlier columns must be distinct int64 inputs in [0, {k})")
    if weights is not None and (weights.dtype != torch.float16 or tuple(weights.shape) != (n, cols.numel())):
        raise InvalidRequestError(
            f"{name}: outlier weights must be float16 [{n}, {cols.numel()}], got {weights.dtype} "
            f"{tuple(weights.shape)}"
        )


def check_int4_shape(w: torch.Tensor, group_size: int, name: str = "weight") -> tuple[int, int]:
    """(N, K) of `w` when it can be int4 in groups of `group_size`; a clear error otherwise."""
    n, k = _check_matrix(w, name)
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidRequestError(
            f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}"
        )
    if k % group_size:
        raise InvalidRequestError(
            f"{name}: its {k} inputs are not a multiple of the int4 group size {group_size}; "
            f"use a smaller group or int8"
        )
    return n, k


def quantize_int4(w: torch.Tensor, group_size: int = 32, name: str = "weight",
                  grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """Asymmetric int4 weight-only quantization: per group, w = scale * q + zero with zero = the group's
    minimum and scale = (max - min) / 15 (the scheme of GGUF's Q4_1), or the float16 (scales, zeros)
    [N, K/G] of `grid` (jisu/quant/int4_grid.py fits them); q rounded to nearest on that grid."""
    n, k = check_int4_shape(w, group_size, name)
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    if grid is None:
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        zeros = lo.to(torch.float16)
        scales = ((hi - zeros.float()) / 15.0).to(torch.float16)
    else:
        scales, zeros = grid
        if tuple(scales.shape) != (n, k // group_size) or zeros.shape != scales.shape:
            raise InvalidRequestError(f"{name}: an int4 grid for [{n}, {k}] in groups of {group_size} needs "
                                      f"scales and zeros [{n}, {k // group_size}]")
        scales, zeros = scales.to(torch.float16), zeros.to(torch.float16)
    s, z = scales.float().unsqueeze(2), zeros.float().unsqueeze(2)
    q = torch.where(s > 0, (groups - z) / torch.where(s > 0, s, 1.0), 0.0).round().clamp(0, 15)
    return QuantizedTensor(4, pack_int4(q.to(torch.uint8).reshape(n, k)), scales, zeros, group_size, "int4")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] bytes in the 32-input block layout."""
    n, k = q.shape
    blocks = q.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K] values 0..15 (uint8)."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(n, half * 2)


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, name: str = "weight") -> QuantizedTensor:
    if fmt == "int8":
        return quantize_int8(w, group_size, name)
    if fmt == "int4":
        return quantize_int4(w, group_size or 32, name)
    raise InvalidRequestError(f"unknown quantized format {fmt!r}; allowed: int8, int4")


LinearRounding = Callable[[str, torch.Tensor, "int | None"], QuantizedTensor]
"""(checkpoint name, float matrix, group size or None for per channel) -> the matrix in the format it was made
for, when plain `quantize` is not how it should be rounded: int8 with outlier columns (jisu/quant/outliers.py),
int4 on fitted grids (jisu/quant/int4_grid.py), int8 or int4 by GPTQ (jisu/quant/gptq.py)."""
