"""Engine settings, validated when built so a bad value fails before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from jisu.errors import InvalidRequestError


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Sequences decoding together in one step."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step; longer prompts are prefilled in chunks of at most this size."""
    max_prefill_tokens_with_decodes: int | None = None
    """Prompt tokens a step may take while some sequence decodes in it (None: the whole budget). Every decoding
    sequence waits for its step, so a cap bounds their time per output token (TPOT) while new prompts arrive;
    the prompts then take more steps (higher TTFT). See scheduler.py's NOTE on decode latency."""

    def __post_init__(self):
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_prefill_tokens_with_decodes", self.max_prefill_tokens_with_decodes, 1, allow_none=True)


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPE_HELP = ("KV cache element type: auto (default: the compute dtype; float16 for low-bit weights with "
                       "int16 activations, as llama.cpp), float32, float16 (llama.cpp's default: half the memory and "
                       "half the reads per decode step), bfloat16")


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_bytes: int | None = None
    """Memory for the KV cache; None sizes it automatically (see kv_cache.py)."""
    num_blocks: int | None = None
    """Exact block count; overrides kv_cache_memory_bytes (used by tests to force preemption)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of token prefixes seen before (system prompts, multi-turn chats)."""
    dtype: str = "auto"
    """What the cache stores K/V in: auto (the compute dtype; float16 where low-bit weights run with int16
    activations, see kv_cache.resolve_kv_dtype), float32, float16 or bfloat16 (half the bytes of
    float32: twice the context in the same memory, half the reads per decode step; attention still computes in
    the compute dtype)."""

    def __post_init__(self):
        if self.dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(
                f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.dtype!r}"
            )
        _check_int("block_size", self.block_size, 1)
        _check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, allow_none=True)
        _check_int("num_blocks", self.num_blocks, 1, allow_none=True)


SCORING_BLOCK_SIZE = 16
"""KV block size of runs that batch their own sequences (scoring, calibration; see exact_cache)."""


def exact_cache(*batches: list[int]) -> CacheConfig:
    """A KV cache that holds any one of `batches` (the token lengths of sequences run together) and no more, without
    prefix caching: for runs that size their own steps (scoring, calibration), where every sequence starts from an
    empty cache."""
    bs = SCORING_BLOCK_SIZE
    blocks = max((sum(-(-n // bs) for n in lengths) for lengths in batches), default=1)
    return CacheConfig(block_size=bs, num_blocks=max(blocks, 1), enable_prefix_caching=False)


DETERMINISTIC_HELP = ("let prefill chunks and large batches run on faster kernels whose rounding depends on the "
                      "batch's shape (default: deterministic, a request's tokens do not depend on batching, prompt "
                      "chunking or prefix-cache hits)")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Each --activations choice and what it rounds x to in the int8/int4 kernels (QWeight.act_bits; 32: kept float).
ACTIVATION_BITS = {"int16": 16, "float32": 32, "int8": 8}
ACTIVATIONS = tuple(ACTIVATION_BITS)
WEIGHTS_HELP = ("weight format: auto (default: the file's own precision; GGUF Q4_0/Q4_1/Q8_0 run as they are), float32, "
                "float16, bfloat16, int8, int4; int8/int4 take a group size as -gN, e.g. int4-g64; int8 keeps 64 input "
                "columns per matrix in float16 (8 with -gN), -oN for N (-o0: none)")
ACTIVATIONS_HELP = ("int8/int4 weights at decode: int16 (default) rounds each 32 inputs to int16 for integer dot "
                    "products, within 2^-16 of their largest; float32 keeps them exact (slower); int8 rounds int4 "
                    "products' inputs to int8 (faster prompts, coarser: it changes answers, see docs/QUANTIZATION.md)")


@dataclass
class EngineConfig:
    model: str | None = None
    """Path to a GGUF file or Hugging Face folder, a short name, or None for the default model."""
    device: str = "cpu"
    dtype: str = "auto"
    """Compute dtype; auto = float32 on CPU (no fast half-precision matmul there), bfloat16 on CUDA."""
    max_model_len: int | None = None
    """Context window; None = the model's own (capped by the KV cache)."""
    weights: str = "auto"
    """Weight format (see jisu/quant/plan.py): auto (the file's own precision, low-bit blocks kept), float32,
    float16, bfloat16, int8, int4."""
    group_size: int | None = None
    """int4: 32/64/128 (default 32); int8: None = one scale per output channel."""
    outlier_columns: int | None = None
    """int8: input columns per linear matrix kept in float16, those with the largest calibration activations
    (None = 64 per channel, 8 with a group size; 0 = none; see jisu/quant/outliers.py)."""
    activations: str = "int16"
    """int8/int4 weights at decode (up to 192 rows per product): int16 rounds each 32 inputs to int16 with one
    scale (2^-16 of their largest; integer dot products, ~2x faster for int4), float32 keeps them exact, int8
    rounds int4 products' inputs to int8 (1/254 of their largest: ~1.35x faster products, a measured quality cost;
    int8 weights keep int16)."""
    cpu_kernels: bool = True
    """Use jisu's C++ kernels for few-row float32 products on CPU (built on first use); False = torch's only."""
    seed: int = 0
    """Seed of the shared RNG used by requests that give no seed of their own."""
    deterministic: bool = True
    """Batch-invariant arithmetic: a request's tokens (greedy, or sampled with a seed) do not depend on what else
    is in the batch, on prefix-cache hits, on how its prompt was chunked or on preemption (jisu/runner/runner.py).
    False lets prefill chunks and large batches take faster shape-dependent kernels (vLLM's default)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    speculative: object | None = None
    """Speculative decoding (jisu.spec_decode.SpeculativeConfig, or vLLM's speculative_config dict / JSON):
    prompt-lookup or draft-model proposals verified in the step's forward. None: off."""

    def __post_init__(self):
        from jisu.spec_decode.config import SpeculativeConfig

        self.speculative = SpeculativeConfig.parse(self.speculative)
        kind = self.device.split(":")[0]
        if kind not in DEVICES:
            raise InvalidRequestError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        if self.activations not in ACTIVATIONS:
            raise InvalidRequestError(
                f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )
        from jisu.capabilities import low_bit_support
        from jisu.quant.plan import FLOAT_WEIGHTS, parse_weights

        spec = parse_weights(self.weights, self.group_size, self.outlier_columns)
        self.weights, self.group_size, self.outlier_columns = spec.name, spec.group_size, spec.outlier_columns
        if spec.name in FLOAT_WEIGHTS:
            if self.dtype not in ("auto", spec.name):
                raise InvalidRequestError(f"weights={spec.name} contradicts dtype={self.dtype}; give one of them")
            self.dtype = spec.name
        elif spec.quantized:
            # By the rules alone: whether the kernels build, or the GPU is new enough, is the engine's to find out.
            low_bit_support(kind, self.dtype, self.cpu_kernels, probe=False).formats(spec.name)
