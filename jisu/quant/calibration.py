"""Calibration: statistics of every linear layer's inputs over sample text, from a run of the model itself.

Two sources, neither of them WikiText (the perplexity text), so nothing is tuned on what it is judged by:
- calibration_texts(): jisu's built-in prompts, ~1,200 tokens. Enough to find the few inputs that run far above
  the rest (int8's outlier columns), and cheap enough to run at every int8 load (~1.7 s).
- sample_text(): jisu/quant/data/calibration.txt, ~24,000 tokens of text sampled from SmolLM2-135M-Instruct at
  temperature 1 (tools/make_calibration_text.py writes it). GPTQ needs each input's full second-moment matrix,
  which is only well conditioned with many more tokens than inputs (a down projection has 1,536).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jisu.errors import InvalidRequestError

_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "data" / "prompts.jsonl"
SAMPLE_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"
STEP_TOKENS = 4096
"""Tokens per forward step: bounds the calibration run's KV cache and activations, whatever the text's length."""


def calibration_texts() -> list[str]:
    """jisu's built-in benchmark prompts (chat questions) and greedy-eval openings: varied and short."""
    from jisu.eval.greedy import DEFAULT_PROMPTS

    texts = []
    for line in _PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            texts.append(record["messages"][-1]["content"] if "messages" in record else record["prompt"])
    return texts + list(DEFAULT_PROMPTS)


def sample_text(path: str | Path | None = None) -> list[str]:
    """The text of `path` (default: jisu's sampled calibration text) as one item; input_statistics cuts it into
    pieces of up to 512 tokens, as llama.cpp's imatrix does."""
    path = Path(path) if path is not None else SAMPLE_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRequestError(f"cannot read calibration text {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"calibration text {path} is not UTF-8 text") from None
    if not text.strip():
        raise InvalidRequestError(f"calibration text {path} is empty")
    return [text]


def input_statistics(checkpoint, texts: list[str], second_moments: bool = False) -> dict[str, torch.Tensor]:
    """{checkpoint name of each linear weight (e.g. model.layers.0.self_attn.q_proj.weight): statistics of its
    inputs}: float32 [in] mean squares, or with second_moments the float32 [in, in] matrix mean(x xᵀ) (its diagonal
    is the mean squares). Matrices stacked into one (q/k/v, gate/up) read one input and share one tensor. The run
    is `checkpoint` in its own precision (weights auto: a Q4_1 file's blocks, whose prefill products equal its
    float32 run's within float rounding, at a fifth of the memory); each text is cut into pieces of up to 512
    tokens, scored STEP_TOKENS at a time."""
    from jisu.config import CacheConfig, EngineConfig, SchedulerConfig
    from jisu.engine import LLMEngine
    from jisu.eval.scoring import score_batch
    from jisu.models.fused_decode import layer_by_layer
    from jisu.models.layers import Linear, MergedLinear
    from jisu.tokenizer import Tokenizer

    longest = min(512, checkpoint.config.max_context)
    tokenizer = Tokenizer(checkpoint.tokenizer)
    pieces = [ids[i:i + longest] for ids in (tokenizer.encode(t) for t in texts) for i in range(0, len(ids), longest)]
    steps: list[list[list[int]]] = []
    filled = STEP_TOKENS  # tokens in the last step
    for piece in pieces:
        if filled + len(piece) > STEP_TOKENS:
            steps.append([])
            filled = 0
        steps[-1].append(piece)
        filled += len(piece)
    block = 16
    config = EngineConfig(
        model=checkpoint.source, weights="auto", max_model_len=max(map(len, pieces), default=1),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=longest),
        cache=CacheConfig(
            block_size=block, num_blocks=max([sum(-(-len(p) // block) for p in s) for s in steps], default=1),
        ),
    )
    engine = LLMEngine(config, checkpoint=checkpoint)
    sums: dict[str, torch.Tensor] = {}

    def record(module_name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            moment = x.T @ x if second_moments else (x * x).sum(0)
            sums[module_name] = sums[module_name].add_(moment) if module_name in sums else moment
        return hook

    linears = {n: m for n, m in engine.model.named_modules() if isinstance(m, Linear) and n != "lm_head"}
    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    try:
        # The hooks must see every product, so the steps run the Python layers (a fused C++ step calls none).
        with layer_by_layer(engine.model):
            for step in steps:
                score_batch(engine, step, every_row=False)
    finally:
        for h in handles:
            h.remove()
    count = max(sum(map(len, pieces)), 1)
    out = {}
    for name, module in linears.items():
        if name not in sums:
            continue
        stats = sums[name] / count
        parent = name.rpartition(".")[0]
        shards = module.shards if isinstance(module, MergedLinear) else {name.rpartition(".")[2]: None}
        for shard in shards:
            out[f"{parent}.{shard}.weight"] = stats
    return out
