"""Shared-memory lanes: where a pool's requests and replies keep their arrays.

A lane is one anonymous shared-memory file (a memfd; an unlinked temporary file where there is
none) that the parent and one worker both map. Nothing names it, so nothing can leak it: its
memory goes with the last process that maps it, whichever dies first, and /dev/shm never
lists it. A worker has `DEPTH` lanes, so that its next request waits in one while it serves
another. The pipe carries only where the arrays lie (`Layout`) and the lane's size.

Whoever holds a lane writes it and may grow it: the parent from a reply to its next request,
the worker from a request to its reply. The other side maps the new size when a message says
so (`follow`). A lane never shrinks; the memory it holds is what its largest call touched.

>>> lane = Lane.create(1 << 16)
>>> layout = lane.put([("x", np.arange(4, dtype=np.float32))])
>>> lane.get(layout, copy=True)["x"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["ALIGN", "DEPTH", "MIN_BYTES", "Lane", "Layout", "lane_bytes"]

Array = NDArray[Any]
Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]
"""Where each array lies in a lane: (name, dtype string, shape, byte offset)."""

DEPTH = 2  # lanes per worker: the request it serves and the next one
ALIGN = 64  # every array starts on a cache line
MIN_BYTES = 1 << 16
_SHM = "/dev/shm"


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def lane_bytes(needed: int) -> int:
    """The size a lane gets to hold `needed` bytes: a power of two, at least MIN_BYTES."""
    return max(MIN_BYTES, 1 << max(0, needed - 1).bit_length())


def _anonymous() -> int:
    """A new file descriptor of anonymous shared memory (no name anywhere)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("mnn-guard-lane", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile(dir=_SHM if os.path.isdir(_SHM) else None) as f:
        return os.dup(f.fileno())  # the file was unlinked at creation


class Lane:
    """One shared-memory segment of a worker's pipeline, mapped here."""

    __slots__ = ("__weakref__", "end", "fd", "mm", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.mm = mmap.mmap(fd, size)
        self.end = 0  # the first byte after the arrays last placed or read
        weakref.finalize(self, os.close, fd)

    @classmethod
    def create(cls, size: int) -> Lane:
        """A new lane of at least `size` bytes."""
        fd = _anonymous()
        try:
            size = lane_bytes(size)
            os.ftruncate(fd, size)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled for a spawned worker: the file descriptor travels as a descriptor."""
        from multiprocessing.reduction import DupFd

        return (_attach, (DupFd(self.fd), self.size))

    def fit(self, needed: int) -> None:
        """Grow to hold `needed` bytes (only the lane's current holder may)."""
        if needed > self.size:
            size = lane_bytes(needed)
            os.ftruncate(self.fd, size)
            self._map(size)

    def follow(self, size: int) -> None:
        """Map the size the other side grew the lane to."""
        if size > self.size:
            self._map(size)

    def _map(self, size: int) -> None:
        self.mm = mmap.mmap(self.fd, size)  # the old map goes once no array views it
        self.size = size

    def put(self, arrays: Iterable[tuple[str, Array]], *, after: bool = False) -> Layout:
        """Copy arrays in (from the start, or `after` the arrays last placed or read), growing
        the lane if they do not fit; where they lie."""
        items = list(arrays)
        offset = self.end if after else 0
        layout = []
        for name, array in items:
            if array.dtype.hasobject:
                raise TypeError(f"array {name!r} holds Python objects: no shared memory for it")
            offset = _aligned(offset)
            layout.append((name, array.dtype.str, array.shape, offset))
            offset += array.nbytes
        self.fit(offset)
        for (_, dtype, shape, start), (_, array) in zip(layout, items, strict=True):
            np.copyto(np.ndarray(shape, dtype, buffer=self.mm, offset=start), array, "no")
        self.end = offset
        return tuple(layout)

    def get(self, layout: Layout, *, copy: bool) -> dict[str, Array]:
        """The arrays at `layout`: owned copies, or views valid until the lane is written."""
        arrays = {}
        end = 0
        for name, dtype, shape, offset in layout:
            view: Array = np.ndarray(shape, dtype, buffer=self.mm, offset=offset)
            arrays[name] = view.copy() if copy else view
            end = max(end, offset + view.nbytes)
        self.end = end
        return arrays


def _attach(fd: Any, size: int) -> Lane:
    """Map a lane whose descriptor a parent sent (`Lane.__reduce__`)."""
    return Lane(fd.detach(), size)
