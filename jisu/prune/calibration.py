"""Activation statistics for structured pruning, gathered by running calibration prompts through jisu's engine.

Forward hooks on the engine's own modules record, per layer and over every calibration token (prompt tokens
and the tokens the model then generates greedily):

- ffn_sq[l][j]: mean of a_j^2, where a = silu(gate x) * up x is the FFN's intermediate activation. Removing
  channel j changes the layer's output by a_j * down[:, j], whose mean squared norm is
  ffn_sq[l][j] * ||down[:, j]||^2.
- head_sq[l][g]: mean of ||sum_{h in group g} W_o[:, h] o_h||^2, the squared norm of what the query heads of
  kv group g add to the residual stream (o_h: head h's attention output). Removing the kv head removes exactly
  that term from the layer's attention output.
- input_sq[matrix][j]: mean of x_j^2 over the inputs of every linear matrix (the norms' outputs for q/k/v,
  gate/up and lm_head, the attention output for o_proj, a for down_proj), for activation-aware unstructured
  pruning (score |w_ij| * sqrt(input_sq[j]), Wanda's criterion). They and ffn_sq come from the collector
  quantization's calibration uses too (jisu/quant/calibration.py's LinearInputs), summed in float64 here; lm_head's
  from the final norm's output (the output layer itself only sees the rows that are sampled).
- layer_angular[l]: mean of 1 - cos(x_in, x_out) of the hidden state entering and leaving layer l (ShortGPT's
  "block influence"): a layer that barely turns the residual stream is the cheapest to drop.

The hooks see the engine's flattened [tokens, features] rows, so batching and chunked prefill change nothing;
heads and FFN channels keep their checkpoint order inside the engine (only rows within a q/k head are
re-ordered for rotary), so index j here is row j of the HF-layout tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from jisu.errors import InvalidRequestError
from jisu.loader.checkpoint import Checkpoint

DEFAULT_NEW_TOKENS = 32
"""Greedy tokens generated after each calibration prompt (their activations count too)."""
DEFAULT_MAX_TOKENS = 8192
"""Cap on prompt tokens taken from a calibration text file."""
_CHUNK = 256


@dataclass
class ActivationStats:
    tokens: int
    """Token rows that passed through every layer."""
    ffn_sq: list[torch.Tensor]
    """Per layer [intermediate_size]: mean a_j^2."""
    head_sq: list[torch.Tensor]
    """Per layer [num_key_value_heads]: mean squared norm of the kv group's contribution to o_proj's output."""
    input_sq: dict[str, torch.Tensor]
    """Linear weight name -> [in_features]: mean x_j^2 of the matrix's input (for activation-aware
    unstructured / N:M pruning: score |w_ij| * sqrt(input_sq[j]), as Wanda does)."""
    layer_angular: torch.Tensor
    """[num_hidden_layers]: mean 1 - cos(input, output) of each layer."""
    source: str
    """Where the calibration text came from, for reports."""


def calibration_prompts(
    checkpoint: Checkpoint, source: str | os.PathLike[str] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> tuple[list[list[int]], str]:
    """Token-id prompts and a description of where they came from.

    None: jisu's built-in benchmark prompt set (chats rendered with the model's chat template). A .jsonl file:
    the same format as `jisu bench --dataset`. Any other file: plain UTF-8 text cut into 256-token pieces,
    at most `max_tokens` tokens in all.
    """
    from jisu.bench.prompts import BUILTIN_DATASET, load_jsonl
    from jisu.tokenizer import Tokenizer

    tok = Tokenizer(checkpoint.tokenizer)
    path = Path(source) if source is not None else BUILTIN_DATASET
    if source is None or path.suffix.lower() == ".jsonl":
        prompts = []
        for p in load_jsonl(path, "--calibration"):
            if p.messages is not None:
                if tok.has_chat_template:
                    prompts.append(tok.encode_chat(p.messages))
                else:
                    prompts.append(tok.encode("\n".join(str(m.get("content") or "") for m in p.messages)))
            else:
                prompts.append(tok.encode(p.text))
        return [p for p in prompts if p], "built-in prompt set" if source is None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"--calibration {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"--calibration {path}: cannot be read as UTF-8 text ({e})") from None
    ids = tok.encode(text, add_special_tokens=False)[:max_tokens]
    if not ids:
        raise InvalidRequestError(f"--calibration {path}: the file holds no text")
    bos = [tok.bos_token_id] if checkpoint.tokenizer.add_bos_token and tok.bos_token_id is not None else []
    return [bos + ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)], str(path)


def collect_stats(
    checkpoint: Checkpoint,
    source: str | os.PathLike[str] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ActivationStats:
    """Runs the calibration prompts through the engine (greedy, `new_tokens` each) and returns the statistics."""
    from jisu.config import exact_cache
    from jisu.llm import LLM
    from jisu.quant.calibration import LinearInputs
    from jisu.sampling_params import SamplingParams

    prompts, where = calibration_prompts(checkpoint, source, max_tokens)
    config = checkpoint.config
    window = min(max(len(p) for p in prompts) + new_tokens + 1, config.max_context)
    prompts = [p[: window - new_tokens - 1] or p[:1] for p in prompts]
    seqs = min(16, len(prompts))
    cache = exact_cache([window] * seqs)
    llm = LLM(
        checkpoint=checkpoint, max_model_len=window, max_num_seqs=seqs, max_num_batched_tokens=max(window, 2048),
        block_size=cache.block_size, num_kv_blocks=cache.num_blocks, enable_prefix_caching=cache.enable_prefix_caching,
    )
    model = llm.engine.model
    n_layers, kv = config.num_hidden_layers, config.num_key_value_heads
    group, d = config.num_attention_heads // kv, config.head_dim
    sums: dict[str, list] = {"head": [None] * n_layers, "final_in": [None]}
    sums |= {"angle": [0.0] * n_layers, "rows": [0] * n_layers}
    handles = []

    def add(kind: str, layer: int, value: torch.Tensor) -> None:
        value = value.double()
        sums[kind][layer] = value if sums[kind][layer] is None else sums[kind][layer] + value

    for n, layer in enumerate(model.model.layers):
        w_o = checkpoint.tensors[f"model.layers.{n}.self_attn.o_proj.weight"].float()
        w_o = w_o.reshape(config.hidden_size, kv, group, d)

        def on_layer(module, args, output, n=n):
            x_in, x_out = args[0].float(), output.float()
            sums["angle"][n] += float((1 - F.cosine_similarity(x_in, x_out, dim=-1)).double().sum())
            sums["rows"][n] += x_in.shape[0]

        def on_o_proj(module, args, n=n, w_o=w_o):
            a = args[0].float()
            a = a.reshape(a.shape[0], kv, group, d)
            total = torch.zeros(kv, dtype=torch.float64)
            for rows in a.split(256):
                delta = torch.einsum("tkgd,nkgd->tkn", rows, w_o)
                total += delta.pow(2).sum(-1).sum(0).double()
            add("head", n, total)

        handles.append(layer.register_forward_hook(on_layer))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj))

    def on_final_norm(module, args, output):
        add("final_in", 0, output.float().pow(2).sum(0))

    handles.append(model.model.norm.register_forward_hook(on_final_norm))
    try:
        params = SamplingParams(temperature=0, max_tokens=new_tokens + 1)
        with LinearInputs(model, sums_dtype=torch.float64) as linear:
            outputs = llm.generate(prompts, params)
    finally:
        for h in handles:
            h.remove()
    rows = sums["rows"][0]
    # Every prompt token and every generated token but the last passed through the layers (a preempted
    # sequence recomputes, so more is fine); fewer means some step bypassed the hooked modules.
    expected = sum(len(p) + len(o.outputs[0].token_ids) - 1 for p, o in zip(prompts, outputs))
    if rows < expected or any(r != rows for r in sums["rows"]):
        raise RuntimeError(f"calibration hooks saw {rows} of {expected} token rows; the engine ran layers "
                           "outside the modules the hooks are on")
    mean = {k: [(v / rows).float() for v in sums[k]] for k in ("head", "final_in")}
    inputs = {"lm_head.weight": mean["final_in"][0]} | linear.by_weight()
    return ActivationStats(
        tokens=rows,
        ffn_sq=[inputs[f"model.layers.{n}.mlp.down_proj.weight"] for n in range(n_layers)],
        head_sq=mean["head"],
        input_sq=inputs,
        layer_angular=torch.tensor([a / r for a, r in zip(sums["angle"], sums["rows"])], dtype=torch.float32),
        source=where,
    )


def ensure_stats(
    checkpoint: Checkpoint,
    stats: ActivationStats | None,
    source: str | os.PathLike[str] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
) -> ActivationStats:
    """`stats` if given (checked to fit the checkpoint), else a fresh calibration run."""
    from jisu.prune.common import PruneError

    if stats is None:
        stats = collect_stats(checkpoint, source, new_tokens)
    c = checkpoint.config
    if (len(stats.ffn_sq) != c.num_hidden_layers or stats.ffn_sq[0].shape != (c.intermediate_size,)
            or stats.head_sq[0].shape != (c.num_key_value_heads,)):
        raise PruneError("the activation statistics were gathered on a model of another shape; gather them on "
                         "the checkpoint being pruned")
    return stats
