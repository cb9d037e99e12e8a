"""Greedy-continuation agreement: does a run write the same tokens as its reference for each prompt?

Both runs decode greedily (temperature 0) from the same prompts. Per prompt we take the common prefix of
the two continuations; `prefix_agreement` is its mean share of the longer continuation (the fraction of
tokens that match up to the first divergence) and `full_match_rate` the share of identical continuations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jisu.errors import InvalidRequestError
from jisu.sampling_params import SamplingParams

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "prompts.txt"
# Used when no prompt file is given: short, varied openings (facts, code, lists, prose), one a line. A file rather
# than code: calibration reads them too (jisu/quant/calibration.py), and nothing below the engine imports eval.
DEFAULT_PROMPTS = tuple(line for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line)


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a JSONL file: one JSON string or object with a "prompt" field per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"prompt file not found: {p}")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{p}:{n} is not valid JSON: {e.msg}") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError(f"{p}:{n} must be a non-empty string or an object with a \"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise InvalidRequestError(f"prompt file {p} holds no prompts")
    return prompts


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class GreedyResult:
    prefix_agreement: float
    full_match_rate: float
    prompts: int
    max_tokens: int
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def greedy_agreement(
    llm, reference, prompts: list[str], max_tokens: int = 64, progress: Callable[[int, int], None] | None = None
) -> GreedyResult:
    """Runs `prompts` greedily on `llm` and `reference` (jisu.LLM objects) and compares the continuations."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be an integer >= 1, got {max_tokens!r}")
    if not prompts:
        raise InvalidRequestError("no prompts to compare")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    ref_out = reference.generate(prompts, params)
    if progress:
        progress(1, 2)
    test_out = llm.generate(prompts, params)
    if progress:
        progress(2, 2)
    rows, shares, full = [], [], 0
    for prompt, r, t in zip(prompts, ref_out, test_out):
        a, b = r.outputs[0].token_ids, t.outputs[0].token_ids
        same = common_prefix(a, b)
        longest = max(len(a), len(b))
        shares.append(same / longest if longest else 1.0)
        full += a == b
        rows.append({"prompt": prompt, "matching_prefix": same, "reference_tokens": len(a), "tokens": len(b)})
    return GreedyResult(sum(shares) / len(shares), full / len(prompts), len(prompts), max_tokens, rows)
