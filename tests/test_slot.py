"""guard.pool.slot: a worker slot's state machine, the pool's slots, and readiness from them.

These slots have no processes: the moves, the waits and the readiness entry do not need one
(the pool's own tests drive the same slots with real workers).
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future

import pytest
from polling import until

import guard
from guard.health import Entry, HealthTable
from guard.pool import SlotState, SlotStatus, WorkerStatus, wire
from guard.pool.slot import MOVES, Slot, Slots

LADDER = guard.Policy().ladder  # static, then dynamic
SERVING = wire.Report(guard.State.SERVING, 0)


def path_to(state: SlotState) -> list[SlotState]:
    """The moves from STARTING to `state`, found through MOVES only."""
    paths = {SlotState.STARTING: [SlotState.STARTING]}
    frontier = [SlotState.STARTING]
    while frontier:
        here = frontier.pop(0)
        for there in sorted(MOVES[here], key=lambda s: s.value):
            if there not in paths:
                paths[there] = [*paths[here], there]
                frontier.append(there)
    return paths[state][1:]


def slot_in(state: SlotState, cond: threading.Condition | None = None) -> Slot:
    """A new slot brought to `state` by its own moves (a worker report on entering IDLE)."""
    slot = Slot("p", 0, cond or threading.Condition())
    with slot.cond:
        for step in path_to(state):
            if step is SlotState.IDLE:
                slot.note(SERVING)
            assert slot.to(step)
    return slot


def waiting(thread: threading.Thread) -> bool:
    """True while `thread` waits on a Condition."""
    frame = sys._current_frames().get(thread.ident or 0)
    return frame is not None and frame.f_code.co_name == "wait"


# ------------------------------------------------------------------ the state machine


def test_every_state_is_reachable_from_starting() -> None:
    """A new slot is STARTING, and MOVES lead from there to every state."""
    assert Slot("p", 0, threading.Condition()).state is SlotState.STARTING
    for state in SlotState:
        assert slot_in(state).state is state


@pytest.mark.parametrize(
    ("here", "there"),
    [(here, there) for here, moves in MOVES.items() for there in sorted(moves, key=str)],
    ids=str,
)
def test_every_move_in_moves_is_made(here: SlotState, there: SlotState) -> None:
    """Each move in MOVES is allowed: `to` makes it and says so."""
    slot = slot_in(here)
    with slot.cond:
        assert slot.to(there) is True
    assert slot.state is there


@pytest.mark.parametrize(
    ("here", "there"),
    [
        (here, there)
        for here in SlotState
        if here is not SlotState.CLOSED
        for there in SlotState
        if there not in MOVES[here]
    ],
    ids=str,
)
def test_a_move_not_in_moves_raises(here: SlotState, there: SlotState) -> None:
    """Every other move from an open state raises AssertionError naming it; the state stays."""
    slot = slot_in(here)
    with slot.cond, pytest.raises(AssertionError, match=f"worker 0: no move {here} -> {there}"):
        slot.to(there)
    assert slot.state is here


def test_a_closed_slot_stays_closed() -> None:
    """From CLOSED nothing moves: `to` refuses every state (False) and the slot stays closed."""
    slot = slot_in(SlotState.CLOSED)
    assert MOVES[SlotState.CLOSED] == frozenset()
    with slot.cond:
        assert [slot.to(state) for state in SlotState] == [False] * len(SlotState)
    assert slot.state is SlotState.CLOSED and slot.closed


def test_a_new_worker_starts_with_nothing_heard() -> None:
    """Entering STARTING forgets the last worker: no process, no report, no requests served;
    entering FAILED leaves no process; the status says what the worker last reported."""
    slot = slot_in(SlotState.BUSY)
    with slot.cond:
        slot.note(wire.Report(guard.State.CHECKING, 1))
        slot.requests = 7
    assert slot.status(LADDER) == SlotStatus(
        slot=0, pid=None, state=SlotState.BUSY, session=guard.State.CHECKING, rung="dynamic",
        requests=7,
    )  # fmt: skip
    assert slot.status(LADDER).busy and slot.status(LADDER).serving
    with slot.cond:
        slot.to(SlotState.STARTING)
    status = slot.status(LADDER)
    assert (status.session, status.rung, status.requests) == (None, None, 0)
    assert not status.busy and not status.serving
    with slot.cond:
        slot.to(SlotState.FAILED)
    assert (slot.child, slot.status(LADDER).state) == (None, SlotState.FAILED)


def test_note_says_whether_the_report_is_new() -> None:
    """A report that changes the session's state or rung is new; the same again is not."""
    slot = Slot("p", 0, threading.Condition())
    assert slot.note(SERVING) is True
    assert slot.note(SERVING) is False
    assert slot.note(wire.Report(guard.State.SERVING, 1)) is True
    assert slot.note(wire.Report(guard.State.REPLACING, 1)) is True


def test_a_slot_serves_only_in_service_with_a_live_session() -> None:
    """`serving` needs an IDLE or BUSY slot whose worker reported a live session."""
    replacing = slot_in(SlotState.IDLE)
    with replacing.cond:
        replacing.note(wire.Report(guard.State.REPLACING, 0))
    assert slot_in(SlotState.IDLE).status(LADDER).serving
    assert not replacing.status(LADDER).serving
    assert not slot_in(SlotState.STARTING).status(LADDER).serving
    assert WorkerStatus is SlotStatus  # the old name


# ------------------------------------------------------------------ the pool's slots


def slots_in(*states: SlotState) -> Slots:
    """Slots of pool 'p', one per state, brought there by their own moves."""
    slots = Slots("p", len(states), LADDER)
    with slots.cond:
        for slot, state in zip(slots.all, states, strict=True):
            for step in path_to(state):
                if step is SlotState.IDLE:
                    slot.note(SERVING)
                slot.to(step)
    return slots


def test_acquire_takes_the_slot_idle_longest() -> None:
    """Slots that became idle in the order 2, 0, 1 are taken in that order, each BUSY."""
    slots = Slots("p", 3, LADDER)
    with slots.cond:
        for index in (2, 0, 1):
            slots.all[index].note(SERVING)
            slots.all[index].to(SlotState.IDLE)
    taken = [slots.acquire(None, 1.0) for _ in range(3)]
    assert [s.index for s in taken] == [2, 0, 1]
    assert all(s.state is SlotState.BUSY for s in taken)


def test_acquire_waits_for_a_slot_to_become_idle() -> None:
    """A caller waiting for a worker gets the slot that turns IDLE (`to` wakes it)."""
    slots = slots_in(SlotState.STARTING, SlotState.BUSY)
    got: Future[Slot] = Future()
    thread = threading.Thread(target=lambda: got.set_result(slots.acquire(None, 60.0)))
    thread.start()
    until("the caller waiting", lambda: waiting(thread))
    with slots.cond:
        slots.all[1].to(SlotState.IDLE)
    assert got.result(timeout=10) is slots.all[1]
    assert slots.all[1].state is SlotState.BUSY
    thread.join(10)


def test_acquire_says_why_no_slot_was_free() -> None:
    """Past its deadline acquire raises Unavailable counting the starting slots; when every
    slot failed, WorkerFailed from the first error; once closed, SessionClosed."""
    slots = slots_in(SlotState.STARTING, SlotState.BUSY)
    with pytest.raises(guard.Unavailable) as info:
        slots.acquire(time.monotonic(), 0.3)
    assert str(info.value) == (
        "pool 'p': no worker was free within 0.3 s (Policy.wait_timeout); 1 of 2 starting, "
        "the rest busy"
    )
    failed = slots_in(SlotState.FAILED, SlotState.FAILED)
    first = RuntimeError("no module")
    failed.all[0].error, failed.all[1].error = first, RuntimeError("none either")
    said = "the last replacement failed: no module"
    with pytest.raises(guard.errors.WorkerFailed, match=said) as lost:
        failed.acquire(None, 60.0)
    assert lost.value.__cause__ is first
    assert failed.close() != [] and failed.close() == []
    with pytest.raises(guard.errors.SessionClosed, match=r"^pool 'p' is closed$"):
        failed.acquire(None, 60.0)


def test_close_closes_every_slot_and_says_what_each_was() -> None:
    """close() moves every slot to CLOSED at once and returns each with its state before; a
    closed pool has no status, no idle worker and no readiness entry."""
    slots = slots_in(SlotState.STARTING, SlotState.IDLE, SlotState.BUSY, SlotState.FAILED)
    before = slots.close()
    assert [(s.index, state) for s, state, _ in before] == [
        (0, SlotState.STARTING),
        (1, SlotState.IDLE),
        (2, SlotState.BUSY),
        (3, SlotState.FAILED),
    ]
    assert slots.closed and all(s.state is SlotState.CLOSED for s in slots.all)
    assert (slots.status(), slots.idle(), slots.entry(0.0)) == ([], [], None)


# ------------------------------------------------------------------ readiness from slots


def test_readiness_of_serving_slots_is_ready() -> None:
    """Every slot serving: the pool's entry is ready, serving, on the furthest rung of any
    worker, listing each worker; the table shows it as /readyz does."""
    slots = slots_in(SlotState.IDLE, SlotState.BUSY)
    with slots.cond:
        slots.all[1].note(wire.Report(guard.State.CHECKING, 1))
    entry = slots.entry(since=12.5)
    assert entry == Entry(
        name="p", state=guard.State.CHECKING, rung="dynamic", rung_index=1, healthy=True,
        since=12.5, reasons=(),
        detail={"workers": [
            {"slot": 0, "pid": None, "state": "serving", "rung": "static"},
            {"slot": 1, "pid": None, "state": "checking", "rung": "dynamic"},
        ]},
    )  # fmt: skip
    table = HealthTable()
    table.record(slots, entry)
    assert table.readiness(expect=["p"]) == (True, [entry.as_dict()])
    assert entry.as_dict()["state"] == "checking" and entry.as_dict()["reasons"] == []


def test_readiness_shows_the_worst_slot_and_says_why() -> None:
    """A starting slot makes the pool starting; a failed one makes it failed, with its error;
    a worker that reported a replacing session makes it replacing; each one is a reason."""
    starting = slots_in(SlotState.IDLE, SlotState.STARTING)
    entry = starting.entry(0.0)
    assert entry is not None
    assert (entry.state, entry.healthy, entry.rung, entry.rung_index) == (
        guard.State.STARTING, False, "static", 0,
    )  # fmt: skip
    assert entry.reasons == ("worker 1 (pid None) is starting",)
    assert [w["state"] for w in entry.detail["workers"]] == ["serving", "starting"]
    failed = slots_in(SlotState.STARTING, SlotState.FAILED, SlotState.IDLE)
    failed.all[1].error = guard.RecoveryExhausted("every rung failed", [])
    with failed.cond:
        failed.all[2].note(wire.Report(guard.State.REPLACING, 1))
    entry = failed.entry(0.0)
    assert entry is not None
    assert (entry.state, entry.healthy, entry.rung_index) == (guard.State.FAILED, False, 1)
    assert entry.reasons == (
        "worker 0 (pid None) is starting",
        "worker 1 (pid None) is failed: every rung failed",
        "worker 2 (pid None) is replacing",
    )
    table = HealthTable()
    table.record(failed, entry)
    ready, (shown,) = table.readiness()
    assert ready is False and shown["state"] == "failed" and shown["healthy"] is False
    assert shown["reasons"] == list(entry.reasons)
