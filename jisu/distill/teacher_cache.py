"""The teacher's top-k next-token log-probabilities, computed once per (teacher, text, k, temperature) and kept
on disk, so later epochs and other students of the same teacher skip the teacher's forward pass.

Full distributions would take vocab x 4 bytes a token (~200 KB for a 49k vocabulary); the top k (64 by default)
hold nearly all of a small model's probability mass in 6 bytes each. Entries are filled lazily, a sequence at a
time, as training first meets it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jisu.errors import InvalidRequestError


class TeacherCache:
    def __init__(self, directory: str | Path, key: dict, sequences: int, seq_len: int, k: int, temperature: float):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4096:
            raise InvalidRequestError(f"--teacher-top-k is {k!r}; allowed: an integer from 1 to 4096")
        self.k, self.temperature = k, temperature
        name = hashlib.sha1(json.dumps({**key, "k": k, "t": temperature, "n": sequences, "len": seq_len},
                                       sort_keys=True).encode()).hexdigest()[:20]
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidRequestError(f"--teacher-cache {directory}: cannot create the folder ({e.strerror})") from None
        shapes = {"ids": ((sequences, seq_len, k), np.int32), "logp": ((sequences, seq_len, k), np.float16),
                  "filled": ((sequences,), np.uint8)}
        self.arrays = {part: self._open(self.directory / f"{name}.{part}.npy", shape, dtype)
                       for part, (shape, dtype) in shapes.items()}
        self.hits = self.misses = 0
        self.name = name

    @staticmethod
    def _open(path: Path, shape, dtype):
        if path.is_file():
            try:
                arr = np.lib.format.open_memmap(path, mode="r+")
                if arr.shape == shape and arr.dtype == dtype:
                    return arr
            except (ValueError, OSError):
                pass  # unreadable or another shape: written by something else; start it again
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def get(self, indices: list[int], ids: torch.Tensor, teacher, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(top ids [B, T, k], their log-probabilities [B, T, k]) of the sequences `indices` (token ids `ids`)."""
        filled = self.arrays["filled"]
        missing = [j for j, i in enumerate(indices) if not filled[i]]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                logits = teacher(ids[missing])
                logp = F.log_softmax(logits.float() / self.temperature, dim=-1)
                top = logp.topk(self.k, dim=-1)
            for row, j in enumerate(missing):
                i = indices[j]
                self.arrays["ids"][i] = top.indices[row].cpu().numpy().astype(np.int32)
                self.arrays["logp"][i] = top.values[row].cpu().numpy().astype(np.float16)
            for part in ("ids", "logp"):
                self.arrays[part].flush()
            for j in missing:  # marked filled only after the data is on disk
                filled[indices[j]] = 1
            filled.flush()
        top_ids = torch.from_numpy(np.ascontiguousarray(self.arrays["ids"][indices])).to(device)
        top_logp = torch.from_numpy(np.ascontiguousarray(self.arrays["logp"][indices])).to(device)
        return top_ids, top_logp

    def describe(self) -> dict:
        return {"dir": str(self.directory), "entry": self.name, "top_k": self.k, "hits": self.hits,
                "misses": self.misses}
