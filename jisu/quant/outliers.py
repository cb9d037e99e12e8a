"""Outlier columns for int8 weights: the few inputs whose weights stay float16, chosen from calibration activations.

Why: a few inputs of each linear layer run far above the rest. In SmolLM2-135M the same hidden dimensions lead
the attention inputs of layers 2, 10 and 20 on every token (507, 260, 247, ...), and the FFN down projections
of early layers see "massive activations" on the first token (layer 2: 80 against a median token maximum of
1.1). A layer's rounding error in those columns is multiplied by the largest activations. Measured on SmolLM2-135M (WikiText-2, 20 chunks,
against the float32 run of the same weights): int8 per channel agrees on the top-1 token 96.45% of the time,
97.68% with 8 such columns per matrix kept in float16; int8 group 32: 97.44% -> 98.46%. (The first 8 chunks:
the same weights rounded to bfloat16 agree 99.71%, per-channel int8 96.53%, so int8's rounding flips tokens that
a finer rounding keeps.)
(LLM.int8() splits outlier features out of int8 matmuls for the same reason; here only the weights are int8.)

A column is chosen by the mean square of its input over calibration text: jisu's built-in prompts, never the
text a model is evaluated on. Projections stacked into one matrix (q/k/v, gate/up) read the same input, so
they get the same columns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_OUTLIER_COLUMNS = 8
"""Per int8 matrix: 8 float16 columns add 16 bytes per output row, 2.5 MB over SmolLM2-135M's 137 MB. With 4,
int8 group 32 agreed 98.16% (a float32 simulation, 20 chunks), 8: 98.32%, per channel with 32: 97.91%."""

_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "data" / "prompts.jsonl"


def calibration_texts() -> list[str]:
    """jisu's built-in benchmark prompts (chat questions) and greedy-eval openings: varied, short, and not
    WikiText (the perplexity text), so the choice never sees what it is judged on."""
    from jisu.eval.greedy import DEFAULT_PROMPTS

    texts = []
    for line in _PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            texts.append(record["messages"][-1]["content"] if "messages" in record else record["prompt"])
    return texts + list(DEFAULT_PROMPTS)


def input_mean_squares(checkpoint, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{checkpoint name of each linear weight (e.g. model.layers.0.self_attn.q_proj.weight): float32 [in] mean
    square of each of its inputs}, from a run of `checkpoint` over `texts` (default calibration_texts) in its own
    precision (weights auto: a Q4_1 file's blocks, whose prefill products equal its float32 run's within float
    rounding, at a fifth of the memory)."""
    from jisu.config import CacheConfig, EngineConfig, SchedulerConfig
    from jisu.engine import LLMEngine
    from jisu.eval.scoring import score_batch
    from jisu.models.layers import Linear, MergedLinear
    from jisu.tokenizer import Tokenizer

    texts = calibration_texts() if texts is None else texts
    longest = min(512, checkpoint.config.max_context)
    tokenizer = Tokenizer(checkpoint.tokenizer)
    seqs = [ids[:longest] for ids in (tokenizer.encode(t) for t in texts) if ids]
    # Every text in one forward step (one large product per matrix), with just the KV blocks they need.
    block, most = 16, max(map(len, seqs), default=1)
    config = EngineConfig(
        model=checkpoint.source, weights="auto", max_model_len=most,
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=most),
        cache=CacheConfig(block_size=block, num_blocks=max(1, sum(-(-len(s) // block) for s in seqs))),
    )
    engine = LLMEngine(config, checkpoint=checkpoint)
    sums: dict[str, torch.Tensor] = {}
    count = sum(map(len, seqs))

    def record(module_name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            sums[module_name] = sums.get(module_name, 0) + (x * x).sum(0)
        return hook

    linears = {n: m for n, m in engine.model.named_modules() if isinstance(m, Linear) and n != "lm_head"}
    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    try:
        if seqs:
            score_batch(engine, seqs, every_row=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, module in linears.items():
        if name not in sums:
            continue
        ms = sums[name] / max(count, 1)
        parent = name.rpartition(".")[0]
        shards = module.shards if isinstance(module, MergedLinear) else {name.rpartition(".")[2]: None}
        for shard in shards:
            out[f"{parent}.{shard}.weight"] = ms
    return out


def choose_columns(mean_squares: torch.Tensor, k: int) -> torch.Tensor:
    """The k inputs with the largest mean square, ascending (int64)."""
    k = min(k, mean_squares.numel())
    return mean_squares.topk(k).indices.sort().values


def outlier_columns_for(checkpoint, k: int) -> Callable[[], dict[str, torch.Tensor]] | None:
    """A function giving {linear weight name: its k outlier columns}, calibrating on its first call only (a
    checkpoint whose int8 matrices are all kept as they are never needs it); None when k is 0."""
    if not k:
        return None
    found: dict[str, torch.Tensor] = {}

    def columns() -> dict[str, torch.Tensor]:
        if not found:
            found.update({n: choose_columns(ms, k) for n, ms in input_mean_squares(checkpoint).items()})
        return found

    return columns
