"""guard.pool.shared: a lane's arrays, its growth seen from both ends, and its hand-over to a
spawned process; guard.pool.wire through lanes."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guard
from guard.pool import wire
from guard.pool.shared import ALIGN, MIN_BYTES, Lane, lane_bytes

Array = np.ndarray[Any, Any]
SERVING = wire.Report(guard.State.SERVING, 1)


def other_end(lane: Lane) -> Lane:
    """The same memory mapped a second time, as the worker maps the parent's lane."""
    return Lane(os.dup(lane.fd), lane.size)


def test_arrays_go_in_and_come_back_as_they_were() -> None:
    """Arrays of several dtypes and shapes (a scalar, an empty one, a non-contiguous one) come
    back equal, each on an aligned offset; copies are owned, views are the lane's."""
    lane = Lane.create(1)
    arrays: dict[str, Array] = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous
        "sr": np.array(16000, np.int32),
        "none": np.zeros((0, 5), np.float64),
        "ids": np.arange(7, dtype=np.int64),
    }
    layout = lane.put(arrays.items())
    assert all(offset % ALIGN == 0 for *_, offset in layout)
    copies, views = lane.get(layout, copy=True), lane.get(layout, copy=False)
    for name, array in arrays.items():
        np.testing.assert_array_equal(copies[name], array)
        assert copies[name].dtype == array.dtype and copies[name].shape == array.shape
        assert copies[name].flags.owndata and not np.shares_memory(copies[name], views[name])
    lane.put([("x", np.full((4, 3), 9, np.float32))])
    assert views["x"][0, 0] == 9 and copies["x"][0, 0] == 0  # a view sees the next request


def test_a_lane_grows_and_the_other_end_follows() -> None:
    """Arrays larger than the lane grow it to a power of two; the other end maps the new
    size when told it and reads the same bytes; a lane never shrinks."""
    parent = Lane.create(1)
    worker = other_end(parent)
    assert parent.size == MIN_BYTES == lane_bytes(1)
    big = np.arange(MIN_BYTES, dtype=np.float32)  # four times the lane
    layout = parent.put([("big", big)])
    assert parent.size == lane_bytes(big.nbytes) == 4 * MIN_BYTES
    assert worker.size == MIN_BYTES
    worker.follow(parent.size)
    np.testing.assert_array_equal(worker.get(layout, copy=False)["big"], big)
    worker.follow(MIN_BYTES)
    assert worker.size == 4 * MIN_BYTES
    parent.put([("small", np.ones(3, np.float32))])
    assert parent.size == 4 * MIN_BYTES


def test_replies_go_after_the_request_they_answer() -> None:
    """A worker's outputs are placed after the inputs it read, so that inputs still in use
    are never overwritten by its reply."""
    parent = Lane.create(1)
    worker = other_end(parent)
    mel = np.arange(100, dtype=np.float32)
    worker.get(parent.put([("mel", mel)]), copy=False)
    ((_, _, _, offset),) = worker.put([("wav", np.ones(10, np.float32))], after=True)
    assert offset >= mel.nbytes


def test_object_arrays_are_refused() -> None:
    """An array of Python objects has no bytes to share: TypeError naming it."""
    with pytest.raises(TypeError, match="array 'o' holds Python objects"):
        Lane.create(1).put([("o", np.array([object()]))])


def test_messages_through_a_lane_carry_only_where_arrays_lie() -> None:
    """A Run through a lane is a few hundred bytes whatever its arrays weigh; the worker reads
    views, its Done reply comes back to the parent as owned copies with the same report; a
    message without a lane carries its arrays pickled, as before."""
    parent = Lane.create(1)
    worker = other_end(parent)
    mel = np.random.default_rng(0).standard_normal((1, 80, 400)).astype(np.float32)
    data = wire.encode(wire.Run({"mel": mel}, 1), parent)
    assert len(data) < 300 < mel.nbytes
    run = wire.decode(data, (Lane.create(1), worker))
    assert isinstance(run, wire.Run) and run.lane == 1
    assert not run.arrays["mel"].flags.owndata
    np.testing.assert_array_equal(run.arrays["mel"], mel)
    wav = np.random.default_rng(1).standard_normal((1, 1, 102400)).astype(np.float32)
    reply = wire.encode(wire.Done({"wav": wav}, SERVING, 1), worker)
    done = wire.decode(reply, (parent, parent), copy=True)
    assert isinstance(done, wire.Done) and (done.lane, done.report) == (1, SERVING)
    assert done.outputs["wav"].flags.owndata
    np.testing.assert_array_equal(done.outputs["wav"], wav)
    plain = wire.encode(wire.Run({"mel": mel}))
    again = wire.decode(plain)
    assert len(plain) > mel.nbytes and isinstance(again, wire.Run) and again.lane is None
    np.testing.assert_array_equal(again.arrays["mel"], mel)


def test_a_message_naming_a_lane_this_end_lacks_is_refused() -> None:
    """Decoding a lane message with no such lane raises ValueError saying so."""
    data = wire.encode(wire.Run({"x": np.ones(2, np.float32)}, 0), Lane.create(1))
    with pytest.raises(ValueError, match="the message names lane 0; this end has 0"):
        wire.decode(data)


def read_lane(conn: Connection, lane: Lane, layout: Any) -> None:
    """Child: send back what the lane it was handed holds and where it wrote a mark."""
    found = lane.get(layout, copy=True)["x"]
    mark = lane.put([("mark", np.array([7.0], np.float32))], after=True)
    conn.send((found.tolist(), lane.size, mark))


def test_a_spawned_process_gets_the_lane_itself() -> None:
    """A lane pickled into a spawned process's arguments arrives as the same memory: the child
    reads what the parent wrote and the parent reads what the child wrote; nothing is named in
    /dev/shm."""
    shm = set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()
    lane = Lane.create(1)
    layout = lane.put([("x", np.arange(5, dtype=np.float32))])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=read_lane, args=(child, lane, layout))
    process.start()
    try:
        assert parent.poll(60), "no answer from the child"
        found, size, mark = parent.recv()
        assert (found, size) == ([0.0, 1.0, 2.0, 3.0, 4.0], lane.size)
        assert lane.get(mark, copy=True)["mark"].tolist() == [7.0]
    finally:
        process.join(30)
    assert process.exitcode == 0
    if shm:
        assert set(os.listdir("/dev/shm")) <= shm
