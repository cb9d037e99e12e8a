"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence owns, and which full
blocks hold a known token prefix so later sequences can reuse them (prefix caching).

Plain Python, no tensors: the runner turns block tables into cache slot indices.

NOTE: a full block is named by a hash chained over every token from the start of the sequence up to the
end of that block, so equal hashes mean equal K/V (same tokens at the same positions). A freed block keeps
its hash and its contents until the free queue hands it out again: free blocks are evicted least recently
freed first, and a sequence's tail is freed before its head, so shared prefixes are evicted last.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from array import array


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order (oldest first); an OrderedDict so a cache hit can take one out in O(1).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        """Hash of a full block's token prefix -> the block holding its K/V."""
        self._seq_hashes: dict[str, list[bytes]] = {}
        self.prefix_cache_queries = 0
        """Prompt tokens looked up in the prefix cache (cumulative), as vLLM counts them."""
        self.prefix_cache_hits = 0
        """Of those, tokens whose K/V were found."""

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so that `seq_id` can hold `num_tokens` tokens in total."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    # ---- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, seq_id: str, token_ids: list[int]) -> int:
        """Gives a sequence without blocks the cached blocks of its longest known prefix; returns how many
        tokens they cover. At least one token is always left to compute, so the step has logits to sample."""
        assert not self.block_tables.get(seq_id), "match_prefix is for sequences that hold no blocks"
        if not self.enable_prefix_caching:
            return 0
        usable = (len(token_ids) - 1) // self.block_size
        table: list[int] = []
        hashes: list[bytes] = []
        parent = b""
        for i in range(usable):
            h = self._hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            table.append(block)
            hashes.append(h)
            parent = h
        for block in table:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        hit = len(table) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += hit
        if table:
            self.block_tables[seq_id] = table
            self._seq_hashes[seq_id] = hashes
        return hit

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Publishes the sequence's blocks that are full of computed tokens, for later sequences to reuse."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(seq_id, [])
        hashes = self._seq_hashes.setdefault(seq_id, [])
        full = min(num_computed // self.block_size, len(table))
        while len(hashes) < full:
            i = len(hashes)
            h = self._hash(hashes[-1] if hashes else b"", token_ids[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(h)
            block = table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use keep their contents, but are no longer shared)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        self._seq_hashes = {k: [] for k in self._seq_hashes}

    @staticmethod
    def _hash(parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()

    # ---- allocation -----------------------------------------------------------------------------

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grows the sequence's table to hold `num_tokens` tokens. All or nothing: False if blocks ran out."""
        need = self.num_new_blocks(seq_id, num_tokens)
        if need > self.num_free_blocks:
            return False
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None

    def free(self, seq_id: str) -> None:
        """Returns the sequence's blocks to the pool (those no other sequence still references)."""
        self._seq_hashes.pop(seq_id, None)
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None

    def table(self, seq_id: str) -> list[int]:
        return self.block_tables.get(seq_id, [])
