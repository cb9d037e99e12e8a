"""What can run here: the device, the compute dtype it gets, and which low-bit formats have a kernel for a (device,
compute dtype, cpu_kernels), or why not.

Config validation, the engine, the model's weight binding and `jisu estimate` all ask here, so they cannot disagree.
The kernels:
- jisu's C++ kernels (jisu/kernels/): int8 and int4, on CPU, computing in float32, with cpu_kernels on, where a C++
  toolchain builds them (on first use).
- torch's int4 kernel (jisu/kernels/torch_int4.py): int4 on CUDA (compute capability 8.0 or newer), computing in
  bfloat16; on CPU in float32, but there 10-30x slower than float32 matrices, so weights=auto does not take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from jisu.errors import InvalidRequestError

LOW_BIT_FORMATS = ("int8", "int4")
_CPU_KERNELS_NEED = "jisu's C++ CPU kernels (device cpu, float32 compute, cpu_kernels on, a C++ toolchain)"


def resolve_device(name: str | torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The compute dtype: a torch dtype or its name as given, 'auto' by device."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # NOTE: this CPU class has no fast half-precision matmul in torch (about 1 GFLOP/s), so float32.
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype in ("float32", "float16", "bfloat16"):
        return getattr(torch, dtype)
    raise InvalidRequestError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LowBitSupport:
    """The low-bit formats that run for one (device, compute dtype, cpu_kernels), on which kernel, and why the
    others do not."""

    device_type: str
    kernels: dict[str, str] = field(default_factory=dict)
    """Format -> the kernel it runs on here: 'jisu-cpu' (jisu's C++ kernels) or 'torch-int4'."""
    refusals: dict[str, str] = field(default_factory=dict)
    """Format -> why it cannot run here, a sentence for an error message."""

    @property
    def cpu_kernels(self) -> bool:
        """Whether jisu's C++ kernels run here: the only ones that round activations to int16."""
        return "jisu-cpu" in self.kernels.values()

    def formats(self, weights: str = "auto") -> tuple[str, ...]:
        """The low-bit formats matrices load in when `weights` is asked: int8 and int4 on jisu's C++ kernels; int4
        alone on torch's (CUDA; on CPU only when int4 itself is asked); () = floats only. Asking for int8 or int4
        where it cannot run raises InvalidRequestError with the reason."""
        if self.cpu_kernels:
            return LOW_BIT_FORMATS
        if weights in LOW_BIT_FORMATS and weights not in self.kernels:
            raise InvalidRequestError(self.refusals[weights])
        if "int4" in self.kernels and (self.device_type == "cuda" or weights == "int4"):
            return ("int4",)
        return ()


def low_bit_support(device: str | torch.device, dtype: str | torch.dtype, cpu_kernels: bool = True,
                    probe: bool = True) -> LowBitSupport:
    """Which low-bit formats run for `device`, compute `dtype` ('auto' resolved as resolve_dtype does) and
    `cpu_kernels`, and why not. probe: also build jisu's C++ kernels (first use: 1-2 minutes, then cached) and ask
    torch whether its int4 kernel runs on this device; False answers from the rules alone, assuming both would
    (config validation and estimates, which must not build kernels or touch a GPU)."""
    device = torch.device(device)
    kind = device.type
    dtype = resolve_dtype(dtype, device)
    if kind not in ("cpu", "cuda"):
        return LowBitSupport(kind, {}, {f: f"{f} weights have no kernel on device type {kind!r}"
                                        for f in LOW_BIT_FORMATS})
    if kind == "cpu" and dtype != torch.float32:
        return LowBitSupport(kind, {}, {f: f"{f} weights compute in float32, not {dtype_name(dtype)}"
                                        for f in LOW_BIT_FORMATS})
    if kind == "cpu" and cpu_kernels and (not probe or _cpu_kernels_build()):
        return LowBitSupport(kind, {f: "jisu-cpu" for f in LOW_BIT_FORMATS}, {})
    # What is left is torch's int4 kernel.
    if kind == "cuda":
        int8 = "int8 weights run on jisu's CPU kernels (use device cpu); on cuda use int4 or bfloat16"
        if dtype != torch.bfloat16:
            return LowBitSupport(kind, {}, {"int8": int8, "int4": f"int4 weights on cuda compute in bfloat16, not "
                                                                   f"{dtype_name(dtype)}"})
    else:
        int8 = f"int8 weights need {_CPU_KERNELS_NEED}"
    why_not = _torch_int4_refusal(device) if probe else None
    if why_not is not None:
        int4 = f"int4 weights need {_CPU_KERNELS_NEED} or torch's int4 kernel ({why_not})"
        return LowBitSupport(kind, {}, {"int8": int8, "int4": int4})
    return LowBitSupport(kind, {"int4": "torch-int4"}, {"int8": int8})


def _cpu_kernels_build() -> bool:
    from jisu.kernels.build import cpu_linear_kernels

    return cpu_linear_kernels() is not None


def _torch_int4_refusal(device: torch.device) -> str | None:
    # Looked up at call time, so a test can stand in for a GPU.
    from jisu.kernels import torch_int4

    return torch_int4.torch_int4_available(device)
