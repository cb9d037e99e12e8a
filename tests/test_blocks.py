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
