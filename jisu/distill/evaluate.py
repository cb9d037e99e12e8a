"""One table that says whether a distillation was worth it: for the teacher, the student before training and the
student after, the perplexity of held-out text, KL divergence and top-1 agreement against the teacher, the
parameter count and decode speed, every row through jisu's own engine in the same weight format.

Held-out means not trained on: `jisu distill` skips the evaluated chunks' tokens when it trains on the
evaluation file itself (jisu/distill/data.py), and its built-in training text is not WikiText.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

from jisu.loader.checkpoint import Checkpoint

DECODE_PROMPT = "The history of the city begins"


@dataclass
class EvalRow:
    label: str
    parameters: int
    ppl: float
    ppl_stderr: float
    kl_mean: float
    top1_agreement: float
    decode_tokens_per_s: float
    """Median of `decode_runs` greedy generations of `decode_tokens` tokens each, batch 1."""

    def to_dict(self) -> dict:
        return asdict(self)


def parameters(checkpoint: Checkpoint) -> int:
    return sum(t.numel() for name, t in checkpoint.tensors.items()
               if not (name == "lm_head.weight" and checkpoint.ties_output))


def _engine(checkpoint: Checkpoint, weights: str, ctx: int, device: str):
    from jisu.config import exact_cache
    from jisu.llm import LLM

    window = max(ctx, 256)
    cache = exact_cache([window])
    return LLM(checkpoint=checkpoint, device=device, weights=weights, max_model_len=window, max_num_seqs=1,
               max_num_batched_tokens=max(window, 1024), block_size=cache.block_size, num_kv_blocks=cache.num_blocks,
               enable_prefix_caching=cache.enable_prefix_caching)


def decode_speed(llm, tokens: int = 128, runs: int = 3) -> float:
    from jisu.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([DECODE_PROMPT], params)  # warm-up: kernels, caches
    rates = [llm.generate([DECODE_PROMPT], params)[0].metrics.decode_tokens_per_s for _ in range(runs)]
    return statistics.median(r for r in rates if r is not None)


def evaluation_table(
    teacher: Checkpoint,
    students: list[tuple[str, Checkpoint]],
    text: str,
    ctx: int = 512,
    chunks: int = 20,
    weights: str = "float32",
    device: str = "cpu",
    decode_tokens: int = 128,
    decode_runs: int = 3,
    say: Callable[[str], None] | None = None,
) -> list[EvalRow]:
    """Rows for the teacher and each (label, student checkpoint), in that order. One engine lives at a time
    beside the teacher's, so memory stays at two models."""
    from jisu.eval.kl import kl_divergence

    say = say or (lambda msg: None)
    say(f"evaluating the teacher ({weights})")
    ref = _engine(teacher, weights, ctx, device)
    rows = []
    first = None
    for label, ckpt in students:
        say(f"evaluating {label} ({weights}, {chunks} chunks of {ctx} tokens)")
        llm = _engine(ckpt, weights, ctx, device)
        r = kl_divergence(llm.engine, ref.engine, text, ctx, chunks)
        if first is None:
            first = r
            rows.append(EvalRow("teacher", parameters(teacher), r.reference_ppl, r.reference_ppl_stderr, 0.0, 1.0,
                                decode_speed(ref, decode_tokens, decode_runs)))
        rows.append(EvalRow(label, parameters(ckpt), r.ppl, r.ppl_stderr, r.kl_mean, r.top1_agreement,
                            decode_speed(llm, decode_tokens, decode_runs)))
        del llm
    return rows


def format_table(rows: list[EvalRow], chunks: int, ctx: int, weights: str, source: str) -> str:
    head = ("| model | parameters | PPL (held-out) | KL vs teacher | top-1 agreement | decode tok/s |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.label} | {r.parameters / 1e6:.1f} M | {r.ppl:.2f} ± {r.ppl_stderr:.2f} | "
                     f"{r.kl_mean:.4f} | {100 * r.top1_agreement:.2f}% | {r.decode_tokens_per_s:.1f} |")
    lines.append(f"\n{chunks} chunks of {ctx} tokens of {source} (second halves scored, as llama-perplexity), "
                 f"none of them trained on; every row run by jisu with --weights {weights}, decode = median of "
                 "greedy batch-1 runs.")
    return "\n".join(lines)
