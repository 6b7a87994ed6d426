"""How a pool's requests reach its workers and their replies come back (`Dispatch`, the part
of `Pool` that moves requests), and the pool's watcher thread (`watch`).

A request becomes a job of plain arrays in the caller's thread, takes a free lane of a worker
(or waits in the pool's one line) and is sent. One thread at a time reads the workers' replies,
the leader: it settles each reply's job, frees its lane and hands it to the next job in line.
A caller that waits for its job leads while nobody else does (no hand-over between threads for
its own reply); otherwise it sleeps until its outcome comes or the leader, done with its own
job, asks it to lead. The watcher leads when no caller can: for an event loop's calls, and for
requests whose callers left. It also notices idle workers' deaths and every deadline. A job
whose worker was lost is retried once elsewhere, one that waited too long gets Unavailable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
import weakref
from collections.abc import KeysView, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import (
    InputMismatch,
    SessionClosed,
    Unavailable,
)
from guard.inputs import InputChecker
from guard.pool import wire
from guard.pool.children import Child
from guard.pool.job import Job, Line, Step
from guard.pool.shared import DEPTH, Lane
from guard.pool.slot import IN_SERVICE, Slot, Slots

__all__ = ["WATCHER", "WATCH_SECONDS", "Dispatch", "watch"]

Array = NDArray[Any]
Outputs = dict[str, Array]
Inputs = Mapping[str, Any] | Sequence[Any]
Watched = tuple[Slot, Child, tuple[Lane, ...]]

log = logging.getLogger("mnn_guard")

WATCH_SECONDS = 0.25  # the watcher's longest sleep: how late a deadline may be noticed
WATCHER = -1  # the watcher's token as the leader (a caller's is its thread's ident)


def watch(ref: weakref.ref[Dispatch], done: threading.Event, wake: int) -> None:
    """The pool's watcher: deadlines, idle workers' deaths, and the replies while it leads,
    until the pool closes or goes.

    One poll object for its life, told only of the pipes and processes that changed. It holds
    the pool only between waits, so that an unclosed pool can still be collected.
    """
    poller = select.poll()
    poller.register(wake, select.POLLIN)
    registered: set[int] = set()
    deferred: set[int] = set()  # ended workers a leading caller will hear of (its pipe's end)
    deferred_at = 0.0
    while not done.is_set():
        pool = ref()
        if pool is None:
            return
        watched, timeout, leading = pool._watched()
        del pool
        if deferred and time.monotonic() - deferred_at > WATCH_SECONDS:
            deferred.clear()  # look again: the caller may have left before it heard
        by_fd: dict[int, tuple[Watched, bool]] = {}  # fd -> (worker, whether it is its end)
        for item in watched:
            try:
                if leading:
                    by_fd[item[1].conn.fileno()] = (item, False)
                if item[1].process.sentinel not in deferred:
                    by_fd[item[1].process.sentinel] = (item, True)
            except (OSError, ValueError):  # closed meanwhile
                continue
        registered = _follow(poller, registered, by_fd.keys())
        try:
            events = poller.poll(math.ceil(timeout * 1000))
        except (OSError, ValueError):  # the pool went and its pipe with it
            return
        pool = ref()
        if pool is None:
            return
        readable: dict[int, Watched] = {}
        ended: dict[int, Watched] = {}
        for fd, _ in events:
            if fd == wake:
                with contextlib.suppress(OSError):
                    os.read(wake, 4096)
            elif fd in by_fd:
                item, end = by_fd[fd]
                if end and not leading and not pool._claim():
                    deferred.add(fd)  # a caller leads: it reads that pipe to its end
                    deferred_at = time.monotonic()
                    continue
                leading = True
                (ended if end else readable)[id(item)] = item
        try:
            for key, item in (readable | ended).items():
                pool._hear(*item, ended=key in ended)
            pool._expire()
        except Exception:  # a bug must not end the watcher: event loops' calls wait on it
            log.exception("pool %r: the watcher's work raised; it goes on watching", pool.name)
        if leading:
            pool._resign(WATCHER)
        del pool


def _follow(poller: select.poll, registered: set[int], wanted: KeysView[int]) -> set[int]:
    """Tell a poll object of the descriptors `wanted` instead of those `registered`: the new
    registered set."""
    if wanted == registered:
        return registered
    for fd in registered - wanted:
        poller.unregister(fd)
    for fd in wanted - registered:
        poller.register(fd, select.POLLIN)
    return set(wanted)


class Dispatch:
    """Requests through workers' lanes and replies back: the moving part of a `Pool`, which
    sets these attributes and provides `_retire` and `_publish`."""

    name: str
    processes: int
    request_timeout: float | None
    _wait_timeout: float
    _check: InputChecker
    _names: list[str]
    _slots: Slots
    _cond: threading.Condition
    _lock: threading.Lock
    _line: Line
    _wake_r: int  # the watcher's pipe
    _wake_w: int
    _wake_at: float
    _leader: int | None  # who reads the replies: a caller's thread, WATCHER, or nobody
    _followers: dict[Job, None]  # jobs whose callers sleep on them, in the order they came
    _nudge_r: int  # the leader's pipe: its job was settled elsewhere, or a worker joined
    _nudge_w: int
    _lead_poll: select.poll  # the leading caller's poll object (one leader at a time)
    _lead_fds: set[int]  # the workers' pipes it is told of

    def _retire(self, slot: Slot, child: Child, why: str, culprit: Job | None = None) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- requests

    def _job(self, inputs: Inputs, deadline: float | None) -> Job:
        """Check the inputs here (InputMismatch in the caller's thread): a job of plain arrays."""
        arrays = self._check(inputs)
        # np.asarray: a plain ndarray of the same data (a subclass is reduced to its base)
        plain = {n: np.asarray(a) for n, a in zip(self._names, arrays, strict=True)}
        return Job(plain, deadline, self.processes)

    def _admit(self, job: Job) -> None:
        """Place a job in a free lane and send it, or put it in line."""
        with self._lock:
            if self._slots.closed:
                raise SessionClosed(f"pool {self.name!r} is closed")
            if self._line.first() is not None or not self._place(job):
                failed = self._slots.failed()
                if failed is not None:
                    raise failed
                self._line.push(job)
                self._soon(job.deadline)
                return
        self._send(job)

    def _place(self, job: Job) -> bool:
        """Give a WAITING job the free lane waiting longest, if any (the caller holds _cond)."""
        slot = self._slots.take(DEPTH)
        if slot is None:
            return False
        job.to(Step.PLACED)
        job.slot, job.child, job.lane = slot, slot.child, slot.hold(job)
        job.shm = slot.lanes[job.lane]
        return True

    def _send(self, job: Job) -> None:
        """Write a PLACED job's arrays into its lane and send it (outside _cond: the lane is
        this job's until its reply)."""
        slot, child, shm = job.slot, job.child, job.shm
        assert slot is not None and child is not None and shm is not None
        problem: BaseException | None = None
        interrupted: BaseException | None = None
        try:
            data = wire.encode(wire.Run(job.arrays, job.lane), shm)
        except Exception as exc:
            problem = InputMismatch(
                f"pool {self.name!r}: the request cannot be encoded for a worker: {exc!r}"
            )
            problem.__cause__ = exc
        except BaseException as exc:  # a signal handler's (Ctrl-C) while the arrays were copied
            interrupted = exc
        now = time.monotonic()
        dead = False
        successor: Job | int | None = None
        with self._lock:
            placed = slot.child is child and slot.held.get(job.lane) is job
            if not placed or job.dropped or problem is not None or interrupted is not None:
                if placed:
                    slot.let_go(job.lane, now)
                problem = self._unplaced(job, problem, interrupted=interrupted is not None)
            else:
                try:
                    child.conn.send_bytes(data)
                except OSError:  # the worker is gone, before it had this job
                    slot.let_go(job.lane, now)
                    job.to(Step.WAITING)
                    dead = True
                else:
                    job.to(Step.SENT)
                    if not slot.sent(job.lane, now):  # behind another: it waits still
                        self._soon(self._line.watch(job))
                    elif self.request_timeout is not None:
                        self._soon(now + self.request_timeout)
                    if self._leader is None:
                        successor = self._successor(job)
        if problem is not None:
            job.deliver(problem)
        if successor is not None:
            self._hand_over(successor)
        if dead:
            self._lost(slot, child)
            self._retry(job, unblamed=True)
        self._pump()
        if interrupted is not None:
            raise interrupted

    def _unplaced(
        self, job: Job, problem: BaseException | None, *, interrupted: bool
    ) -> BaseException | None:
        """A PLACED job that was not sent, its lane let go: settled (the error its caller gets,
        if any) or back at the head of the line. The caller holds _cond."""
        if interrupted and job.waiter == threading.get_ident():
            job.gone = True  # its caller is the one interrupted (Ctrl-C): it waits no more
            job.to(Step.SETTLED)
            return None
        if problem is None and not job.dropped and self._slots.closed:
            problem = SessionClosed(f"pool {self.name!r} was closed during the request")
        if job.dropped or problem is not None:
            return problem if job.to(Step.SETTLED) else None
        job.to(Step.WAITING)  # its worker was replaced meanwhile, or another caller's thread
        self._soon(self._line.push(job, front=True))  # was interrupted: not its fault
        return None

    def _pump(self) -> None:
        """Give free lanes to the jobs in line, first come first served."""
        while self._line.jobs:  # read unlocked: a job put in line found no lane under the lock
            with self._lock:
                job = self._line.first()
                if job is None or self._slots.closed or not self._place(job):
                    return
                self._line.pop()
            self._send(job)

    def _retry(self, job: Job, *, unblamed: bool = False) -> None:
        """Put a job whose worker was lost back at the head of the line, or fail it for good
        after two workers (`unblamed`: the loss was not its fault, while workers last)."""
        if unblamed:
            if job.unblamed > 0:
                job.unblamed -= 1
            else:
                job.failures.append(("its worker was lost before it started", None))
        with self._lock:
            if job.step is Step.SETTLED or job.gone:
                return
            if len(job.failures) < 2 and not self._slots.closed:
                if job.step is not Step.WAITING:
                    job.to(Step.WAITING)
                if job.deadline is not None:  # a retry waits its own Policy.wait_timeout
                    job.deadline = time.monotonic() + self._wait_timeout
                self._line.push(job, front=True)
                self._soon(job.deadline)
                return
            job.to(Step.SETTLED)
        job.deliver(job.failure(self.name, closed=self._slots.closed))

    def _settle(self, job: Job, outcome: Outputs | BaseException) -> None:
        """Settle a job once and give its caller the outcome."""
        with self._lock:
            settled = job.to(Step.SETTLED)
        if settled:
            job.deliver(outcome)

    def _abandon(self, job: Job) -> None:
        """The caller of a job was interrupted: drop it, and retire its worker if it has it
        (its reply would come for nobody, and the worker may be the reason)."""
        with self._lock:
            job.gone = True
            step, slot, child = job.step, job.slot, job.child
            if step is Step.WAITING:
                self._line.remove(job)
            job.to(Step.SETTLED)
        if step is Step.SENT and slot is not None and child is not None:
            self._retire(slot, child, "a request was interrupted")

    # -------------------------------------------------------------- leading

    def _open_pipes(self) -> weakref.finalize[..., Dispatch]:
        """The watcher's and the leader's pipes, with nobody leading yet (closes them)."""
        # the watcher sleeps on workers' processes (and pipes, while it leads) and on its
        # pipe, written to when it must look again sooner (a new worker, a deadline, close)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wake_at = math.inf  # when the watcher looks again at the latest
        self._leader = None
        self._followers = {}
        self._nudge_r, self._nudge_w = os.pipe()
        os.set_blocking(self._nudge_r, False)
        os.set_blocking(self._nudge_w, False)
        self._lead_poll = select.poll()
        self._lead_poll.register(self._nudge_r, select.POLLIN)
        self._lead_fds = set()
        fds = (self._wake_r, self._wake_w, self._nudge_r, self._nudge_w)
        return weakref.finalize(self, _close_fds, *fds)

    def _await(self, job: Job) -> Outputs:
        """Wait for a job this thread sent: leading while nobody else does, else asleep until
        its outcome comes or it is asked to lead (its caller resigns when done: `_resign`)."""
        me = threading.get_ident()
        while True:
            with self._lock:
                if job.outcome is not None:
                    break
                if self._leader is None:
                    self._leader = me
                leading = self._leader == me
                job.following = not leading
                if job.following:
                    self._followers[job] = None
            try:
                if leading:
                    self._lead(job)
                elif job.sleep():
                    break
            finally:
                if job.following:
                    with self._lock:
                        job.following = False
                        self._followers.pop(job, None)
        return job.result()

    def _lead(self, job: Job) -> None:
        """Read the workers' replies in this thread until `job` has its outcome."""
        poller, fds = self._lead_poll, self._lead_fds
        job.nudge = self._nudge
        try:
            while job.outcome is None:
                by_fd: dict[int, Watched] = {}
                for item in self._serving():
                    with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                        by_fd[item[1].conn.fileno()] = item
                fds = _follow(poller, fds, by_fd.keys())
                for fd, _ in poller.poll(WATCH_SECONDS * 1000):
                    if fd == self._nudge_r:
                        with contextlib.suppress(OSError):
                            os.read(fd, 4096)
                    elif fd in by_fd:
                        self._hear(*by_fd[fd], ended=False)
        finally:
            job.nudge = None
            self._lead_fds = fds

    def _claim(self) -> bool:
        """The watcher takes the lead if nobody has it; True if it leads."""
        with self._lock:
            if self._leader is None:
                self._leader = WATCHER
            return self._leader == WATCHER

    def _resign(self, token: int) -> None:
        """Stop leading, if `token` leads: while workers hold requests, a sleeping caller leads
        next, else the watcher."""
        with self._lock:
            if self._leader != token:
                return
            self._leader = None
            successor = self._successor() if any(s.held for s in self._slots.all) else None
            if successor == token:
                return  # the watcher goes on leading
        if successor is not None:
            self._hand_over(successor)

    def _successor(self, job: Job | None = None) -> Job | int | None:
        """Make the next leader while nobody leads (the caller holds _cond): `job`'s caller
        if it sent it (None: it leads once it waits), a caller asleep on its job (`job`'s
        first), else the watcher. What `_hand_over` must wake."""
        if job is not None and job.waiter == threading.get_ident():
            self._leader = job.waiter
            return None
        follower = job if job is not None and job.following else None
        if follower is None:
            follower = next((j for j in self._followers if j.outcome is None), None)
        if follower is not None and follower.waiter is not None:
            self._leader = follower.waiter
            return follower
        self._leader = WATCHER
        return WATCHER

    def _hand_over(self, successor: Job | int) -> None:
        """Wake the leader `_successor` made (outside _cond)."""
        if isinstance(successor, Job):
            successor.signal()
        else:
            self._wake()

    def _nudge(self) -> None:
        """Make the leading caller look again (its job was settled elsewhere, or a worker
        joined)."""
        with contextlib.suppress(OSError):
            os.write(self._nudge_w, b"\0")

    # -------------------------------------------------------------- the watcher's work

    def _soon(self, deadline: float | None) -> None:
        """Wake the watcher if `deadline` comes before it would look again."""
        if deadline is not None and deadline < self._wake_at:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _serving(self) -> list[Watched]:
        """The workers whose replies and ends are heard: in service, or closed with requests
        in hand."""
        with self._lock:
            return [
                (s, s.child, s.lanes)
                for s in self._slots.all
                if s.child is not None and (s.state in IN_SERVICE or s.held)
            ]

    def _watched(self) -> tuple[list[Watched], float, bool]:
        """The workers to watch, how long the watcher may sleep, and whether it leads."""
        watched = self._serving()
        now = time.monotonic()
        with self._lock:
            wake = now + WATCH_SECONDS
            deadline = self._line.next_deadline()
            if deadline is not None:
                wake = min(wake, deadline)
            if self.request_timeout is not None:
                for slot in self._slots.all:
                    if slot.order:
                        wake = min(wake, slot.started + self.request_timeout)
            self._wake_at = wake
            leading = self._leader == WATCHER
        return watched, max(0.0, wake - now), leading

    def _hear(self, slot: Slot, child: Child, lanes: tuple[Lane, ...], *, ended: bool) -> None:
        """Read the next reply of a worker (every one left, once it `ended`); a worker whose
        pipe closed is lost."""
        heard = False  # the reply in hand was dealt with
        try:
            while True:
                heard = False
                data = child.conn.recv_bytes()
                try:
                    reply = wire.decode(data, lanes)  # views, copied out in _answered
                except Exception as exc:
                    reason = f"sent a reply that could not be decoded: {exc!r}"
                    heard = True
                    self._lost(slot, child, f"{slot.label} {reason}")
                    return
                self._answered(slot, child, reply)
                heard = True
                if not ended:
                    return  # the next poll says if there is more
        except (EOFError, OSError):
            heard = True
        finally:
            if not heard:  # interrupted (Ctrl-C) with a reply half read or in hand: its
                # request is retried elsewhere, rather than waited for in vain
                self._lost(slot, child, f"{slot.label}: reading its reply was interrupted")
        self._lost(slot, child)

    def _answered(self, slot: Slot, child: Child, reply: object) -> None:
        """One reply of a worker in service: settle its job, free its lane, serve the line."""
        if not isinstance(reply, wire.Done | wire.Raised | wire.Refused | wire.Withdrawn) or (
            reply.lane is None
        ):
            what = f"{slot.label} answered a request with a {type(reply).__name__}"
            self._lost(slot, child, what)
            return
        lane = reply.lane
        if isinstance(reply, wire.Done):  # copied out while its job still holds the lane
            with self._lock:
                job = slot.held.get(lane) if slot.child is child else None
            arena = job.arena if job is not None else None
            outputs = {
                n: a.copy() if arena is None else arena.copy(a) for n, a in reply.outputs.items()
            }
            reply = wire.Done(outputs, reply.report, lane)
        now = time.monotonic()
        with self._lock:
            if slot.child is not child:
                return
            job = slot.let_go(lane, now)
            if not isinstance(reply, wire.Withdrawn):
                slot.requests += 1
            changed = slot.note(reply.report)
            label = slot.label
        if changed:
            self._publish()
        if job is not None:
            self._outcome(job, slot, child, label, reply)
        self._pump()

    def _outcome(self, job: Job, slot: Slot, child: Child, label: str, reply: wire.Reply) -> None:
        """What one reply means for its job (and for its worker, if it raised)."""
        if isinstance(reply, wire.Done):
            self._settle(job, reply.outputs)
        elif isinstance(reply, wire.Refused):
            why = f"pool {self.name!r}: {label} refused the request: {reply.reason}"
            self._settle(job, InputMismatch(why))
        elif isinstance(reply, wire.Raised):
            error = reply.error
            error.add_note(f"raised in pool {self.name!r} by {label}")
            if isinstance(error, InputMismatch):
                self._settle(job, error)
                return
            why = f"{label} raised {type(error).__name__}: {error}"
            job.failures.append((why, error))
            with self._lock:
                job.to(Step.WAITING)
            self._retire(slot, child, why)
            self._retry(job)

    def _lost(self, slot: Slot, child: Child, why: str | None = None) -> None:
        """A worker that ended or broke its protocol: retire it, blaming the request in hand."""
        with self._lock:
            if slot.child is not child:
                return
            culprit = slot.in_hand()
            idle = not slot.held
        if why is None:
            why = f"{slot.label} {child.exit_text()}" + (" while idle" if idle else "")
        self._retire(slot, child, why, culprit)

    def _expire(self) -> None:
        """Jobs that waited too long for a worker get Unavailable (one sent behind another is
        withdrawn); a worker over request_timeout is killed."""
        now = time.monotonic()
        late: list[tuple[Job, Unavailable]] = []
        overdue: list[tuple[Slot, Child, Job | None]] = []
        with self._lock:
            for job in self._line.due(now):
                slot = job.slot
                if job.step is Step.WAITING:
                    self._line.remove(job)
                elif job.step is not Step.SENT or slot is None or slot.in_hand() is job:
                    continue  # its worker has it: it is served, or timed out below
                elif slot.child is job.child and job.child is not None:
                    wire.send(job.child.conn, wire.Withdraw(job.lane))  # its lane comes back
                job.to(Step.SETTLED)
                late.append((job, self._slots.unavailable(self._wait_timeout)))
            if self.request_timeout is not None:
                for slot in self._slots.all:
                    late_slot = now - slot.started > self.request_timeout
                    if slot.order and late_slot and slot.state in IN_SERVICE and slot.child:
                        overdue.append((slot, slot.child, slot.in_hand()))
        for job, error in late:
            job.deliver(error)
        for slot, child, culprit in overdue:
            why = f"{slot.label} exceeded request_timeout={self.request_timeout:g} s and was killed"
            self._retire(slot, child, why, culprit)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
