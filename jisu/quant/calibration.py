"""Calibration: statistics of every linear layer's inputs over sample text, from a run of the model itself.

Two sources, neither of them WikiText (the perplexity text), so nothing is tuned on what it is judged by:
- calibration_texts(): jisu's built-in prompts, ~1,200 tokens. Enough to find the few inputs that run far above
  the rest (int8's outlier columns), and cheap enough to run at every int8 load (~1.7 s).
- sample_text(): jisu/quant/data/calibration.txt, ~24,000 tokens of text sampled from SmolLM2-135M-Instruct at
  temperature 1 (tools/make_calibration_text.py writes it). GPTQ needs each input's full second-moment matrix,
  which is only well conditioned with many more tokens than inputs (a down projection has 1,536).

Calibration is a step of its own: the loader (LLMEngine, `jisu quantize`) runs it before it applies a weights plan
that needs it, on a ModelRun of the checkpoint (jisu/model_run.py), never on an engine. LinearInputs is the one
collector of activation statistics: pruning's scores (jisu/prune/calibration.py) read it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jisu.errors import InvalidRequestError

_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "data" / "prompts.jsonl"
_GREEDY_PROMPTS = Path(__file__).resolve().parents[1] / "eval" / "data" / "prompts.txt"
SAMPLE_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"
STEP_TOKENS = 4096
"""Tokens per forward step: bounds the calibration run's KV cache and activations, whatever the text's length."""


def calibration_texts() -> list[str]:
    """jisu's built-in benchmark prompts (chat questions) and greedy-eval openings: varied and short."""
    texts = []
    for line in _PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            texts.append(record["messages"][-1]["content"] if "messages" in record else record["prompt"])
    return texts + [line for line in _GREEDY_PROMPTS.read_text(encoding="utf-8").splitlines() if line]


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


class LinearInputs:
    """Forward hooks on every linear layer of `model` (but the output layer, which sees only the rows sampled) that
    add up its inputs: per input x_j the sum of x_j^2, or with second_moments the [in, in] sum of x xᵀ (its diagonal
    the same sums). Used as a context: inside, steps run the model's Python layers (a fused C++ step calls none).
    sums_dtype: what the sums across steps are kept in (each step's own sum is float32)."""

    def __init__(self, model: torch.nn.Module, second_moments: bool = False, sums_dtype: torch.dtype = torch.float32):
        from jisu.models.layers import Linear

        self.model = model
        self.second_moments = second_moments
        self.sums_dtype = sums_dtype
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"}
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list = []
        self._layers = None

    def _record(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            moment = (x.T @ x if self.second_moments else (x * x).sum(0)).to(self.sums_dtype)
            self.sums[name] = self.sums[name].add_(moment) if name in self.sums else moment
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return hook

    def __enter__(self) -> LinearInputs:
        from jisu.models.fused_decode import layer_by_layer

        self._handles = [m.register_forward_hook(self._record(n)) for n, m in self.linears.items()]
        self._layers = layer_by_layer(self.model)
        self._layers.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._layers.__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def means(self) -> dict[str, torch.Tensor]:
        """Module name -> the float32 mean over the rows it saw (of x_j^2, or of x xᵀ)."""
        return {name: (self.sums[name] / self.rows[name]).float() for name in self.linears if name in self.sums}

    def by_weight(self) -> dict[str, torch.Tensor]:
        """means() under the checkpoint name of each weight (e.g. model.layers.0.self_attn.q_proj.weight): matrices
        stacked into one (q/k/v, gate/up) read one input and share one tensor."""
        from jisu.models.layers import MergedLinear

        out = {}
        for name, stats in self.means().items():
            module = self.linears[name]
            parent = name.rpartition(".")[0]
            shards = module.shards if isinstance(module, MergedLinear) else {name.rpartition(".")[2]: None}
            for shard in shards:
                out[f"{parent}.{shard}.weight"] = stats
        return out


def input_statistics(checkpoint, texts: list[str], second_moments: bool = False) -> dict[str, torch.Tensor]:
    """{checkpoint name of each linear weight (e.g. model.layers.0.self_attn.q_proj.weight): statistics of its
    inputs}: float32 [in] mean squares, or with second_moments the float32 [in, in] matrix mean(x xᵀ) (its diagonal
    is the mean squares). Matrices stacked into one (q/k/v, gate/up) read one input and share one tensor. The run
    is `checkpoint` in its own precision (weights auto: a Q4_1 file's blocks, whose prefill products equal its
    float32 run's within float rounding, at a fifth of the memory); each text is cut into pieces of up to 512
    tokens, scored STEP_TOKENS at a time."""
    from jisu.model_run import score_batch
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
    run = calibration_run(checkpoint, max(map(len, pieces), default=1), [list(map(len, s)) for s in steps])
    with LinearInputs(run.model, second_moments) as inputs:
        for step in steps:
            score_batch(run, step, every_row=False)
    return inputs.by_weight()


def calibration_run(checkpoint, max_model_len: int, steps: list[list[int]]):
    """A ModelRun of `checkpoint` in its own precision, as LLM(weights="auto") loads it on CPU (jisu's kernels where
    they build, int16 activations on its low-bit blocks), with a KV cache for any one of `steps` (the token
    lengths of the sequences run together)."""
    from jisu.capabilities import low_bit_support, resolve_device, resolve_dtype
    from jisu.config import EngineConfig, exact_cache
    from jisu.model_run import ModelRun
    from jisu.quant.plan import WeightsSpec, plan_for

    config = EngineConfig(model=checkpoint.source, weights="auto", max_model_len=max_model_len,
                          cache=exact_cache(*steps))
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    support = low_bit_support(device, dtype, config.cpu_kernels)
    formats = support.formats(config.weights)
    tensors = plan_for(checkpoint, WeightsSpec(config.weights), formats, dtype).apply(checkpoint.tensors)
    return ModelRun.build(config, checkpoint.config, tensors, device, dtype, support)
