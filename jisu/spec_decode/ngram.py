"""Prompt lookup (n-gram) drafts: the tokens that followed an earlier occurrence of the sequence's last n tokens.

No model runs: the proposal is a search over the sequence's own tokens, so it is deterministic and its
"probabilities" are one-hot (the rejection sampler accepts a draft token d with probability p(d)).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_propose(tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the latest earlier occurrence of the longest suffix n-gram (max_n down to min_n)
    that has one; [] when none occurs. The latest occurrence: in text that quotes its prompt or repeats itself,
    the most recent context is the likeliest to continue the same way."""
    arr = np.asarray(tokens, dtype=np.int64)
    total = arr.shape[0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = arr[total - n:]
        # Candidate starts 0 .. total - n - 1: the suffix itself (at total - n) does not count.
        windows = sliding_window_view(arr[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []
