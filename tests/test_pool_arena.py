"""Where `Pool.map` keeps its results (guard/pool/arena.py): exact owned copies, carved from
blocks that come back for reuse once their arrays are gone, a bounded number of them."""

from __future__ import annotations

import gc
import resource
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.pool.arena import BLOCK_BYTES, KEPT, Arena, Blocks

Array = np.ndarray[Any, Any]

DTYPES = st.sampled_from([np.float32, np.float64, np.int8, np.int32, np.int64, np.bool_])


def address(array: Array) -> int:
    return int(array.__array_interface__["data"][0])


@given(st.lists(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_side=40)), max_size=8))
def test_copies_are_exact_aligned_writable_and_apart(arrays: list[Array]) -> None:
    """Every copy has its array's dtype, shape and values, starts on a 64-byte boundary, is
    writable, and shares memory with neither its source nor another copy."""
    arena = Arena(Blocks())
    copies = [arena.copy(a) for a in arrays]
    for array, copy in zip(arrays, copies, strict=True):
        assert copy.dtype == array.dtype and copy.shape == array.shape
        np.testing.assert_array_equal(copy, array)
        assert copy.flags.writeable and copy.flags.c_contiguous
        assert address(copy) % 64 == 0 or copy.nbytes == 0
        assert not np.shares_memory(copy, array)
    for i, a in enumerate(copies):
        assert not any(np.shares_memory(a, b) for b in copies[i + 1 :])


def test_a_strided_view_is_copied_in_c_order() -> None:
    """A transposed view comes out as a C-ordered copy of its values."""
    source = np.arange(12, dtype=np.float32).reshape(3, 4).T
    copy = Arena(Blocks()).copy(source)
    np.testing.assert_array_equal(copy, source)
    assert copy.flags.c_contiguous


def test_an_array_larger_than_a_block_gets_memory_of_its_own() -> None:
    """An array over BLOCK_BYTES is copied whole into memory of its own, not a block."""
    blocks = Blocks()
    big = np.ones(BLOCK_BYTES // 4 + 1, np.float32)
    copy = Arena(blocks).copy(big)
    np.testing.assert_array_equal(copy, big)
    assert copy.flags.owndata


def test_copies_fill_a_block_before_the_next() -> None:
    """Copies that fit follow one another in one block; the first that does not starts a new
    one."""
    arena = Arena(Blocks())
    quarter = np.zeros(BLOCK_BYTES // 4, np.uint8)
    copies = [arena.copy(quarter) for _ in range(5)]
    starts = [address(c) for c in copies]
    assert starts[1:4] == [starts[0] + k * quarter.nbytes for k in (1, 2, 3)]
    assert not starts[0] <= starts[4] < starts[0] + BLOCK_BYTES


def test_a_block_comes_back_once_its_arrays_are_gone() -> None:
    """While one array of a block lives, its memory is not handed out again; once none does,
    the next arena gets that block."""
    blocks = Blocks()
    first = Arena(blocks).copy(np.ones(10, np.float32))
    start = address(first)
    other = Arena(blocks).copy(np.ones(10, np.float32))
    assert address(other) != start
    del first
    gc.collect()
    again = Arena(blocks).copy(np.full(10, 7, np.float32))
    assert address(again) == start
    np.testing.assert_array_equal(again, 7)


PAGES = BLOCK_BYTES // 2 // 4096  # pages of half a block


def fill_half_a_block(blocks: Blocks) -> tuple[int, Array]:
    """Copy half a block's worth into a new arena of `blocks`: the minor page faults it took
    (about one per page for fresh memory, none for a block given back), and the copy."""
    half = np.ones(BLOCK_BYTES // 2, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    copy = Arena(blocks).copy(half)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, copy


@pytest.mark.parametrize("freed", [KEPT - 2, KEPT + 3])
def test_at_most_kept_blocks_come_back(freed: int) -> None:
    """Of `freed` blocks whose arrays are gone, at most KEPT come back with their pages in
    place; the others are fresh memory."""
    blocks = Blocks()
    held = [fill_half_a_block(blocks)[1] for _ in range(freed)]
    del held
    gc.collect()
    again = [fill_half_a_block(blocks) for _ in range(freed)]
    reused = sum(faults < PAGES // 8 for faults, _ in again)
    assert reused == min(freed, KEPT), [faults for faults, _ in again]


@pytest.mark.parametrize("cleared", [False, True])
def test_clear_lets_the_kept_blocks_go(cleared: bool) -> None:
    """A block given back is reused with its pages in place; after clear() the next block is
    fresh memory."""
    blocks = Blocks()
    fill_half_a_block(blocks)  # taken, and given back once its copy is gone
    gc.collect()
    if cleared:
        blocks.clear()
    faults, _ = fill_half_a_block(blocks)
    assert (faults > PAGES // 2) if cleared else (faults < PAGES // 8), faults


def test_a_block_given_back_after_clear_is_not_kept() -> None:
    """clear() is a closing pool's: a block whose arrays go after it is unmapped, not kept
    (up to 32 MiB for as long as the pool object lives)."""
    blocks = Blocks()
    _, copy = fill_half_a_block(blocks)  # still held while its pool closes
    blocks.clear()
    del copy
    gc.collect()
    faults, _ = fill_half_a_block(blocks)
    assert faults > PAGES // 2, faults
