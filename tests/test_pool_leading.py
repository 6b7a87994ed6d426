"""Who reads a pool's replies (guard/pool/dispatch.py, "leading"): a caller waiting alone reads
its own, callers waiting together hand the lead on, and `map` keeps its results in reused
memory (guard/pool/arena.py)."""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pool import assert_outputs, mels, open_marked, references, sleeping

import guard
from guard.tools import demo

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def marked_pool(demo_paths: tuple[Path, Path]) -> Iterator[guard.Pool]:
    """Two workers whose requests may ask them to sleep first."""
    with open_marked(demo_paths, "leading") as p:
        yield p


def watcher_wakeups(pool: guard.Pool) -> int:
    """How many times the pool's watcher thread has gone to sleep and woken (from /proc)."""
    [watcher] = [t for t in threading.enumerate() if t.name == f"mnn-guard-{pool.name}-watch"]
    with open(f"/proc/self/task/{watcher.native_id}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


def test_a_caller_waiting_alone_reads_its_own_replies(marked_pool: guard.Pool) -> None:
    """100 run() calls from one thread: the watcher does not wake for each reply (it would
    hand every one over to the caller); the caller reads them itself."""
    inputs = mels(100, offset=900)
    before = watcher_wakeups(marked_pool)
    outputs = [marked_pool.run({"mel": x}) for x in inputs]
    woke = watcher_wakeups(marked_pool) - before
    assert_outputs(outputs, references(inputs))
    assert woke < 25, f"the watcher woke {woke} times for 100 replies"


def test_map_reads_its_own_replies(marked_pool: guard.Pool) -> None:
    """One map() of 100 requests over two workers: the watcher does not wake for each reply."""
    inputs = mels(100, offset=1000)
    before = watcher_wakeups(marked_pool)
    outputs = marked_pool.map([{"mel": x} for x in inputs])
    woke = watcher_wakeups(marked_pool) - before
    assert_outputs(outputs, references(inputs))
    assert woke < 25, f"the watcher woke {woke} times for 100 replies"


def test_threads_and_an_event_loop_sharing_a_pool_are_all_served(marked_pool: guard.Pool) -> None:
    """Six threads calling run() and an event loop calling arun() at once on two workers: every
    output is its own input's, and nobody waits forever (the lead passes between callers and
    the watcher)."""
    inputs = mels(84, offset=1100)
    expected = references(inputs)
    got: dict[int, dict[str, Array]] = {}

    def caller(start: int) -> None:
        for k in range(start, 72, 6):
            got[k] = marked_pool.run({"mel": inputs[k]})

    async def loop_calls() -> list[dict[str, Array]]:
        return list(await asyncio.gather(*(marked_pool.arun({"mel": x}) for x in inputs[72:])))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    from_loop = asyncio.run(asyncio.wait_for(loop_calls(), 120))
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert_outputs([got[k] for k in range(72)] + from_loop, expected)


class Interrupted(Exception):
    """Raised in the main thread by a timer signal, as Ctrl-C would."""


def test_a_leader_interrupted_hands_the_lead_to_a_caller_asleep(
    marked_pool: guard.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread leads while its request sleeps and is interrupted; another caller,
    asleep behind it on the other worker, then leads and gets its own reply."""
    mel = mels(1, offset=1200)[0]
    served: Future[dict[str, Array]] = Future()

    def follower() -> None:
        try:
            served.set_result(marked_pool.run({"mel": sleeping(1.0)}))
        except BaseException as exc:
            served.set_exception(exc)

    thread = threading.Thread(target=follower)
    real_lead = marked_pool._lead

    def lead(job: Any) -> None:
        if threading.current_thread() is threading.main_thread() and thread.ident is None:
            thread.start()  # the main thread leads already: the other caller waits behind it
        real_lead(job)

    def interrupt(*_: object) -> None:
        raise Interrupted

    monkeypatch.setattr(marked_pool, "_lead", lead)
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        with pytest.raises(Interrupted):
            marked_pool.run({"mel": sleeping(30.0)})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert thread.ident is not None, "the main thread never led"
    assert served.result(timeout=60)["wav"].shape == references([sleeping(1.0)])[0].shape
    thread.join(10)
    assert_outputs([marked_pool.run({"mel": mel})], references([mel]))  # still serving


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_map_results_kept_then_dropped_leave_their_memory_for_the_next_map(
    marked_pool: guard.Pool,
) -> None:
    """The second of two maps of 40 kept results, after the first one's are dropped, touches
    no fresh memory for them (a fresh 300 KB output costs about 75 page faults)."""
    inputs = [{"mel": demo.demo_mel(300, seed=1300 + i)} for i in range(40)]
    first = marked_pool.map(inputs)
    pages = first[0]["wav"].nbytes // 4096
    del first
    gc.collect()
    before = minor_faults()
    second = marked_pool.map(inputs)
    faults = minor_faults() - before
    assert faults < len(inputs) * pages // 5, f"{faults} page faults for {len(inputs)} outputs"
    assert_outputs(second, references([i["mel"] for i in inputs]))


def test_map_results_are_writable_and_later_calls_leave_them_alone(marked_pool: guard.Pool) -> None:
    """A map's results are writable arrays that the next maps, whose results share no memory
    with them, leave as they were."""
    inputs = [{"mel": x} for x in mels(12, offset=1400)]
    first = marked_pool.map(inputs)
    kept = [r["wav"].copy() for r in first]
    later = [marked_pool.map(inputs) for _ in range(3)]
    for result, copy in zip(first, kept, strict=True):
        np.testing.assert_array_equal(result["wav"], copy)
        assert result["wav"].flags.writeable
        assert not any(np.shares_memory(result["wav"], r["wav"]) for m in later for r in m)
    first[0]["wav"][:] = 0  # writing one result changes no other
    assert all(np.array_equal(r["wav"], c) for r, c in zip(first[1:], kept[1:], strict=True))


def test_a_map_waiting_for_its_next_item_leaves_other_callers_served(
    marked_pool: guard.Pool,
) -> None:
    """A map over a generator that blocks before its second item: another thread's run()
    is served meanwhile (the map does not keep reading replies for others while it waits)."""
    first, second, other = mels(3, offset=1600)
    reached, gate = threading.Event(), threading.Event()

    def items() -> Iterator[dict[str, Array]]:
        yield {"mel": first}
        reached.set()
        gate.wait(60)
        yield {"mel": second}

    mapped: Future[list[dict[str, Array]]] = Future()
    mapper = threading.Thread(target=lambda: mapped.set_result(marked_pool.map(items())))
    mapper.start()
    try:
        assert reached.wait(30)
        alone: Future[dict[str, Array]] = Future()
        threading.Thread(target=lambda: alone.set_result(marked_pool.run({"mel": other}))).start()
        assert_outputs([alone.result(timeout=20)], references([other]))
        assert not gate.is_set() and mapper.is_alive()
    finally:
        gate.set()
    assert_outputs(mapped.result(timeout=60), references([first, second]))
    mapper.join(10)
