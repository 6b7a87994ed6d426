"""One request's way through a pool: its steps, and the line of requests waiting for a lane.

A job is made in the caller's thread (or on the event loop) with the checked arrays. It waits
in the pool's line while no worker has a free lane, is placed in a lane (its arrays written
there), sent, and settled once: outputs or an error for its caller, who waits on one lock
(`wait`) or is told through `then` (an event loop's future). A worker lost while it holds
the job puts it back at the head of the line, unless it has cost two workers already. The
only moves (`STEPS`); `Job.to` makes every one of them, under the pool's Condition:

    from      to        when
    WAITING   PLACED    a worker's lane is free: the job takes it
    PLACED    SENT      its arrays are in the lane and the worker has the message
    PLACED    WAITING   the worker was replaced before the job reached it: back in line
    SENT      WAITING   the worker was lost holding it: back in line, to be retried
    any       SETTLED   outputs or an error given to the caller, or the caller left (the lane
                        of a withdrawn job stays held until its worker says so)
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from guard.errors import PoisonRequest, SessionClosed, WorkerFailed

if TYPE_CHECKING:
    from guard.pool.arena import Arena
    from guard.pool.children import Child
    from guard.pool.shared import Lane
    from guard.pool.slot import Slot

__all__ = ["STEPS", "Job", "Line", "Step"]

Array = NDArray[Any]
Outputs = dict[str, Array]


class Step(enum.Enum):
    """Where a request is on its way through the pool."""

    WAITING = "waiting"  # in the pool's line for a free lane
    PLACED = "placed"  # a lane is reserved; its arrays are being written
    SENT = "sent"  # its worker has it: serving it, or about to
    SETTLED = "settled"  # its outcome is out (or nobody waits for it any more)

    __hash__ = object.__hash__  # looked up for every request: C's identity hash, not Enum's


STEPS: dict[Step, frozenset[Step]] = {
    Step.WAITING: frozenset({Step.PLACED, Step.SETTLED}),
    Step.PLACED: frozenset({Step.SENT, Step.WAITING, Step.SETTLED}),
    Step.SENT: frozenset({Step.WAITING, Step.SETTLED}),
    Step.SETTLED: frozenset(),
}


def _held() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class Job:
    """One request: its arrays, how long it may wait for a worker, where it is, what went wrong.

    Every field but `outcome`, `cancelled` and `then` is guarded by the pool's Condition.
    """

    arrays: dict[str, Array]
    deadline: float | None  # time.monotonic() when waiting for a worker ends (None: never)
    unblamed: int  # workers that may still be lost while it is not in their hands, uncounted
    then: Callable[[Job], object] | None = None  # told once the outcome is out (its thread)
    outcome: Outputs | BaseException | None = None
    cancelled: bool = False  # its caller left: never sent if not sent yet, its reply dropped
    _ready: threading.Lock = field(default_factory=_held, repr=False)  # released with outcome
    step: Step = Step.WAITING
    slot: Slot | None = None  # where it is, PLACED or SENT
    child: Child | None = None
    lane: int = -1
    shm: Lane | None = None
    failures: list[tuple[str, Exception | None]] = field(default_factory=list)
    gone: bool = False  # its caller was interrupted: not retried, not answered
    waiter: int | None = None  # the thread that will wait for it (None: an event loop's call)
    following: bool = False  # its waiter sleeps on it and may be woken to lead
    nudge: Callable[[], object] | None = None  # told on delivery while its waiter leads
    arena: Arena | None = None  # where its outputs are copied (None: arrays of their own)

    def to(self, step: Step) -> bool:
        """The one place a job's step changes (the caller holds the pool's Condition).

        A settled job stays settled (False); any other move not in STEPS raises AssertionError.
        """
        if self.step is Step.SETTLED:
            return False
        if step not in STEPS[self.step]:
            raise AssertionError(f"job: no move {self.step} -> {step}")
        self.step = step
        if step is Step.WAITING:
            self.slot, self.child, self.lane = None, None, -1
        if step is not Step.PLACED:
            self.shm = None  # only its sender writes the lane
        return True

    def deliver(self, outcome: Outputs | BaseException) -> None:
        """Give the caller the outcome (once, after the move to SETTLED; never under the pool's
        Condition: `then` may take it)."""
        self.outcome = outcome
        self.signal()
        nudge = self.nudge
        if nudge is not None and threading.get_ident() != self.waiter:
            nudge()  # its waiter leads, asleep on the workers' pipes
        if self.then is not None:
            self.then(self)

    def signal(self) -> None:
        """Wake its waiter: to take its outcome, or to lead (a second signal before the waiter
        woke is the same wake)."""
        with contextlib.suppress(RuntimeError):  # released already
            self._ready.release()

    def sleep(self) -> bool:
        """Sleep until signalled; True once the outcome is out (it stays out for every later
        wait)."""
        self._ready.acquire()  # interrupted by a signal handler's exception, as Ctrl-C
        if self.outcome is None:
            return False
        self._ready.release()
        return True

    def wait(self) -> Outputs:
        """The outputs, once delivered (or raise the error delivered)."""
        while not self.sleep():
            pass
        return self.result()

    def result(self) -> Outputs:
        """The outputs delivered (or raise the error delivered)."""
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None, "no outcome yet"
        return outcome

    def failure(self, pool: str, *, closed: bool) -> Exception:
        """The error for a request that failed on two workers (or once, as its pool closed).

        Both workers lost (crashed or timed out): PoisonRequest. The second raised: its own
        error, noting the first failure. The first raised and the second was lost: WorkerFailed.
        """
        if closed:
            return SessionClosed(f"pool {pool!r} was closed during the request")
        (first, first_error), (second, second_error) = self.failures[:2]
        if second_error is not None:
            second_error.add_note(f"the request was retried after: {first}")
            return second_error
        if first_error is None:
            return PoisonRequest(
                f"pool {pool!r}: poison request, not retried again: it cost two workers: "
                f"first {first}; then {second}"
            )
        error = WorkerFailed(
            f"pool {pool!r}: the request failed on two workers: first {first}; then {second}"
        )
        error.__cause__ = first_error
        return error

    @property
    def done(self) -> bool:
        """True once the outcome is out."""
        return self.outcome is not None

    @property
    def dropped(self) -> bool:
        """True once nobody waits for its outcome (settled, or its caller left)."""
        return self.step is Step.SETTLED or self.cancelled


class Line:
    """The jobs waiting for a lane, first come first served, and when each stops waiting.

    Also watches the deadlines of jobs sent behind another request (they wait too, in their
    worker's second lane). Guarded by the pool's Condition.
    """

    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.jobs)

    def push(self, job: Job, *, front: bool = False) -> float | None:
        """Put a WAITING job in line (a retried one at the head); its deadline, if any."""
        if front:
            self.jobs.appendleft(job)
        else:
            self.jobs.append(job)
        return self.watch(job)

    def watch(self, job: Job) -> float | None:
        """Mind the job's deadline (while it waits, in line or in a second lane)."""
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), job))
        return job.deadline

    def first(self) -> Job | None:
        """The job at the head of the line; cancelled or settled ones are dropped on the way."""
        while self.jobs and self.jobs[0].dropped:
            self.jobs.popleft()
        return self.jobs[0] if self.jobs else None

    def pop(self) -> Job:
        """Take the head of the line (after `first`)."""
        return self.jobs.popleft()

    def remove(self, job: Job) -> None:
        """Take a job out of line wherever it is."""
        self.jobs.remove(job)

    def next_deadline(self) -> float | None:
        """The earliest deadline still watched."""
        heap = self._deadlines
        while heap and (heap[0][2].dropped or heap[0][2].deadline != heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[Job]:
        """The jobs whose deadline has passed, no longer watched (each once)."""
        found = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, job = heapq.heappop(heap)
            if not job.dropped and job.deadline == deadline:
                found.append(job)
        return found

    def clear(self) -> list[Job]:
        """Empty the line: the jobs that were in it."""
        jobs = list(self.jobs)
        self.jobs.clear()
        self._deadlines.clear()
        return jobs
