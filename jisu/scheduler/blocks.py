"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence owns.

Plain Python, no tensors: the runner turns block tables into cache slot indices. Blocks carry reference
counts so that a block can later be shared between sequences (prefix caching) without changing callers.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so that `seq_id` can hold `num_tokens` tokens in total."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grows the sequence's table to hold `num_tokens` tokens. All or nothing: False if blocks ran out."""
        need = self.num_new_blocks(seq_id, num_tokens)
        if need > self.num_free_blocks:
            return False
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def free(self, seq_id: str) -> None:
        """Returns the sequence's blocks to the pool (those no other sequence still references)."""
        # Freed in reverse so the sequence's tail, the least likely to be shared, is reused first.
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def table(self, seq_id: str) -> list[int]:
        return self.block_tables.get(seq_id, [])
