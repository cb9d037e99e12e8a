import pytest

from jisu.scheduler.blocks import BlockManager


def test_allocate_grows_table_by_whole_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 1)
    assert len(bm.table("a")) == 1
    assert bm.allocate("a", 4)  # still fits the first block
    assert len(bm.table("a")) == 1
    assert bm.allocate("a", 9)
    assert len(bm.table("a")) == 3
    assert bm.num_free_blocks == 5


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.allocate("a", 4)
    assert not bm.allocate("b", 3)  # needs 2 blocks, 1 free
    assert bm.table("b") == []
    assert bm.num_free_blocks == 1


def test_free_returns_blocks_and_tables_never_share():
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.allocate("a", 5)
    bm.allocate("b", 6)
    assert set(bm.table("a")).isdisjoint(bm.table("b"))
    bm.free("a")
    assert bm.num_free_blocks == 3
    assert bm.table("a") == []
    bm.free("b")
    assert bm.num_free_blocks == 6
    assert all(c == 0 for c in bm.ref_counts)
    bm.free("never-allocated")  # harmless


def test_usage_and_bad_sizes():
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate("a", 32)
    assert bm.usage == pytest.approx(0.5)
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_prefix_hit_needs_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10, 22))  # 12 tokens, 3 full blocks
    assert bm.match_prefix("a", tokens) == 0
    bm.allocate("a", 12)
    bm.cache_full_blocks("a", tokens, 12)
    # Same 12 tokens: only 2 blocks may be reused, so one token is left to compute for logits.
    assert bm.match_prefix("b", tokens) == 8
    assert bm.table("b") == bm.table("a")[:2]
    # A different second block stops the chain after the first.
    other = tokens[:4] + [0] * 4 + tokens[8:] + [1]
    assert bm.match_prefix("c", other) == 4
    assert bm.ref_counts[bm.table("a")[0]] == 3


def test_freed_cached_blocks_are_reused_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate("a", 5)
    bm.cache_full_blocks("a", tokens, 5)
    bm.free("a")
    assert bm.num_free_blocks == 4
    assert bm.match_prefix("b", tokens) == 4  # both full blocks still hold their K/V
    assert bm.num_free_blocks == 2
    bm.free("b")
    bm.allocate("filler", 8)  # takes every block: cached contents are evicted
    bm.free("filler")
    assert bm.match_prefix("c", tokens) == 0
    assert not bm.cached


def test_prefix_caching_can_be_turned_off():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")
    assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 0


def test_reset_prefix_cache_forgets_every_prefix():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 0
    assert bm.num_free_blocks == 4
