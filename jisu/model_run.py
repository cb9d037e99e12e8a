"""A loaded model with its own paged KV cache and runner, and no scheduler, sampler or tokenizer: what the engine
is built on, and what runs token sequences straight through a model (calibration, scoring).

Loading runs one way: checkpoint tensors in the formats their plan chose (jisu/quant/plan.py) -> a KV cache sized
for the model and the settings (the one place sizing is decided; `jisu estimate` asks here too) -> the model ->
the runner. Calibration statistics, where a plan needs them, are computed before (jisu/quant/calibration.py, by a
ModelRun of the checkpoint in its own precision), never by a run started from inside a load.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from jisu.capabilities import LowBitSupport
from jisu.config import ACTIVATION_BITS, EngineConfig
from jisu.errors import InvalidRequestError, JisuError
from jisu.models.config import ModelConfig
from jisu.models.registry import model_class
from jisu.quant.formats import QuantizedTensor
from jisu.request import Request
from jisu.runner.kv_cache import KVCache, plan_num_blocks, resolve_kv_dtype
from jisu.runner.runner import ModelRunner
from jisu.sampling_params import SamplingParams
from jisu.scheduler.blocks import BlockManager
from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput

_ids = itertools.count()


def cache_dtype_for(cache_dtype: str, dtype: torch.dtype, support: LowBitSupport, activations: str,
                    low_bit: bool) -> torch.dtype:
    """What the KV cache stores: CacheConfig.dtype, 'auto' resolved by resolve_kv_dtype. Activations are rounded
    to int16 or int8 only by jisu's C++ kernels, and only on low-bit matrices (low_bit: the model has some)."""
    rounded = ACTIVATION_BITS[activations] < 32 and support.cpu_kernels and low_bit
    return resolve_kv_dtype(cache_dtype, dtype, rounded)


def context_window(model_config: ModelConfig, max_model_len: int | None, kv_capacity: int) -> int:
    """The context a run gets: max_model_len if given, else the model's own, capped at what the KV cache holds."""
    return max_model_len or min(model_config.max_position_embeddings, kv_capacity)


def kv_blocks(model_config: ModelConfig, config: EngineConfig, kv_dtype: torch.dtype, device: torch.device) -> int:
    """The KV blocks a run allocates for `config`: the cache's budget, but no more than max_num_seqs sequences of
    the longest context fill."""
    # Every running sequence at full length is all the cache can ever hold at once.
    longest = config.max_model_len or model_config.max_position_embeddings
    return plan_num_blocks(model_config, config.cache, kv_dtype, device, longest * config.scheduler.max_num_seqs)


def plan_kv_cache(model_config: ModelConfig, config: EngineConfig, kv_dtype: torch.dtype,
                  device: torch.device) -> tuple[int, int]:
    """(KV blocks, context window) for `config` (kv_blocks, context_window); raises InvalidRequestError where
    the context cannot be served."""
    num_blocks = kv_blocks(model_config, config, kv_dtype, device)
    kv_capacity = num_blocks * config.cache.block_size
    max_model_len = context_window(model_config, config.max_model_len, kv_capacity)
    if max_model_len > model_config.max_context:
        raise InvalidRequestError(
            f"max_model_len {max_model_len} exceeds the {model_config.max_context} positions this model supports"
        )
    if max_model_len > kv_capacity:
        raise InvalidRequestError(
            f"max_model_len {max_model_len} does not fit the KV cache, which holds {kv_capacity} tokens"
        )
    return num_blocks, max_model_len


def load_model(model_config: ModelConfig, tensors: dict, dtype: torch.dtype, device: torch.device,
               max_positions: int, cpu_kernels: bool = True, act_bits: int = 16):
    """The model for `model_config` with `tensors` (float or QuantizedTensor, as their plan made them) loaded."""
    model = model_class(model_config.architecture)(model_config, max_positions=max_positions)
    model.load_weights(tensors, dtype, device, cpu_kernels=cpu_kernels, act_bits=act_bits)
    model.eval()
    return model


@dataclass
class ModelRun:
    """A model on its own KV cache: the engine's model, cache, block manager and runner."""

    model: torch.nn.Module
    model_config: ModelConfig
    kv_cache: KVCache
    blocks: BlockManager
    runner: ModelRunner
    max_model_len: int
    kv_dtype: torch.dtype

    @classmethod
    def build(cls, config: EngineConfig, model_config: ModelConfig, tensors: dict, device: torch.device,
              dtype: torch.dtype, support: LowBitSupport) -> ModelRun:
        """Sizes the KV cache for `config` (cache, max_model_len, max_num_seqs, activations) and loads the model
        from `tensors` in compute `dtype` on `device`, where `support` says what runs."""
        low_bit = any(isinstance(t, QuantizedTensor) for t in tensors.values())
        kv_dtype = cache_dtype_for(config.cache.dtype, dtype, support, config.activations, low_bit)
        num_blocks, max_model_len = plan_kv_cache(model_config, config, kv_dtype, device)
        act_bits = ACTIVATION_BITS[config.activations]
        model = load_model(model_config, tensors, dtype, device, max_model_len, config.cpu_kernels, act_bits)
        cache = config.cache
        blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        kv_cache = KVCache(model_config, num_blocks, cache.block_size, kv_dtype, device)
        runner = ModelRunner(model, model_config, kv_cache, blocks, device, deterministic=config.deterministic)
        return cls(model, model_config, kv_cache, blocks, runner, max_model_len, kv_dtype)


def score_batch(run, sequences: list[list[int]], every_row: bool = True) -> list[torch.Tensor]:
    """float32 logits [len(seq), vocab] for every position of each sequence, all in one forward step (every_row
    False: only each sequence's last position, [1, vocab], for callers that want the step's activations, not
    its scores). `run`: a ModelRun, or an LLMEngine (it has the same model_config, max_model_len, blocks and
    runner). Each sequence is one prefill from an empty cache, through ModelRunner.prepare/execute like any
    scheduled step; every KV block taken is given back, also on error."""
    if not sequences:
        return []
    limit = run.max_model_len
    vocab = run.model_config.vocab_size
    for seq in sequences:
        if not seq:
            raise InvalidRequestError("cannot score an empty token sequence")
        if len(seq) > limit:
            raise InvalidRequestError(f"sequence of {len(seq)} tokens exceeds the context window of {limit}")
        if min(seq) < 0 or max(seq) >= vocab:
            raise InvalidRequestError(f"token ids must lie in [0, {vocab})")
    blocks, runner = run.blocks, run.runner
    requests = [Request(f"eval-{next(_ids)}", seq, SamplingParams(max_tokens=1)) for seq in sequences]
    try:
        for req in requests:
            if not blocks.allocate(req.request_id, req.num_tokens):
                raise JisuError(
                    f"the KV cache has {blocks.num_free_blocks} free blocks, too few for {len(sequences)} "
                    f"sequences of up to {max(map(len, sequences))} tokens; score fewer at once"
                )
        out = SchedulerOutput([ScheduledRequest(req, req.num_tokens, samples=True) for req in requests])
        step = runner.prepare(out)
        if every_row:  # the runner's logits for every row instead of only each sequence's last one
            step.sample_rows = torch.arange(out.num_tokens, device=step.input_ids.device)
        logits = runner.execute(step).cpu()
    finally:
        for req in requests:
            blocks.free(req.request_id)
    # prepare() lays single-token sequences (decodes) out first, then the rest, each group in order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]) != 1)
    parts = logits.split([len(sequences[i]) if every_row else 1 for i in order])
    result: list[torch.Tensor] = [None] * len(sequences)  # type: ignore[list-item]
    for i, part in zip(order, parts):
        result[i] = part
    return result

