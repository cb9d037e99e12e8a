"""Quality instruments: perplexity (llama.cpp's method), KL divergence / top-1 agreement and greedy
agreement against a reference run, all computed through jisu's own engine path.

The weight-format registry lives here, free of torch, so `jisu --help` stays fast; the instruments
themselves are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from jisu.errors import InvalidRequestError

# --weights name -> loader(model, max_model_len, num_seqs, device) -> jisu.LLM.
WEIGHT_FORMATS: dict[str, Callable[..., object]] = {}


def register_weight_format(name: str, loader: Callable[..., object]) -> None:
    """Adds a format for --weights: loader(model, max_model_len, num_seqs, device) -> jisu.LLM."""
    WEIGHT_FORMATS[name] = loader


def check_weights(name: str) -> str:
    """`name` if it is a registered format or one the engine parses (int8-g32-o4, ...; jisu/quant/plan.py)."""
    if name not in WEIGHT_FORMATS:
        from jisu.quant.plan import parse_weights

        try:
            parse_weights(name)
        except InvalidRequestError:
            raise InvalidRequestError(
                f"--weights {name!r} is not a known weight format; allowed: {', '.join(WEIGHT_FORMATS)} "
                f"(int8/int4 also with -gN, a group size, and int8 with -oN, outlier columns: e.g. int8-o0)"
            ) from None
        register_weight_format(name, _engine_loader(name))
    return name


def open_llm(model: str | None, weights: str, max_model_len: int, num_seqs: int = 1, device: str = "cpu"):
    """Loads `model` in weight format `weights`, with a KV cache sized for `num_seqs` sequences of
    `max_model_len` tokens (evaluation needs no more)."""
    check_weights(weights)
    return WEIGHT_FORMATS[weights](model, max_model_len, num_seqs, device)


def _engine_loader(weights: str) -> Callable[..., object]:
    def load(model: str | None, max_model_len: int, num_seqs: int, device: str = "cpu"):
        from jisu.config import exact_cache
        from jisu.llm import LLM

        cache = exact_cache([max_model_len] * num_seqs)
        return LLM(
            model=model, device=device, weights=weights, max_model_len=max_model_len, max_num_seqs=num_seqs,
            max_num_batched_tokens=max(max_model_len, 1024), block_size=cache.block_size,
            num_kv_blocks=cache.num_blocks, enable_prefix_caching=cache.enable_prefix_caching,
        )

    return load


# Every --weights format the engine loads (see jisu/quant/plan.py): auto keeps a GGUF's Q4_1/Q8_0 blocks.
for _name in ("auto", "float32", "float16", "bfloat16", "int8", "int8-g32", "int4", "int4-g64", "int4-g128"):
    register_weight_format(_name, _engine_loader(_name))

_LAZY = {
    "GreedyResult": "greedy", "greedy_agreement": "greedy", "load_prompts": "greedy",
    "KLResult": "kl", "kl_divergence": "kl",
    "PerplexityResult": "perplexity", "make_chunks": "perplexity", "perplexity_of": "perplexity",
    "score_batch": "scoring", "score_chunks": "scoring",
}


def __getattr__(name: str):
    # The function perplexity() shares its module's name, so the package exports it as perplexity_of.
    if name in _LAZY:
        module = importlib.import_module(f"jisu.eval.{_LAZY[name]}")
        return getattr(module, "perplexity" if name == "perplexity_of" else name)
    raise AttributeError(f"module 'jisu.eval' has no attribute {name!r}")


__all__ = [
    "WEIGHT_FORMATS", "GreedyResult", "KLResult", "PerplexityResult", "check_weights", "greedy_agreement",
    "kl_divergence", "load_prompts", "make_chunks", "open_llm", "perplexity_of", "register_weight_format",
    "score_batch", "score_chunks",
]
