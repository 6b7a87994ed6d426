"""Where `Pool.map` keeps its results: owned arrays carved from blocks of memory that are
populated at once and used again once their arrays are gone.

A result kept is fresh memory, and each 4 KiB page of fresh memory costs the kernel a page to
find and clear the first time it is written: about 60 of them for a 250 KB output, as much
as the rest of the request costs this process. `Pool.map` keeps every result of a call, so it
copies them into a pool's blocks instead. A block whose arrays are all gone goes back to the
pool, populated, for the next call (up to `KEPT` of them; the others are unmapped). `run()`
copies into arrays of their own, so that an output kept alone never keeps a block alive.

>>> arena = Arena(Blocks())
>>> arena.copy(np.arange(3, dtype=np.float32)).tolist()
[0.0, 1.0, 2.0]
"""

from __future__ import annotations

import mmap
import queue
import weakref
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BLOCK_BYTES", "KEPT", "Arena", "Blocks"]

Array = NDArray[Any]

BLOCK_BYTES = 4 << 20  # an array larger than this gets memory of its own
KEPT = 8  # blocks a pool keeps for reuse once their arrays are gone (32 MiB)
_ALIGN = 64
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _mapped(size: int) -> mmap.mmap:
    """`size` bytes of private memory, populated at once where the platform can."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)


class Blocks:
    """A pool's blocks: taken by arenas, given back when no array carved from one is left."""

    __slots__ = ("_free", "_keep")

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()  # put is safe in a GC
        self._keep = KEPT

    def take(self) -> Array:
        """A block of BLOCK_BYTES (one given back if any)."""
        try:
            memory = self._free.get_nowait()
        except queue.Empty:
            memory = _mapped(BLOCK_BYTES)
        block = np.frombuffer(memory, np.uint8)
        weakref.finalize(block, self._give_back, memory)
        return block

    def _give_back(self, memory: mmap.mmap) -> None:
        if self._free.qsize() < self._keep:
            self._free.put(memory)

    def clear(self) -> None:
        """Unmap the blocks kept for reuse, and keep none from now on (a closed pool's: those
        in use are unmapped when their arrays go)."""
        self._keep = 0
        while not self._free.empty():
            self._free.get_nowait()


class Arena:
    """Owned copies of arrays, carved one after another from a pool's blocks."""

    __slots__ = ("_block", "_blocks", "_used")

    def __init__(self, blocks: Blocks) -> None:
        self._blocks = blocks
        self._block: Array | None = None
        self._used = 0

    def copy(self, array: Array) -> Array:
        """A writable copy of `array` (C order), carved from a block unless it is larger."""
        nbytes = array.nbytes
        if nbytes > BLOCK_BYTES:
            return array.copy()
        start = -(-self._used // _ALIGN) * _ALIGN
        if self._block is None or start + nbytes > BLOCK_BYTES:
            self._block, start = self._blocks.take(), 0
        out: Array = self._block[start : start + nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(out, array, "no")
        self._used = start + nbytes
        return out
