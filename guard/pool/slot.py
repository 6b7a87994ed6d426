"""One slot of a pool: its states, the moves between them, its worker and a snapshot of one.

A slot holds one worker process at a time, with the worker's shared-memory lanes; a worker
that fails is stopped and the slot starts a replacement. The only moves (`MOVES`); `Slot.to`
makes every one of them, under the pool's Condition:

    from       to         when
    STARTING   IDLE       the slot's new worker says its session serves
    STARTING   FAILED     a replacement worker could not start (the slot keeps its error)
    IDLE       BUSY       a request takes a lane of the worker
    IDLE       STARTING   the worker died while idle: it is reaped and a replacement starts
    BUSY       IDLE       the worker answered and waits for the next request
    BUSY       FULL       the next request takes the worker's other lane, to start as soon
                          as the one in hand is answered (the worker never waits for the pool)
    FULL       BUSY       one of the two was answered (or withdrawn before it started)
    BUSY/FULL  STARTING   the worker crashed, timed out, raised or was interrupted: replaced
    any        CLOSED     the pool closed

The worker's session has states of its own (`guard.State`); the slot only keeps what the
worker last reported of it with each reply. Readiness shows a slot in service by that
report, and a slot out of service by its own state (`shown`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any, ClassVar

from guard.errors import SessionClosed, Unavailable, WorkerFailed
from guard.health import Entry
from guard.ladder import Rung
from guard.pool import wire
from guard.pool.children import Child, Event
from guard.pool.shared import DEPTH, Lane
from guard.state import LIVE, State

if TYPE_CHECKING:
    from guard.pool.job import Job

__all__ = ["IN_SERVICE", "MOVES", "Slot", "SlotState", "SlotStatus", "Slots", "WorkerStatus"]

log = logging.getLogger("mnn_guard")


class SlotState(enum.Enum):
    """Where a pool's slot is: starting a worker, serving with one, or out of service."""

    STARTING = "starting"  # a worker is being spawned or builds its session (pid once spawned)
    IDLE = "idle"  # its worker serves and waits for a request
    BUSY = "busy"  # its worker has a request in hand
    FULL = "full"  # ... and the next one waiting in its other lane
    FAILED = "failed"  # a replacement could not start; the slot stays empty
    CLOSED = "closed"  # the pool closed

    __hash__ = object.__hash__  # looked up for every request: C's identity hash, not Enum's


MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.STARTING: frozenset({SlotState.IDLE, SlotState.FAILED, SlotState.CLOSED}),
    SlotState.IDLE: frozenset({SlotState.BUSY, SlotState.STARTING, SlotState.CLOSED}),
    SlotState.BUSY: frozenset(
        {SlotState.IDLE, SlotState.FULL, SlotState.STARTING, SlotState.CLOSED}
    ),
    SlotState.FULL: frozenset({SlotState.BUSY, SlotState.STARTING, SlotState.CLOSED}),
    SlotState.FAILED: frozenset({SlotState.CLOSED}),
    SlotState.CLOSED: frozenset(),
}
IN_SERVICE = frozenset({SlotState.IDLE, SlotState.BUSY, SlotState.FULL})  # a serving worker
_TAKEN = {SlotState.IDLE: SlotState.BUSY, SlotState.BUSY: SlotState.FULL}  # a request more
_SHOWN = {SlotState.STARTING: State.STARTING, SlotState.FAILED: State.FAILED}  # out of service
# how bad each shown state is for the pool's readiness entry, from fine to worst
_SEVERITY = (State.SERVING, State.CHECKING, State.STARTING, State.REPLACING, State.FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotStatus:
    """One slot of a pool: its state and process, and what its worker last reported."""

    slot: int
    pid: int | None  # None while a replacement has no process yet, or after it failed to start
    state: SlotState
    session: State | None  # the worker's session state, as of its last reply (None: no reply)
    rung: str | None  # the name of the rung its session serves on, as of the same reply
    requests: int  # served by this slot's current worker

    @property
    def busy(self) -> bool:
        """True while a request is in hand."""
        return self.state is SlotState.BUSY or self.state is SlotState.FULL

    @property
    def serving(self) -> bool:
        """True while the slot's worker serves with a session whose canary passed."""
        return self.state in IN_SERVICE and self.session in LIVE


WorkerStatus = SlotStatus  # the name before slots had states of their own


class Lost(Exception):
    """A worker sent what is no reply; it is replaced."""


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges in prometheus_client multiprocess mode."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client.multiprocess import mark_process_dead

    try:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError:
        log.warning("could not drop the metrics files of dead worker pid %d", pid)


@dataclass(eq=False)
class Slot:
    """The parent's record of one slot and its current worker.

    Every field is guarded by the pool's Condition (`cond`). The starting thread reads the
    worker's pipe until the worker is ready, then only the pool's watcher does; requests are
    written to it under `cond`. `held` maps each lane in use to its request; `order` lists the
    lanes sent, in the order the worker serves them: the first is in hand since `started`.
    """

    pool: str  # the pool's name, for messages
    index: int
    cond: threading.Condition
    state: SlotState = SlotState.STARTING
    child: Child | None = None  # None until spawned, and once a replacement failed
    session: State | None = None  # the worker's last report, or None before its first
    rung_index: int | None = None
    requests: int = 0
    error: Exception | None = None  # why the replacement could not start (FAILED)
    turn: int = 0  # when it last became idle or busy: the pool takes the one waiting longest
    lanes: tuple[Lane, ...] = ()  # the current worker's shared memory, one lane per request
    held: dict[int, Job] = field(default_factory=dict)
    order: deque[int] = field(default_factory=deque)
    started: float = 0.0  # time.monotonic() when the first of `order` reached the worker's hands
    _turns: ClassVar[itertools.count[int]] = itertools.count()

    def to(self, state: SlotState) -> bool:
        """The one place a slot's state changes (the caller holds `cond`): check, set, wake.

        A closed slot stays closed: a move from CLOSED is refused (returns False), so a worker
        that starts or answers after close() changes nothing. Any other move not in MOVES
        raises AssertionError.
        """
        if self.state is SlotState.CLOSED:
            return False
        if state not in MOVES[self.state]:
            raise AssertionError(f"worker {self.index}: no move {self.state} -> {state}")
        self.state = state
        if state is SlotState.STARTING:  # a new worker: no process yet, nothing heard
            self.child, self.session, self.rung_index, self.requests = None, None, None, 0
            self.lanes = ()
            self.held.clear()
            self.order.clear()
        elif state is SlotState.IDLE or state is SlotState.BUSY:
            self.turn = next(self._turns)
        elif state is SlotState.FAILED:
            self.child = None
        self.cond.notify_all()
        return True

    def note(self, report: wire.Report) -> bool:
        """Keep what the worker reported of its session (caller holds `cond`); True if new."""
        changed = (self.session, self.rung_index) != (report.state, report.rung_index)
        self.session, self.rung_index = report.state, report.rung_index
        return changed

    @property
    def closed(self) -> bool:
        """True once the pool closed."""
        return self.state is SlotState.CLOSED

    @property
    def pid(self) -> int | None:
        """The current worker's process id (None without one)."""
        return self.child.pid if self.child is not None else None

    @property
    def label(self) -> str:
        """`worker 0 (pid 123)`, for messages and logs."""
        return f"worker {self.index} (pid {self.pid})"

    def shown(self) -> State:
        """The state readiness shows of an open slot: its worker's session's in service, else
        STARTING or FAILED."""
        if self.state in IN_SERVICE:
            assert self.session is not None  # a slot enters IDLE with its worker's first report
            return self.session
        return _SHOWN[self.state]

    def status(self, ladder: Sequence[Rung]) -> SlotStatus:
        """A snapshot (the caller holds `cond`)."""
        return SlotStatus(
            slot=self.index,
            pid=self.pid,
            state=self.state,
            session=self.session,
            rung=ladder[self.rung_index].name if self.rung_index is not None else None,
            requests=self.requests,
        )

    # ------------------------------------------------------------ its worker

    def spawn(
        self,
        ctx: BaseContext,
        target: Callable[..., object],
        args: Sequence[Any],
        lane_bytes: int = 0,
    ) -> None:
        """Start this STARTING slot's worker: `target(conn, *args)` in a new process of `ctx`;
        with `lane_bytes`, `target(conn, *args, lanes)` with DEPTH new lanes of that size."""
        with self.cond:
            if self.closed:
                raise SessionClosed(f"pool {self.pool!r} is closed")
        lanes = tuple(Lane.create(lane_bytes) for _ in range(DEPTH)) if lane_bytes else ()
        extra = (lanes,) if lanes else ()
        name = f"mnn-guard-{self.pool}-{self.index}"
        child = Child.spawn(ctx, target, (*args, *extra), name=name)
        with self.cond:
            self.child, self.lanes = child, lanes
            closed = self.closed
        if closed:  # close() ran meanwhile and could not see this process
            child.kill()

    # ------------------------------------------------------------ its requests

    def hold(self, job: Job) -> int:
        """Give a request a free lane of this slot, just taken BUSY or FULL (caller holds
        `cond`): the lane's index."""
        lane = next(i for i in range(DEPTH) if i not in self.held)
        self.held[lane] = job
        return lane

    def sent(self, lane: int, now: float) -> bool:
        """The request in `lane` is on the worker's pipe (caller holds `cond`); True when it is
        the one in hand."""
        self.order.append(lane)
        if len(self.order) == 1:
            self.started = now
            return True
        return False

    def let_go(self, lane: int, now: float) -> Job | None:
        """Free `lane` once answered, withdrawn or never sent (caller holds `cond`): its request,
        if any; the next one sent is in hand from `now`."""
        job = self.held.pop(lane, None)
        if lane in self.order:
            first = self.order[0] == lane
            self.order.remove(lane)
            if first and self.order:
                self.started = now
        if job is not None:
            self.to(SlotState.BUSY if self.held else SlotState.IDLE)
            self.cond.notify_all()  # close() waits for the requests in flight
        return job

    def in_hand(self) -> Job | None:
        """The request the worker is serving, as far as the pool knows (caller holds `cond`)."""
        return self.held.get(self.order[0]) if self.order else None

    def await_ready(self, timeout: float | None) -> wire.Report:
        """Wait for the spawned worker's session; raise the worker's own error if it failed."""
        child = self.child
        assert child is not None
        prefix = f"pool {self.pool!r}: {self.label} could not start"
        try:
            event = child.wait(timeout)
            if event is Event.TIMEOUT:
                raise WorkerFailed(f"{prefix}: no session within {timeout:g} s; killed")
            try:
                reply = self.receive(child) if event is Event.MESSAGE else None
            except Lost as lost:
                raise WorkerFailed(f"{prefix}: {lost}") from None
            if reply is None:
                raise WorkerFailed(f"{prefix}: it {child.exit_text()}")
            if isinstance(reply, wire.StartFailed):
                reply.error.add_note(prefix)
                raise reply.error
            if not isinstance(reply, wire.Ready):
                raise WorkerFailed(f"{prefix}: it sent a {type(reply).__name__} first")
        except BaseException:
            stop(child)
            raise
        return reply.report

    def receive(self, child: Child) -> wire.Reply | None:
        """The next reply on the worker's pipe; None when the worker died instead."""
        try:
            data = child.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        try:
            reply = wire.decode(data)
        except Exception as exc:
            raise Lost(f"{self.label} sent a reply that could not be decoded: {exc!r}") from exc
        if not isinstance(reply, wire.REPLIES):
            raise Lost(f"{self.label} sent a {type(reply).__name__}, not a reply")
        return reply

    def ask_to_stop(self) -> None:
        """Ask the worker to exit (its pipe's owner calls this)."""
        child = self.child
        if child is not None:
            wire.send(child.conn, wire.Stop())  # False if gone or its pipe closed: reaped anyway


def stop(child: Child | None, grace: float = 0.0, *, close: bool = True) -> None:
    """Stop and reap a worker's process; drop its metrics."""
    if child is not None:
        child.stop(grace, close=close)
        _mark_dead(child.pid)


class _Condition(threading.Condition):
    """A Condition whose notify_all costs nothing while nobody waits (every request moves a
    slot twice; a waiter is rare)."""

    def notify_all(self) -> None:
        if self._waiters:  # type: ignore[attr-defined]
            super().notify_all()


class Slots:
    """A pool's slots under one Condition (`cond`, whose plain `lock` a caller may hold
    instead), which also guards the pool's counters."""

    def __init__(self, pool: str, processes: int, ladder: Sequence[Rung]) -> None:
        self.lock = threading.Lock()
        self.cond = _Condition(self.lock)
        self.pool = pool
        self.ladder = tuple(ladder)
        self.all = [Slot(pool, index, self.cond) for index in range(processes)]

    @property
    def closed(self) -> bool:
        """True once the pool closed (its slots close together, in `close`)."""
        return all(slot.closed for slot in self.all)

    def take(self, depth: int = 1) -> Slot | None:
        """The slot idle longest, now BUSY; else, with `depth` 2, the slot busy longest with a
        free lane, now FULL; None when there is neither (the caller holds `cond`)."""
        for state in (SlotState.IDLE, SlotState.BUSY)[:depth]:
            found = None
            for slot in self.all:  # plain loops: this runs for every request
                if slot.state is state and (found is None or slot.turn < found.turn):
                    found = slot
            if found is not None:
                found.to(_TAKEN[state])
                return found
        return None

    def acquire(self, deadline: float | None, wait_timeout: float, depth: int = 1) -> Slot:
        """`take`, waiting (until `deadline`, by default `wait_timeout` from now) while there is
        nothing to take. WorkerFailed when every slot failed; SessionClosed once closed."""
        if deadline is None:
            deadline = time.monotonic() + wait_timeout
        with self.cond:
            while True:
                if self.closed:
                    raise SessionClosed(f"pool {self.pool!r} is closed")
                slot = self.take(depth)
                if slot is not None:
                    return slot
                failed = self.failed()
                if failed is not None:
                    raise failed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self.unavailable(wait_timeout)
                self.cond.wait(remaining)

    def failed(self) -> WorkerFailed | None:
        """The error for a request when every slot failed, else None (the caller holds `cond`)."""
        errors = [s.error for s in self.all if s.state is SlotState.FAILED]
        if not errors or len(errors) < len(self.all):
            return None
        error = WorkerFailed(
            f"pool {self.pool!r}: no worker is left; the last replacement failed: {errors[0]}"
        )
        error.__cause__ = errors[0]
        return error

    def unavailable(self, wait_timeout: float) -> Unavailable:
        """The error for a request that found no worker within `wait_timeout` (caller holds
        `cond`)."""
        starting = sum(s.state is SlotState.STARTING for s in self.all)
        return Unavailable(
            f"pool {self.pool!r}: no worker was free within {wait_timeout:g} s "
            f"(Policy.wait_timeout); {starting} of {len(self.all)} starting, the rest busy"
        )

    def idle(self) -> list[tuple[Slot, Child]]:
        """The idle slots and their workers; [] once closed."""
        with self.cond:
            if self.closed:
                return []
            return [(s, s.child) for s in self.all if s.state is SlotState.IDLE and s.child]

    def status(self) -> list[SlotStatus]:
        """A snapshot of every slot in order; [] once closed."""
        with self.cond:
            if self.closed:
                return []
            return [slot.status(self.ladder) for slot in self.all]

    def entry(self, since: float) -> Entry | None:
        """The pool's readiness entry, made from its slots; None once closed.

        Ready while every worker serves; its state is the worst slot's, its rung the furthest
        down the ladder; a worker that has not reported yet is listed on the first rung.
        """
        with self.cond:
            if self.closed:
                return None
            shown = [(s, s.shown(), s.rung_index or 0) for s in self.all]
            workers = [
                {"slot": s.index, "pid": s.pid, "state": each.value, "rung": self.ladder[i].name}
                for s, each, i in shown
            ]
            reasons = tuple(
                f"{s.label} is {each.value}" + (f": {s.error}" if s.error is not None else "")
                for s, each, _ in shown
                if each not in LIVE
            )
        state = max((each for _, each, _ in shown), key=_SEVERITY.index)
        index = max(i for _, _, i in shown)
        return Entry(
            name=self.pool,
            state=state,
            rung=self.ladder[index].name,
            rung_index=index,
            healthy=state in LIVE,
            since=since,
            reasons=reasons,
            detail={"workers": workers},
        )

    def close(self) -> list[tuple[Slot, SlotState, Child | None]]:
        """Close every slot: each with the state and worker it had; [] if already closed."""
        with self.cond:
            if self.closed:
                return []
            before = [(slot, slot.state, slot.child) for slot in self.all]
            for slot in self.all:
                slot.to(SlotState.CLOSED)
            return before
