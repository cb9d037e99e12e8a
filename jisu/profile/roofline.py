"""An analytical model of one engine step: FLOPs and bytes moved, and how a measured rate compares to the
roofline (the lower of what memory bandwidth and arithmetic rate allow).

Counting conventions (stated so the figures can be checked, not because they are the only choice):
- A matrix product [M, K] x [K, N] is 2*M*N*K FLOPs, as torch.utils.flop_counter counts aten.mm/addmm/bmm.
- Attention counts Q.K^T and P.V over every (query, visible key) pair of the step as executed: a prefill chunk
  of n tokens against a context of c keys is the full n x c rectangle, as torch's SDPA formula counts it.
- Elementwise work: RMSNorm 4 per element (square, sum, scale, weight), rotary 6 per rotated pair (a complex
  multiply), SiLU 4 and the gate product 1 per element, softmax 5 per score, residual adds and biases 1.
- Weights are read once per step (they do not stay in cache between steps), except the embedding table, of which
  only the rows of the step's tokens are read. The output layer runs only for rows that sample.
- KV cache: each new token's K/V is written once; each sequence reads the K/V of its context cached before this
  step. Activations are the traffic of eager execution (every op reads its inputs and writes its outputs once);
  they are reported but left out of the bound, since a fused kernel keeps most of them in cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from jisu.errors import InvalidRequestError, JisuError
from jisu.models.config import ModelConfig

# Parameter groups a step reads; per-layer groups are summed over layers.
LAYER_GROUPS = ("qkv_proj", "qkv_bias", "o_proj", "gate_up_proj", "down_proj", "norms")
GROUPS = ("embed_tokens", "lm_head") + LAYER_GROUPS

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32 or 'float32'; the key calibration figures are stored under."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return name


# ----------------------------------------------------------------------------- weights


def group_of(param_name: str) -> str:
    """Checkpoint (HF) or jisu parameter name -> its group in GROUPS."""
    leaf = param_name.rsplit(".", 2)
    module, attr = (leaf[-2], leaf[-1]) if len(leaf) >= 2 else ("", param_name)
    if "embed_tokens" in param_name:
        return "embed_tokens"
    if param_name.startswith("lm_head"):
        return "lm_head"
    if module in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        return "qkv_bias" if attr == "bias" else "qkv_proj"
    if module in ("o_proj", "down_proj"):
        return module
    if module in ("gate_proj", "up_proj", "gate_up_proj"):
        return "gate_up_proj"
    if "norm" in module:
        return "norms"
    raise InvalidRequestError(f"parameter {param_name!r} belongs to no known group of the Llama family")


def weight_elements(config: ModelConfig) -> dict[str, int]:
    """Elements per group for the whole model (the lm_head entry counts the output matrix even when tied)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {
        "embed_tokens": config.vocab_size * h,
        "lm_head": config.vocab_size * h,
        "qkv_proj": layers * (q + 2 * kv) * h,
        "qkv_bias": layers * (q + 2 * kv) if config.attention_bias else 0,
        "o_proj": layers * h * q,
        "gate_up_proj": layers * 2 * inter * h,
        "down_proj": layers * h * inter,
        "norms": (2 * layers + 1) * h,
    }


def parameter_count(config: ModelConfig) -> int:
    """Distinct parameters: a tied output layer is the embedding, counted once."""
    n = weight_elements(config)
    return sum(v for k, v in n.items() if k != "lm_head" or not config.tie_word_embeddings)


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per weight element, per parameter group.

    A float format is a whole number of bytes; a block-quantized one a fraction (Q4_1 stores 32 weights in 20
    bytes: 0.625). A group whose tensors differ (llama.cpp's K-quant mixes) gets its average.
    """

    bytes_per_weight: Mapping[str, float]
    name: str = ""

    def of(self, group: str) -> float:
        try:
            return self.bytes_per_weight[group]
        except KeyError:
            raise JisuError(f"weight format {self.name!r} gives no bytes per weight for {group!r}") from None

    @classmethod
    def uniform(cls, dtype: torch.dtype | str | float, name: str | None = None) -> WeightFormat:
        if isinstance(dtype, (int, float)):
            size, label = float(dtype), name or f"{dtype} B/weight"
        else:
            label = dtype_name(dtype)
            size, label = float(DTYPE_BYTES[label]), name or label
        return cls({g: size for g in GROUPS}, label)

    @classmethod
    def from_tensors(
        cls, tensors: Iterable[tuple[str, int, float]], tied: bool, name: str = ""
    ) -> WeightFormat:
        """From (parameter name, elements, bytes) of each stored tensor. A tied output layer reads the
        embedding's format."""
        elems: dict[str, int] = {}
        nbytes: dict[str, float] = {}
        for pname, n, b in tensors:
            g = group_of(pname)
            elems[g] = elems.get(g, 0) + int(n)
            nbytes[g] = nbytes.get(g, 0.0) + float(b)
        per = {g: nbytes[g] / elems[g] for g in elems if elems[g]}
        if (tied or "lm_head" not in per) and "embed_tokens" in per:
            per["lm_head"] = per["embed_tokens"]
        per.setdefault("qkv_bias", per.get("qkv_proj", 0.0))
        missing = [g for g in GROUPS if g not in per]
        if missing:
            raise JisuError(f"weight format {name!r}: no tensors for {', '.join(missing)}")
        return cls(per, name)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> WeightFormat:
        """The format of a loaded jisu model's parameters (what a step actually reads)."""
        rows = [(n, p.numel(), p.numel() * p.element_size()) for n, p in model.named_parameters()]
        dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
        # int8/int4 matrices are not parameters (see jisu/models/layers.py): count their blocks' bytes.
        for n, m in model.named_modules():
            q = getattr(m, "quantized", None)
            if q is not None:
                rows.append((f"{n}.weight", q.numel(), q.nbytes))
                dtypes.add(q.origin or q.format)
        dtypes = sorted(dtypes)
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        return cls.from_tensors(rows, tied, name="/".join(dtypes) + " (loaded)")


# ----------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step."""

    new_tokens: int
    """Tokens computed for this sequence in the step (1 for a decode, the chunk length for a prefill)."""
    context_len: int
    """Tokens visible once this step's tokens are written: cached + new."""
    samples: bool = True
    """Whether its last token's logits are computed (False for a prefill chunk that does not end the prompt)."""

    def __post_init__(self):
        for name in ("new_tokens", "context_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")
        if self.context_len < self.new_tokens:
            raise InvalidRequestError(
                f"context_len ({self.context_len}) must be at least new_tokens ({self.new_tokens})"
            )

    @property
    def cached(self) -> int:
        return self.context_len - self.new_tokens


def prefill_batch(prompt_len: int, num_seqs: int = 1) -> list[SeqWork]:
    """`num_seqs` prompts of `prompt_len` tokens, each prefilled whole from an empty cache."""
    _check_count("num_seqs", num_seqs)
    return [SeqWork(prompt_len, prompt_len)] * num_seqs


def decode_batch(context_len: int, num_seqs: int = 1) -> list[SeqWork]:
    """`num_seqs` sequences each decoding one token with `context_len` tokens visible (its own included)."""
    _check_count("num_seqs", num_seqs)
    return [SeqWork(1, context_len)] * num_seqs


def seq_work_from_step(step: Any) -> list[SeqWork]:
    """The batch of a runner StepInput (jisu.runner.runner): decode rows first, then prefill chunks."""
    return [SeqWork(n, context_len, samples) for n, context_len, samples in step.batch]


def _check_count(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")


# ----------------------------------------------------------------------------- step cost


@dataclass(frozen=True)
class Flops:
    linear: Mapping[str, int]
    """Matrix products with the weights, per group (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head)."""
    attention: int
    """Q.K^T and P.V."""
    softmax: int
    norm: int
    rotary: int
    activation: int
    residual: int
    """Residual adds and bias adds."""
    embedding: int = 0
    """A row gather: no arithmetic."""

    @property
    def matmul(self) -> int:
        return sum(self.linear.values())

    @property
    def other(self) -> int:
        return self.attention + self.softmax + self.norm + self.rotary + self.activation + self.residual

    @property
    def total(self) -> int:
        return self.matmul + self.other + self.embedding

    def to_dict(self) -> dict[str, Any]:
        return {
            "matmul": self.matmul,
            "linear": dict(self.linear),
            "attention": self.attention,
            "softmax": self.softmax,
            "norm": self.norm,
            "rotary": self.rotary,
            "activation": self.activation,
            "residual": self.residual,
            "embedding": self.embedding,
            "total": self.total,
        }


@dataclass(frozen=True)
class Bytes:
    weights: Mapping[str, float]
    """Per group, read once in the step."""
    kv_read: int
    kv_write: int
    activations: int

    @property
    def weights_total(self) -> float:
        return sum(self.weights.values())

    @property
    def compulsory(self) -> float:
        """What must cross the memory bus whatever the kernels: weights and KV cache. The roofline uses this."""
        return self.weights_total + self.kv_read + self.kv_write

    @property
    def total(self) -> float:
        return self.compulsory + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights_total,
            "weights_by_group": dict(self.weights),
            "kv_read": self.kv_read,
            "kv_write": self.kv_write,
            "activations": self.activations,
            "compulsory": self.compulsory,
            "total": self.total,
        }


@dataclass(frozen=True)
class StepCost:
    phase: str
    """prefill, decode or mixed."""
    num_seqs: int
    tokens: int
    """New tokens computed in the step: what tokens/s counts for both prefill and decode."""
    sampled: int
    """Rows that go through the output layer."""
    dtype: str
    """Compute dtype: selects the peak FLOP rate from a calibration."""
    flops: Flops
    bytes: Bytes
    batch: tuple[SeqWork, ...] = field(repr=False, default=())

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per compulsory byte."""
        return self.flops.total / self.bytes.compulsory if self.bytes.compulsory else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "num_seqs": self.num_seqs,
            "tokens": self.tokens,
            "sampled": self.sampled,
            "dtype": self.dtype,
            "flops": self.flops.to_dict(),
            "bytes": self.bytes.to_dict(),
            "arithmetic_intensity": self.arithmetic_intensity,
        }


def step_cost(
    config: ModelConfig,
    batch: Sequence[SeqWork],
    weights: WeightFormat | None = None,
    dtype: torch.dtype | str = torch.float32,
    kv_dtype: torch.dtype | str | None = None,
) -> StepCost:
    """FLOPs and bytes of one forward over `batch` (+ logits for the sampling rows).

    weights: the format the step reads (default: every weight in `dtype`); dtype: activations and compute;
    kv_dtype: the KV cache's (default `dtype`), as jisu allocates it.
    """
    if not batch:
        raise InvalidRequestError("batch is empty: a step computes at least one sequence")
    for s in batch:
        if not isinstance(s, SeqWork):
            raise InvalidRequestError(f"batch items must be SeqWork, got {type(s).__name__}")
    act = dtype_name(dtype)
    kv_name = dtype_name(kv_dtype) if kv_dtype is not None else act
    weights = weights or WeightFormat.uniform(act)
    e, kv_e = DTYPE_BYTES[act], DTYPE_BYTES[kv_name]

    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, kv, vocab = heads * d, kv_heads * d, config.vocab_size
    t = sum(s.new_tokens for s in batch)
    sampled = sum(1 for s in batch if s.samples)
    # The (query, key) pairs attention visits: each new token attends its context up to itself (causal), as the
    # deterministic runner computes it row by row.
    pairs = sum(s.new_tokens * s.cached + s.new_tokens * (s.new_tokens + 1) // 2 for s in batch)

    linear = {
        "qkv_proj": 2 * t * h * (q + 2 * kv) * layers,
        "o_proj": 2 * t * q * h * layers,
        "gate_up_proj": 2 * t * h * 2 * inter * layers,
        "down_proj": 2 * t * inter * h * layers,
        "lm_head": 2 * sampled * h * vocab,
    }
    flops = Flops(
        linear=linear,
        attention=2 * 2 * pairs * heads * d * layers,
        softmax=5 * pairs * heads * layers,
        norm=4 * t * h * (2 * layers + 1),
        rotary=6 * t * (heads + kv_heads) * (d // 2) * layers,
        activation=5 * t * inter * layers,
        residual=2 * t * h * layers + (t * (q + 2 * kv) * layers if config.attention_bias else 0),
    )

    elements = weight_elements(config)
    weight_bytes = {g: elements[g] * weights.of(g) for g in LAYER_GROUPS}
    weight_bytes["embed_tokens"] = t * h * weights.of("embed_tokens")
    weight_bytes["lm_head"] = elements["lm_head"] * weights.of("lm_head") if sampled else 0.0

    kv_per_token = 2 * kv * kv_e * layers
    nbytes = Bytes(
        weights=weight_bytes,
        kv_read=sum(s.cached for s in batch) * kv_per_token,
        kv_write=t * kv_per_token,
        activations=_activation_elements(config, t, sampled) * e,
    )
    decode = all(s.new_tokens == 1 and s.cached > 0 for s in batch)
    prefill = not any(s.new_tokens == 1 and s.cached > 0 for s in batch)
    return StepCost(
        phase="decode" if decode else "prefill" if prefill else "mixed",
        num_seqs=len(batch),
        tokens=t,
        sampled=sampled,
        dtype=act,
        flops=flops,
        bytes=nbytes,
        batch=tuple(batch),
    )


def _activation_elements(config: ModelConfig, t: int, sampled: int) -> int:
    """Elements each op of an eager step reads plus writes (K/V traffic is in kv_read/kv_write)."""
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = (
        2 * h  # input norm: read x, write normed
        + h + q + 2 * kv  # qkv projection
        + 2 * (q + kv)  # rotary of q and k
        + 2 * q  # attention: read q, write out
        + q + h  # o_proj
        + 3 * h  # residual add
        + 2 * h  # post-attention norm
        + h + 2 * inter  # gate_up projection
        + 3 * inter  # silu(gate) * up
        + inter + h  # down projection
        + 3 * h  # residual add
    )
    embed_and_norm = h + 2 * h  # embedding rows written, final norm
    logits = sampled * (h + config.vocab_size)  # sampled hidden rows read, logits written
    return t * (per_layer * config.num_hidden_layers + embed_and_norm) + logits


def prefill_cost(config: ModelConfig, prompt_len: int, num_seqs: int = 1, **kw: Any) -> StepCost:
    return step_cost(config, prefill_batch(prompt_len, num_seqs), **kw)


def decode_cost(config: ModelConfig, context_len: int, num_seqs: int = 1, **kw: Any) -> StepCost:
    return step_cost(config, decode_batch(context_len, num_seqs), **kw)


# ----------------------------------------------------------------------------- verdict


class MachineLimits(Protocol):
    """What roofline_verdict needs from a calibration (jisu.profile.calibrate.Calibration)."""

    bandwidth_bytes_per_s: float
    peak_flops_per_s: Mapping[str, float]


MEMORY = "memory bandwidth"
COMPUTE = "compute"


@dataclass(frozen=True)
class Verdict:
    phase: str
    achieved_tokens_per_s: float
    bound_tokens_per_s: float
    percent_of_bound: float
    binding: str
    """MEMORY or COMPUTE: the resource whose limit sets the bound."""
    achieved_bytes_per_s: float
    achieved_flops_per_s: float
    memory_time_s: float
    """Moving the compulsory bytes of the step(s) at the calibrated bandwidth."""
    compute_time_s: float
    """Doing every FLOP of the step(s) at the calibrated matmul rate."""
    arithmetic_intensity: float
    ridge_intensity: float
    """FLOPs per byte where the two limits meet; above it a step is compute-bound."""
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def roofline_verdict(
    achieved_tokens_per_s: float, step_model: StepCost | Sequence[StepCost], calibration: MachineLimits
) -> Verdict:
    """How a measured rate compares with the roofline bound of `step_model` on the calibrated machine.

    step_model: one step, or every step of a phase (e.g. all decode steps of a run, whose contexts grow): the
    bound is then all their tokens over the sum of each step's own bound time, and the resource that binds is
    the one whose time dominates that sum.
    """
    if isinstance(achieved_tokens_per_s, bool) or not isinstance(achieved_tokens_per_s, (int, float)) or not (
        achieved_tokens_per_s >= 0
    ):
        raise InvalidRequestError(f"achieved_tokens_per_s must be a number >= 0, got {achieved_tokens_per_s!r}")
    steps = [step_model] if isinstance(step_model, StepCost) else list(step_model)
    if not steps or not all(isinstance(s, StepCost) for s in steps):
        raise InvalidRequestError("step_model must be a StepCost or a non-empty sequence of them")
    dtypes = {s.dtype for s in steps}
    if len(dtypes) > 1:
        raise InvalidRequestError(f"steps of one verdict must share a compute dtype, got {sorted(dtypes)}")
    dtype = dtypes.pop()
    bandwidth = float(calibration.bandwidth_bytes_per_s)
    peaks = calibration.peak_flops_per_s
    if dtype not in peaks:
        raise JisuError(
            f"the calibration has no matmul rate for {dtype} (it measured "
            f"{', '.join(peaks) or 'none'}); run `jisu calibrate --force`"
        )
    peak = float(peaks[dtype])
    if bandwidth <= 0 or peak <= 0:
        raise JisuError(f"calibration figures must be positive (bandwidth {bandwidth}, peak {peak})")
    memory_times = [s.bytes.compulsory / bandwidth for s in steps]
    compute_times = [s.flops.total / peak for s in steps]
    bound_time = sum(max(m, c) for m, c in zip(memory_times, compute_times))
    tokens = sum(s.tokens for s in steps)
    nbytes = sum(s.bytes.compulsory for s in steps)
    flops = sum(s.flops.total for s in steps)
    memory_time, compute_time = sum(memory_times), sum(compute_times)
    # The measured rate as the time the steps took: achieved B/s and FLOP/s follow from it.
    elapsed = tokens / achieved_tokens_per_s if achieved_tokens_per_s else float("inf")
    bound = tokens / bound_time
    phases = {s.phase for s in steps}
    return Verdict(
        phase=phases.pop() if len(phases) == 1 else "mixed",
        achieved_tokens_per_s=float(achieved_tokens_per_s),
        bound_tokens_per_s=bound,
        percent_of_bound=100.0 * achieved_tokens_per_s / bound,
        binding=MEMORY if memory_time >= compute_time else COMPUTE,
        achieved_bytes_per_s=nbytes / elapsed,
        achieved_flops_per_s=flops / elapsed,
        memory_time_s=memory_time,
        compute_time_s=compute_time,
        arithmetic_intensity=flops / nbytes if nbytes else float("inf"),
        ridge_intensity=peak / bandwidth,
        bandwidth_bytes_per_s=bandwidth,
        peak_flops_per_s=peak,
    )
