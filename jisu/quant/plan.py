"""--weights: which format each matrix is loaded in.

- float32 / float16 / bfloat16: every matrix as that float type (quantized files are dequantized).
- int8: every linear layer, and the output layer, int8 weight-only (one scale per output channel unless a
  group size is given). Linear layers keep 64 input columns in float16 per channel, 8 with groups (-oN: N of
  them; -o0: none), the inputs with the largest calibration activations (jisu/quant/outliers.py); a matrix
  already stored in int8 stays as is.
- int4: linear layers int4 (group 32/64/128, scale and zero per group); the output layer int8 per channel.
  NOTE: like llama.cpp's 4-bit file types, the output layer keeps more bits: its error reaches every logit.
- auto: the file's own precision, fastest way: matrices stored as Q8_0/Q4_0/Q4_1 (or saved by `jisu quantize`)
  run on the low-bit kernels as they are; float matrices stay float32. K-quants are dequantized to float32
  (ask for int4/int8 to requantize them).
A tied embedding shares the output layer's matrix, so it takes the output layer's format; rows are
dequantized only for the tokens looked up.
On CUDA only int4 runs on a low-bit kernel (torch's, jisu/kernels/torch_int4.py): there every matrix that would
be int8 (a Q8_0 matrix under auto, int4's output layer) loads as a float in the compute dtype, and int8 is refused
(jisu/capabilities.py decides what runs where).

A load plans first (plan_weights: the format of each tensor), then applies the plan. Where the plan rounds a linear
matrix with calibrated rounding (int8's outlier columns, int4's fitted grids), the loader gathers the statistics
before applying it (jisu/quant/calibration.py runs the model for them); the roundings here only read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jisu.capabilities import dtype_name
from jisu.errors import InvalidRequestError
from jisu.quant.formats import (
    INT4_GROUP_SIZES,
    LinearRounding,
    QuantizedTensor,
    quantize,
)
from jisu.quant.int4_grid import fitted_int4_rounding
from jisu.quant.outliers import default_outlier_columns, outlier_rounding

FLOAT_WEIGHTS = ("float32", "float16", "bfloat16")
WEIGHT_CHOICES = ("auto",) + FLOAT_WEIGHTS + ("int8", "int4")

_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class WeightsSpec:
    name: str = "auto"
    group_size: int | None = None
    """int4: 32, 64 or 128 (default 32); int8: None = per output channel, or a group dividing each row."""
    outlier_columns: int | None = None
    """int8: input columns per linear matrix kept in float16 (None = default_outlier_columns: 64 per channel, 8
    with groups)."""

    def __post_init__(self):
        if self.name not in WEIGHT_CHOICES:
            raise InvalidRequestError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {self.name!r}")
        g = self.group_size
        if g is not None:
            if self.name not in ("int8", "int4"):
                raise InvalidRequestError(f"a group size applies to int8/int4 weights, not {self.name}")
            if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
                raise InvalidRequestError(f"group size must be a positive integer, got {g!r}")
            if self.name == "int4" and g not in INT4_GROUP_SIZES:
                raise InvalidRequestError(
                    f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {g}"
                )
        c = self.outlier_columns
        if c is not None:
            if self.name != "int8":
                raise InvalidRequestError(f"outlier columns (-oN) apply to int8 weights, not {self.name}")
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise InvalidRequestError(f"outlier columns must be a whole number >= 0, got {c!r}")

    @property
    def outliers(self) -> int:
        """Outlier columns per linear matrix this spec asks for."""
        if self.name != "int8":
            return 0
        return default_outlier_columns(self.group_size) if self.outlier_columns is None else self.outlier_columns

    @property
    def quantized(self) -> bool:
        return self.name in ("int8", "int4")

    @property
    def calibrated(self) -> bool:
        """Whether rounding a linear matrix to this spec reads calibration statistics (load_rounding)."""
        return self.name == "int4" or (self.name == "int8" and self.outliers > 0)

    @property
    def keeps_blocks(self) -> bool:
        """Whether the loader should hand quantized matrices over as they are."""
        return self.name in ("auto", "int8", "int4")

    def label(self) -> str:
        if self.name == "int4":
            return f"int4-g{self.group_size or 32}"
        if self.name != "int8":
            return self.name
        label = f"int8-g{self.group_size}" if self.group_size else "int8"
        return label if self.outliers == default_outlier_columns(self.group_size) else f"{label}-o{self.outliers}"


def parse_weights(label: str, group_size: int | None = None, outlier_columns: int | None = None) -> WeightsSpec:
    """'int4', 'int4-g64', 'int8-g32', 'int8-o0', 'float32', 'auto', ... (a '-gN' suffix is the group size,
    '-oN' the int8 outlier columns per matrix)."""
    if not isinstance(label, str):
        raise InvalidRequestError(f"weights must be a string such as int4 or int4-g64, got {label!r}")
    name, *suffixes = label.split("-")
    given = {"g": group_size, "o": outlier_columns}
    what = {"g": "group size", "o": "number of outlier columns"}
    for suffix in suffixes:
        key, number = suffix[:1], suffix[1:]
        if key not in given or name not in WEIGHT_CHOICES:
            given = None
            break
        if given[key] is not None:
            raise InvalidRequestError(f"weights {label!r} gives the {what[key]} twice")
        if not number.isdigit():
            raise InvalidRequestError(f"weights {label!r}: the {what[key]} after -{key} must be a number")
        given[key] = int(number)
    if name not in WEIGHT_CHOICES or given is None:
        raise InvalidRequestError(
            f"unknown weight format {label!r}; allowed: {', '.join(WEIGHT_CHOICES)} (int8/int4 may end in -gN, "
            f"a group size: int4-g32/-g64/-g128, int8-g32; int8 also in -oN, outlier columns kept in float16, "
            f"e.g. int8-g32-o8 or int8-o0)"
        )
    return WeightsSpec(name, given["g"], given["o"])


def load_rounding(spec: WeightsSpec, statistics: dict[str, torch.Tensor] | None) -> LinearRounding | None:
    """How `spec` rounds the linear matrices it must quantize at load, from `statistics` (input_statistics over
    jisu's built-in prompts, jisu/quant/calibration.py): int8 to nearest with outlier columns
    (jisu/quant/outliers.py), int4 to nearest on fitted grids (jisu/quant/int4_grid.py). None: plain rounding (int8
    without outlier columns), or no statistics (the plan rounds no linear matrix)."""
    if statistics is None:
        return None
    if spec.name == "int8":
        return outlier_rounding(statistics, spec.outliers)
    if spec.name == "int4":
        return fitted_int4_rounding(statistics)
    return None


def is_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _LINEAR_LEAVES


@dataclass(frozen=True)
class Target:
    """What one checkpoint tensor loads as."""

    action: str
    """'keep' (as stored), 'float' (dequantized where stored quantized; a float stays in its stored dtype, the model
    casts it) or 'quantize' (to `format` with `group`)."""
    format: str | None = None
    group: int | None = None
    linear: bool = False
    """A linear layer's matrix: rounded by the linear rounding given (load_rounding's or GPTQ's), if one is."""


@dataclass(frozen=True)
class WeightsPlan:
    """The format of every tensor of a checkpoint under one spec."""

    spec: WeightsSpec
    targets: dict[str, Target]

    @property
    def rounds_linear(self) -> list[str]:
        """The linear matrices it rounds (where a rounding is given, by that rounding)."""
        return [n for n, t in self.targets.items() if t.action == "quantize" and t.linear]

    @property
    def needs_statistics(self) -> bool:
        """Whether applying it as at load needs calibration statistics (see load_rounding)."""
        return self.spec.calibrated and bool(self.rounds_linear)

    def apply(self, tensors: dict, round_linear: LinearRounding | None = None) -> dict:
        """`tensors` in their planned formats; round_linear quantizes the linear matrices that must be (called only
        for those); None: to nearest on min/max, no outlier columns."""
        return {name: _apply(name, t, self.targets[name], round_linear) for name, t in tensors.items()}


def plan_weights(tensors: dict, spec: WeightsSpec, tied: bool, output_group: int | None = None,
                 int8: bool = True) -> WeightsPlan:
    """The format each of `tensors` (float or QuantizedTensor) loads in under `spec`. output_group: the int8 output
    layer's group size when int4 is asked (None = per channel). int8: whether int8 matrices can run where the
    model loads; where not, what would be int8 stays float (the caller refuses an int8 spec there)."""
    return WeightsPlan(spec, {name: _target(name, t, spec, tied, output_group, int8) for name, t in tensors.items()})


def plan_for(checkpoint, spec: WeightsSpec, formats: tuple[str, ...], dtype: torch.dtype) -> WeightsPlan:
    """The plan a load makes: `spec` where its low-bit `formats` run (jisu/capabilities.py; stored blocks kept under
    auto), else every matrix a float of the compute `dtype`."""
    keep = spec.keeps_blocks and bool(formats)
    target = spec if keep else WeightsSpec(dtype_name(dtype))
    return plan_weights(checkpoint.tensors, target, checkpoint.ties_output, int8="int8" in formats)


def convert_tensors(
    tensors: dict, spec: WeightsSpec, tied: bool, output_group: int | None = None,
    round_linear: LinearRounding | None = None, int8: bool = True,
) -> dict:
    """Checkpoint tensors (float or QuantizedTensor) -> the formats `spec` asks for: plan_weights, then apply.
    round_linear: how a linear matrix is quantized to `spec`'s format when it must be (load_rounding's, or GPTQ's,
    jisu/quant/gptq.py; called only then); None: to nearest on min/max, no outlier columns."""
    return plan_weights(tensors, spec, tied, output_group, int8).apply(tensors, round_linear)


def _target(name: str, t, spec: WeightsSpec, tied: bool, output_group: int | None, int8: bool) -> Target:
    if spec.name in FLOAT_WEIGHTS:
        return Target("float")
    if spec.name == "auto":
        return Target("float") if not int8 and isinstance(t, QuantizedTensor) and t.bits == 8 else Target("keep")
    output = name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
    if output and not int8:
        return Target("float")
    if output:
        group = spec.group_size if spec.name == "int8" else output_group
        return _as(t, "int8", group)
    if is_linear_weight(name):
        group = spec.group_size if spec.name == "int8" else (spec.group_size or 32)
        return _as(t, spec.name, group, linear=True)
    return Target("float")


def _as(t, fmt: str, group: int | None, linear: bool = False) -> Target:
    """`t` in `fmt`: kept when it already is (Q4_1 asked as int4 group 32 stays byte for byte; Q8_0 stays when
    int8 per channel is asked, its 32-groups being finer), otherwise (de)quantized."""
    if isinstance(t, QuantizedTensor) and t.format == fmt and (group is None or t.group_size == group):
        return Target("keep")
    return Target("quantize", fmt, group, linear)


def _apply(name: str, t, target: Target, round_linear: LinearRounding | None):
    if target.action == "keep":
        return t
    if isinstance(t, QuantizedTensor):
        t = t.dequantize()
    if target.action == "float":
        return t
    if target.linear and round_linear is not None:
        return round_linear(name, t.float(), target.group)
    return quantize(t.float(), target.format, target.group, name)

