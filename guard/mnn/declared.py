"""The dtypes an .mnn file declares for its inputs, read from the file's FlatBuffer itself.

MNN reads an input the file declares int64 (DT_INT64) as int32 and reports int32 through
every API; the declaration is only in the file (MNN's schema: `Net.oplists`, each `Op` with
an `Input` parameter and its output tensor's name in `Net.tensorName`).
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["DATA_TYPES", "declared_dtypes"]

DATA_TYPES = {  # MNN's DataType enum (schema/default/Type.fbs), as numpy names
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    19: "float16",
}
_NET_OPLISTS, _NET_TENSOR_NAME = 3, 7  # field numbers in table Net
_OP_MAIN_TYPE, _OP_MAIN, _OP_NAME, _OP_OUTPUTS = 1, 2, 3, 4  # in table Op
_INPUT = 21  # the OpParameter union's tag for table Input
_INPUT_DTYPE, _DT_FLOAT = 1, 1  # Input.dtype's field number and its default


class _FlatBuffer:
    """Just enough of the FlatBuffers wire format to read tables, vectors and strings."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data

    def _read(self, fmt: str, pos: int) -> int:
        """One number at `pos` (a position before the start is corrupt, not an end offset)."""
        if pos < 0:
            raise ValueError("an offset points before the start of the file")
        return int(struct.unpack_from(fmt, self.data, pos)[0])

    def _u32(self, pos: int) -> int:
        return self._read("<I", pos)

    def root(self) -> int:
        """The root table (a Net)."""
        return self._u32(0)

    def _field(self, table: int, index: int) -> int | None:
        """Where field `index` of the table at `table` is stored; None when it is absent."""
        vtable = table - self._read("<i", table)
        size = self._read("<H", vtable)
        if 4 + 2 * index >= size:
            return None
        offset = self._read("<H", vtable + 4 + 2 * index)
        return table + offset if offset else None

    def scalar(self, table: int, index: int, fmt: str, default: int) -> int:
        """A scalar field (`fmt` as in struct), or its schema default."""
        pos = self._field(table, index)
        return default if pos is None else self._read(fmt, pos)

    def child(self, table: int, index: int) -> int | None:
        """A table, vector or string field: where its content starts; None when absent."""
        pos = self._field(table, index)
        return None if pos is None else pos + self._u32(pos)

    def vector(self, table: int, index: int, width: int) -> tuple[int, int]:
        """(first element, length) of a vector field of `width`-byte elements ((0, 0) if absent)."""
        start = self.child(table, index)
        if start is None:
            return 0, 0
        length = self._u32(start)
        if start + 4 + length * width > len(self.data):
            raise ValueError("a vector runs past the end of the file")
        return start + 4, length

    def tables(self, table: int, index: int) -> list[int]:
        """The tables of a vector-of-tables field."""
        first, length = self.vector(table, index, 4)
        return [first + 4 * k + self._u32(first + 4 * k) for k in range(length)]

    def ints(self, table: int, index: int) -> list[int]:
        """The values of an int vector field."""
        first, length = self.vector(table, index, 4)
        return list(struct.unpack_from(f"<{length}i", self.data, first)) if length else []

    def string(self, pos: int) -> str:
        """The string stored at `pos` (its length first)."""
        length = self._u32(pos)
        return bytes(self.data[pos + 4 : pos + 4 + length]).decode("utf-8")

    def string_at(self, table: int, index: int, item: int) -> str | None:
        """Item `item` of a vector-of-strings field; None when there is no such item."""
        first, length = self.vector(table, index, 4)
        if not 0 <= item < length:
            return None
        pos = first + 4 * item
        return self.string(pos + self._u32(pos))


def _inputs(buffer: _FlatBuffer) -> dict[str, str]:
    """Input tensor name -> declared dtype, for every Input op of the net."""
    net = buffer.root()
    found = {}
    for op in buffer.tables(net, _NET_OPLISTS):
        if buffer.scalar(op, _OP_MAIN_TYPE, "<B", 0) != _INPUT:
            continue
        main = buffer.child(op, _OP_MAIN)
        dtype = _DT_FLOAT if main is None else buffer.scalar(main, _INPUT_DTYPE, "<i", _DT_FLOAT)
        outputs = buffer.ints(op, _OP_OUTPUTS)
        name = buffer.string_at(net, _NET_TENSOR_NAME, outputs[0]) if outputs else None
        if name is None:
            at = buffer.child(op, _OP_NAME)
            name = None if at is None else buffer.string(at)
        if name is not None:
            found[name] = DATA_TYPES.get(dtype, "unknown")
    return found


def declared_dtypes(path: str | os.PathLike[str]) -> dict[str, str]:
    """Input name -> the dtype the file declares for it; {} when the file cannot be read so."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _inputs(_FlatBuffer(m))
    except (OSError, ValueError, OverflowError, struct.error, UnicodeDecodeError):
        return {}
