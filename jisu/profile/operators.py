"""Time by layer and by operator class, from forward hooks installed only while profiling.

NOTE: hooks add a clock read before and after each timed module (and a device synchronize on GPUs, so
the times are the device's, not the launches'). With the profiler off no hook exists and nothing changes;
`jisu profile` measures the overhead by running the same workload both ways.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from jisu.models.fused_decode import layer_by_layer
from jisu.models.layers import GateAndMul, Linear, RMSNorm
from jisu.models.rotary import ApplyRotary
from jisu.runner.attention import PagedAttention

OPERATOR_CLASSES = ("attention", "linear", "norm", "rotary", "activation", "embedding/output", "sampling", "other")


def operator_class(name: str, module: nn.Module) -> str | None:
    if name.endswith("lm_head") or isinstance(module, nn.Embedding):
        return "embedding/output"
    if isinstance(module, PagedAttention):
        return "attention"
    if isinstance(module, Linear):
        return "linear"
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, ApplyRotary):
        return "rotary"
    if isinstance(module, GateAndMul):
        return "activation"
    return None


class OperatorProfiler:
    """Context manager: accumulates seconds per operator class and per decoder layer over forward passes."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.by_class: dict[str, float] = defaultdict(float)
        self.by_layer: dict[int, float] = defaultdict(float)
        self.layer_ops: dict[int, float] = defaultdict(float)
        self.forward_time = 0.0
        self.output_layer_time = 0.0
        self.calls = 0
        self._handles = []
        self._starts: dict[int, float] = {}

    def __enter__(self) -> "OperatorProfiler":
        layers = getattr(getattr(self.model, "model", None), "layers", [])
        layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        for name, module in self.model.named_modules():
            kind = operator_class(name, module)
            if kind is not None:
                self._hook(module, self._op_done(kind, layer_of.get(id(module)), name.endswith("lm_head")))
        for i, layer in enumerate(layers):
            self._hook(layer, self._layer_done(i))
        self._hook(self.model, self._model_done)
        # The fused C++ stack runs every layer in one call, with no modules to time: while hooked, decode steps
        # (and, in deterministic mode, prompt rows, which it also runs) take the eager layers, so the breakdown
        # describes those, whose kernels differ (docs/PERFORMANCE.md, "what runs a prefill").
        self._layer_by_layer = layer_by_layer(self.model)
        self._layer_by_layer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._layer_by_layer.__exit__(None, None, None)

    def _hook(self, module: nn.Module, done) -> None:
        def pre(mod, args, kwargs=None):
            self.sync()
            self._starts[id(mod)] = time.perf_counter()

        def post(mod, args, output):
            self.sync()
            done(time.perf_counter() - self._starts.pop(id(mod)))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def _op_done(self, kind: str, layer: int | None, is_output_layer: bool):
        def done(seconds: float) -> None:
            self.by_class[kind] += seconds
            if layer is not None:
                self.layer_ops[layer] += seconds
            if is_output_layer:
                self.output_layer_time += seconds

        return done

    def _layer_done(self, index: int):
        def done(seconds: float) -> None:
            self.by_layer[index] += seconds

        return done

    def _model_done(self, seconds: float) -> None:
        self.forward_time += seconds
        self.calls += 1

    def breakdown(self, sampling_seconds: float) -> dict[str, float]:
        """Seconds per operator class. `other` is what the timed classes leave of the forward passes
        (residual adds, reshapes, hook overhead); sampling comes from the step log."""
        out = {k: self.by_class.get(k, 0.0) for k in OPERATOR_CLASSES}
        # The output layer runs after model.forward returns (compute_logits), so it is not inside forward_time.
        inside_forward = sum(self.by_class.values()) - self.output_layer_time
        out["other"] = max(0.0, self.forward_time - inside_forward)
        out["sampling"] = sampling_seconds
        return out

    def layer_other(self) -> dict[int, float]:
        """Per layer: time not spent in its timed operators."""
        return {i: max(0.0, t - self.layer_ops.get(i, 0.0)) for i, t in self.by_layer.items()}
