"""Training text for distillation: token sequences of a fixed length, and which tokens are held out.

The text is tokenized as jisu eval tokenizes it (no BOS, no special tokens), so when the user trains and
evaluates on the same file the held-out part is exactly the tokens the evaluation scores: the first
`holdout_tokens` of that tokenization are never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from jisu.errors import InvalidRequestError

BUILTIN_TEXT = Path(__file__).resolve().parents[1] / "quant" / "data" / "calibration.txt"
"""jisu's built-in calibration text: passages sampled from the default model (no evaluation text in it)."""


@dataclass
class TrainingText:
    sequences: list[list[int]]
    source: str
    tokens_available: int
    """Tokens of the text after the held-out part."""
    holdout_tokens: int
    fingerprint: str
    """Hash of the sequences, so a resumed run can check it trains on the same data."""


def read_training_text(path: str | Path | None) -> tuple[str, str]:
    """(text, description); None is the built-in text."""
    p = BUILTIN_TEXT if path is None else Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"--text {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"--text {p}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise InvalidRequestError(f"--text {p}: the file holds no text")
    return text, "built-in sampled text (jisu/quant/data/calibration.txt)" if path is None else str(p)


def training_text(tokenizer, path: str | Path | None, seq_len: int, holdout_tokens: int = 0) -> TrainingText:
    """The text cut into non-overlapping sequences of `seq_len` tokens after skipping `holdout_tokens`."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 8:
        raise InvalidRequestError(f"--seq-len must be an integer >= 8, got {seq_len!r}")
    text, source = read_training_text(path)
    ids = tokenizer.encode(text, add_special_tokens=False)[holdout_tokens:]
    n = len(ids) // seq_len
    if n == 0:
        what = f" after the {holdout_tokens} held-out evaluation tokens" if holdout_tokens else ""
        raise InvalidRequestError(f"--text {source}: {len(ids)} tokens{what}, fewer than one --seq-len "
                                  f"{seq_len} sequence; give a longer text or a shorter --seq-len")
    sequences = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    digest = hashlib.sha1(repr(sequences).encode()).hexdigest()[:16]
    return TrainingText(sequences, source, len(ids), holdout_tokens, digest)
