"""ModelRun (jisu/model_run.py): the engine's model on its KV cache, without an engine around it, as calibration
runs it; and the one recipe for runs that size their own KV cache (config.exact_cache)."""

from __future__ import annotations

import pytest
import torch

from jisu import LLM
from jisu.config import CacheConfig, EngineConfig, SchedulerConfig, exact_cache
from jisu.errors import InvalidRequestError
from jisu.model_run import context_window, plan_kv_cache, score_batch
from jisu.runner.kv_cache import kv_bytes_per_token


def test_exact_cache_holds_the_largest_batch_and_no_more():
    cache = exact_cache([16, 17], [40])
    assert (cache.block_size, cache.num_blocks, cache.enable_prefix_caching) == (16, 3, False)
    assert exact_cache([5] * 4).num_blocks == 4
    assert exact_cache().num_blocks == 1


def test_calibration_runs_the_model_the_engine_loads(tiny_llama_dir):
    from jisu.loader.resolve import load_checkpoint
    from jisu.quant.calibration import calibration_run

    ckpt = load_checkpoint(str(tiny_llama_dir), keep_blocks=True)
    seqs = [list(range(3, 40)), list(range(50, 60))]
    run = calibration_run(ckpt, 64, [[len(s) for s in seqs]])
    assert not hasattr(run, "scheduler") and run.max_model_len == 64 and run.kv_cache.num_blocks == 4
    llm = LLM(model=str(tiny_llama_dir), max_model_len=64, max_num_seqs=2)
    for got, want in zip(score_batch(run, seqs), score_batch(llm.engine, seqs)):
        assert torch.equal(got, want)


def test_kv_sizing_caps_the_context_at_what_the_cache_holds(tiny_llama_dir):
    from jisu.loader.resolve import load_checkpoint

    cfg, device = load_checkpoint(str(tiny_llama_dir)).config, torch.device("cpu")
    per_block = kv_bytes_per_token(cfg, torch.float32) * 16
    config = EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=8 * per_block))
    assert plan_kv_cache(cfg, config, torch.float32, device) == (8, 128)
    assert context_window(cfg, None, 10**9) == cfg.max_position_embeddings
    too_long = EngineConfig(max_model_len=256, scheduler=SchedulerConfig(max_num_seqs=1),
                            cache=CacheConfig(kv_cache_memory_bytes=8 * per_block))
    with pytest.raises(InvalidRequestError, match="does not fit the KV cache, which holds 128 tokens"):
        plan_kv_cache(cfg, too_long, torch.float32, device)
