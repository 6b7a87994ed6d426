"""The parent of a pool of guarded worker processes: `Pool`, the part its callers hold.

The parent checks every request against the probe and writes the plain arrays MNN will read
into a worker's shared-memory lane; each worker builds one guarded session and serves the
requests its pipe names (`guard.pool.worker`). What crosses a pipe is in `guard.pool.wire`;
each worker has a slot with states of its own (`guard.pool.slot`); each request is a job
(`guard.pool.job`) that waits in one line while no lane is free; how jobs move between the
caller, the lanes and the replies is `guard.pool.dispatch`.

One thread of the pool (its watcher) reads every worker's replies, copies the outputs out of
the lane, settles the caller's future and hands the freed lane to the next job in line; it
also notices deaths and deadlines. A caller's thread (or the event loop, for `arun`) only
checks its inputs, writes them into a free lane and sends a short message, or joins the line:
no thread per call, and a worker has its next request before it answers the one in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    SessionClosed,
    Unavailable,
)
from guard.health import HEALTH, Entry, HealthTable
from guard.inputs import InputChecker
from guard.ladder import Policy
from guard.names import check_name
from guard.pool.arena import Arena, Blocks
from guard.pool.children import Child, remove_stash, stash_probe
from guard.pool.dispatch import WATCH_SECONDS, Dispatch, watch
from guard.pool.job import Job, Line, Step
from guard.pool.shared import ALIGN, DEPTH
from guard.pool.slot import Slot, Slots, SlotState, SlotStatus, stop
from guard.pool.worker import worker_main
from guard.session import Factory
from guard.wrapping import check_probe
from probes import Probe

__all__ = [
    "IMPORT_SECONDS",
    "MAX_WAITING",
    "START_METHODS",
    "STOP_SECONDS",
    "WATCH_SECONDS",
    "Pool",
]

Array = NDArray[Any]
Outputs = dict[str, Array]
Inputs = Mapping[str, Any] | Sequence[Any]
log = logging.getLogger("mnn_guard")

START_METHODS = ("spawn", "forkserver")
IMPORT_SECONDS = 60.0  # allowance for a spawned worker to import numpy, scipy and MNN
STOP_SECONDS = 5.0  # how long close() waits for a worker to exit before killing it
MAX_WAITING = 256  # default bound on async calls waiting for a worker (beyond one per worker)


def _lane_bytes(probe: Probe) -> int:
    """Room for the largest canary case's inputs and outputs, each aligned."""
    sizes = [
        sum(-(-a.nbytes // ALIGN) * ALIGN for a in (*c.inputs.values(), *c.outputs.values()))
        for c in probe.cases
    ]
    return max(1, *sizes)


class Pool(Dispatch):
    """Guarded worker processes: each builds its own session with `guard.wrap` after spawn.

    Nothing MNN crosses a process boundary: the factory and policy are pickled to the workers
    (`guard.mnn_factory` and `guard.testing.FaultyFactory` pickle), the probe goes through a
    private temp file. Inputs and outputs go through shared memory (two anonymous segments per
    worker, grown on demand; nothing is left in /dev/shm whoever dies), the pipe carries only
    where they lie. Each worker gets its next request while it serves one, so it never waits
    for the parent; `run()` and `arun()` return owned arrays. `map()`'s results are owned by
    the call: carved from blocks of memory this pool reuses once a call's results are gone.
    A caller waiting for its reply reads the workers' replies itself while no other does.

    Requests are checked here first: a bad one raises InputMismatch at once and no worker sees
    it. A worker that crashes or exceeds `request_timeout` is killed and replaced, and its
    request retried once on another worker; a request that costs two workers is a
    PoisonRequest and is not retried again. A worker whose session raises (its session FAILED,
    a forward failed) is replaced too and the request retried once; the caller gets the
    worker's exception itself (same type, message and attempts, with a note naming the worker).
    A caller waits at most `policy.wait_timeout` for a worker to start its request
    (Unavailable); a request sent behind another is withdrawn if that one takes longer.

    `arun` and `amap` are the same calls for asyncio: the event loop only checks the inputs and
    writes them to shared memory (or lines them up). At most `processes + max_waiting` async
    calls are admitted at once; one more raises Unavailable at once (shed load rather than
    queue without end). A cancelled `arun` leaves the pool serving: a request not yet sent is
    dropped; one in flight is finished by its worker and its reply discarded. Inputs are read
    when they are sent: do not change the arrays until the call returns.

    Readiness: the pool is one entry of `health` (default: the process's table, which
    `guard.serve` and `guard.asgi_app` answer for), named `name`: ready while every worker
    serves; its state is the worst worker's (STARTING while one is replaced, FAILED when a
    replacement could not start), and it lists its workers. Workers' own sessions stay out of
    readiness. A worker that dies while idle is noticed at once and replaced.

    Metrics: workers use prometheus_client as usual. Set PROMETHEUS_MULTIPROC_DIR (an empty
    directory) in the environment before creating the pool and serve it with
    `guard.serve(multiprocess_dir=...)`; the pool drops the live gauges of workers it retires.

    >>> with guard.Pool(factory, probe, processes=2, name="vocoder") as pool:  # doctest: +SKIP
    ...     wav = pool.run({"mel": mel})["wav"]
    ...     pool.status()
    """

    def __init__(
        self,
        factory: Factory,
        probe: Probe,
        *,
        processes: int = 2,
        policy: Policy | None = None,
        name: str = "pool",
        request_timeout: float | None = 60.0,
        start_method: str = "spawn",
        max_waiting: int = MAX_WAITING,
        health: HealthTable | None = None,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"processes must be a positive int, got {processes!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
        if request_timeout is not None and request_timeout <= 0:
            raise ConfigError(f"request_timeout must be > 0 or None, got {request_timeout}")
        if start_method not in START_METHODS:
            raise ConfigError(
                f"start_method must be one of {START_METHODS}, got {start_method!r} "
                "(a forked worker hangs in MNN once the parent has loaded a module)"
            )
        check_name(name, HEALTH if health is None else health)
        policy = policy or Policy()
        check_probe(factory, probe)
        try:
            pickle.dumps((factory, policy))
        except Exception as exc:
            raise ConfigError(
                f"the factory and policy must pickle to reach spawned workers: {exc!r} "
                "(guard.mnn_factory pickles; a lambda or closure does not)"
            ) from exc
        self.name = name
        self.processes = processes
        self.request_timeout = request_timeout
        self.max_waiting = max_waiting
        self._wait_timeout = policy.wait_timeout
        self._check = InputChecker(probe.inputs, check_finite=policy.check_finite_inputs)
        self._names = probe.input_names
        probe_path = stash_probe(probe)
        self._unstash = weakref.finalize(self, remove_stash, probe_path)
        # the values of every request are checked here, once: a worker checks names and shapes
        unchecked = dataclasses.replace(policy, check_finite_inputs=False)
        self._args = (factory, probe_path, unchecked, name)
        self._lane_bytes = _lane_bytes(probe)
        self._ctx = multiprocessing.get_context(start_method)
        attempts = len(policy.ladder) * (1 + policy.reinit_attempts)
        self._startup_timeout = (
            None if policy.init_timeout is None else IMPORT_SECONDS + attempts * policy.init_timeout
        )
        self._slots = Slots(name, processes, policy.ladder)
        # Everything below is guarded by _cond, the slots' Condition (or its plain _lock)
        self._cond = self._slots.cond
        self._lock = self._slots.lock
        self._line = Line()
        self._blocks = Blocks()  # where map() keeps results (guard.pool.arena)
        self._starters: set[threading.Thread] = set()
        self._replaced = 0
        self._pending = 0  # async calls admitted and not finished
        # readiness: one entry named after the pool, published in order by _publish
        self._health = health or HEALTH
        self._publishing = threading.Lock()
        self._published: Entry | None = None
        self._unpipe = self._open_pipes()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._start()

    # -------------------------------------------------------------- workers

    def _start(self) -> None:
        """Start every worker and wait for all to serve, watching them from then on."""
        try:
            for slot in self._slots.all:
                slot.spawn(self._ctx, worker_main, self._args, self._lane_bytes)
            self._publish()
            for slot in self._slots.all:
                self._ready(slot)
        except BaseException:
            self.close()
            for slot in self._slots.all:  # close() killed those still starting; reap them here
                stop(slot.child)
            raise
        self._watcher = threading.Thread(
            target=watch,
            args=(weakref.ref(self), self._stop_watch, self._wake_r),
            name=f"mnn-guard-{self.name}-watch",
            daemon=True,
        )
        self._watcher.start()

    def _ready(self, slot: Slot, *, replacement: bool = False) -> bool:
        """Wait for a spawned worker's session and put its slot in service (False: closed); a
        `replacement` is counted before readiness can show it."""
        report = slot.await_ready(self._startup_timeout)
        with self._lock:
            slot.note(report)
            serving = slot.to(SlotState.IDLE)
            if serving and replacement:
                self._replaced += 1
        self._publish()
        if serving:
            self._wake()  # one more pipe to watch
            self._nudge()
            self._pump()
        return serving

    def _retire(self, slot: Slot, child: Child, why: str, culprit: Job | None = None) -> None:
        """Stop a slot's failed worker, start its replacement and put the requests it held
        back in line: `culprit` blamed for the loss, the others not (up to one per worker).

        Whoever moves the slot from this worker first does it; a closed slot's worker is only
        killed (close() reaps it) and its requests answered SessionClosed.
        """
        now = time.monotonic()
        with self._lock:
            if slot.child is not child:
                return  # retired already
            held = [slot.held[lane] for lane in slot.order]
            replacing = slot.to(SlotState.STARTING)
            if not replacing:
                for job in held:
                    slot.let_go(job.lane, now)
        if not replacing:
            child.kill()
            closed = SessionClosed(f"pool {self.name!r} is closed")
            for job in held:
                self._settle(job, closed)
            return
        stop(child)
        self._publish()
        log.warning("pool %s: %s; replacing it", self.name, why)
        thread = threading.Thread(
            target=self._replace,
            args=(slot,),
            name=f"mnn-guard-{self.name}-restart",
            daemon=True,
        )
        with self._lock:
            self._starters.add(thread)
        thread.start()
        for job in held:  # after the log and the replacement: a caller may close at once
            if job is culprit:
                job.failures.append((why, None))
            elif job.unblamed > 0:
                job.unblamed -= 1
            else:
                job.failures.append((why, None))
            self._retry(job)
        self._pump()

    def _replace(self, slot: Slot) -> None:
        """Start a replacement worker (a background thread); on failure the slot is FAILED."""
        try:
            slot.spawn(self._ctx, worker_main, self._args, self._lane_bytes)
            serving = self._ready(slot, replacement=True)
        except Exception as exc:
            with self._lock:
                slot.error = exc  # readiness says why while the slot is FAILED
                failed = slot.to(SlotState.FAILED)
                none_left = self._slots.failed()
                stranded = self._line.clear() if none_left is not None else []
                for job in stranded:
                    job.to(Step.SETTLED)
            if failed:
                self._publish()
                log.error(
                    "pool %s: replacement for worker %d failed: %s", self.name, slot.index, exc
                )
            for job in stranded:
                job.deliver(none_left)  # type: ignore[arg-type]
        else:
            if not serving:  # the pool closed meanwhile
                slot.ask_to_stop()
                stop(slot.child, STOP_SECONDS)
        finally:
            with self._lock:
                self._starters.discard(threading.current_thread())
                self._cond.notify_all()

    # -------------------------------------------------------------- serving

    def run(self, inputs: Inputs) -> Outputs:
        """Run one request on a worker; returns owned numpy arrays by output name."""
        job = self._job(inputs, time.monotonic() + self._wait_timeout)
        job.waiter = threading.get_ident()
        try:
            self._admit(job)
            try:
                return self._await(job)
            except BaseException:
                if not job.done:  # interrupted while it waited (Ctrl-C)
                    self._abandon(job)
                raise
        finally:
            self._resign(job.waiter)

    def map(self, inputs: Iterable[Inputs]) -> list[Outputs]:
        """Run many requests spread over every worker, two in each worker's hands at a time (its
        next one waits behind the one it serves, however long that takes); results in input
        order. The first error is raised; requests not yet sent are dropped."""
        window = DEPTH * self.processes
        jobs: deque[Job] = deque()
        results: list[Outputs] = []
        me = threading.get_ident()  # it leads from one wait to the next while nobody else does
        arena = Arena(self._blocks)  # results kept together: memory populated at once
        lazy = not isinstance(inputs, Sequence)  # its next item may take any time to come
        try:
            for item in inputs:
                if len(jobs) >= window:
                    results.append(self._await(jobs.popleft()))
                job = self._job(item, None)
                job.waiter, job.arena = me, arena
                self._admit(job)
                jobs.append(job)
                if lazy:
                    self._resign(me)  # others' replies do not wait for the iterable
            while jobs:
                results.append(self._await(jobs.popleft()))
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise
        finally:
            self._resign(me)
        return results

    # ------------------------------------------------------------- asyncio

    async def arun(self, inputs: Inputs) -> Outputs:
        """`run` for asyncio: the loop only checks the inputs and writes them to a worker's lane
        (or lines them up); owned arrays back.

        Raises InputMismatch at once for bad inputs, Unavailable at once when
        `processes + max_waiting` calls are already admitted, or when no worker started the
        request within `Policy.wait_timeout`; otherwise whatever `run` raises. Cancelling the
        await drops a request not yet sent; one in flight finishes in its worker and its reply
        is discarded: the worker goes on serving others.
        """
        job = self._job(inputs, time.monotonic() + self._wait_timeout)
        limit = self.processes + self.max_waiting
        with self._lock:
            if self._pending >= limit and not self._slots.closed:
                raise Unavailable(
                    f"pool {self.name!r}: {self._pending} calls are already in flight or waiting "
                    f"(processes + max_waiting = {limit}); shed load or raise max_waiting"
                )
            self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[Outputs] = loop.create_future()
            job.then = partial(_tell, loop, answer)
            self._admit(job)
            return await answer
        except asyncio.CancelledError:
            job.cancelled = True  # not sent if not sent yet; its reply dropped
            raise
        finally:
            self._finished()

    def _finished(self) -> None:
        """One admitted async call ended (served, failed or cancelled)."""
        with self._lock:
            self._pending -= 1

    async def amap(self, inputs: Iterable[Inputs]) -> list[Outputs]:
        """`map` for asyncio: every request through `arun`, two per worker at a time; in order.

        The first error is raised and the requests not yet done are cancelled.
        """
        items = list(inputs)
        turns = asyncio.Semaphore(DEPTH * self.processes)

        async def one(item: Inputs) -> Outputs:
            async with turns:
                return await self.arun(item)

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # none left running
            raise

    # ------------------------------------------------------------ readiness

    def _publish(self) -> None:
        """Put the pool's entry, made from its slots, into its health table if it changed."""
        with self._publishing:  # in order
            last = self._published
            entry = self._slots.entry(last.since if last is not None else 0.0)
            if entry is None or entry == last:
                return
            if last is None or last.state is not entry.state:
                entry = dataclasses.replace(entry, since=time.time())
            self._published = entry
            self._health.record(self, entry)

    def status(self) -> list[SlotStatus]:
        """Every slot in order, truthful through replacements; [] once closed.

        A slot in service shows its worker's session state and rung as of its last reply
        (they change only with requests); a replacement being started shows STARTING, its
        pid once it has one; a slot whose replacement failed shows FAILED with pid None.
        """
        return self._slots.status()

    @property
    def replaced(self) -> int:
        """How many replacement workers started serving after a crash, timeout or error."""
        return self._replaced

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop every worker and reap it; idempotent. Later `run()` calls raise SessionClosed.

        Requests in flight are answered if their workers finish within STOP_SECONDS; workers
        still starting are killed, and nothing is logged about them.
        """
        before = self._slots.close()
        if not before:
            return  # closed already
        closed = SessionClosed(f"pool {self.name!r} is closed")
        with self._lock:
            starters = list(self._starters)
            waiting = self._line.clear()
            for job in waiting:
                job.to(Step.SETTLED)
        for job in waiting:
            job.deliver(closed)
        with self._publishing:  # after any publication in progress
            self._health.forget(self.name, owner=self)
        for slot, state, child in before:
            if state is SlotState.IDLE:
                slot.ask_to_stop()
            elif state is SlotState.STARTING and child is not None:
                child.kill()  # its starting thread reaps it
        deadline = time.monotonic() + STOP_SECONDS
        with self._lock:  # the watcher answers the requests in flight meanwhile
            self._cond.wait_for(lambda: not any(s.held for s in self._slots.all), STOP_SECONDS)
            held = [job for s in self._slots.all for job in s.held.values()]
            for slot in self._slots.all:
                slot.held.clear()
                slot.order.clear()
        self._stop_watch.set()
        self._wake()
        self._nudge()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(STOP_SECONDS)
        for job in held:  # their workers hang: killed below
            self._settle(job, closed)
        for slot, state, child in before:
            if state is not SlotState.STARTING and child is not None:
                if state is not SlotState.IDLE:
                    slot.ask_to_stop()  # answered by now, or killed below
                stop(child, max(0.0, deadline - time.monotonic()))
        for thread in starters:
            thread.join(STOP_SECONDS + 1.0)
        with self._lock:
            for slot in self._slots.all:
                slot.lanes = ()  # their memory goes with the last map of them
        self._blocks.clear()
        self._unstash()
        self._unpipe()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._slots.closed else f"{self.processes} worker(s)"
        return f"<Pool {self.name!r} {state}>"


def _tell(loop: asyncio.AbstractEventLoop, answer: asyncio.Future[Outputs], job: Job) -> None:
    """Settle an event loop's future with a job's outcome, from any thread."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
        loop.call_soon_threadsafe(_resolve, answer, job)


def _resolve(answer: asyncio.Future[Outputs], job: Job) -> None:
    """On the loop: the future gets the job's outcome, unless its caller left."""
    if answer.done():
        return
    outcome = job.outcome
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)  # type: ignore[arg-type]
