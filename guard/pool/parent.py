"""The parent of a pool of guarded worker processes: `Pool`, the part its callers hold.

The parent checks every request against the probe and sends workers only the plain arrays MNN
will read; each worker builds one guarded session and serves requests from its pipe
(`guard.pool.worker`). What crosses a pipe is in `guard.pool.wire`; each worker has a slot
with states of its own (`guard.pool.slot`).

The async face (`arun`, `amap`) keeps an event loop free: the loop itself only checks and
pickles the inputs (tens of microseconds, whatever the forward costs); a thread of the pool
waits for a worker and its reply, with the GIL released, while the forward runs in the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import pickle
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    InputMismatch,
    PoisonRequest,
    SessionClosed,
    Unavailable,
    WorkerFailed,
)
from guard.health import HEALTH, Entry, HealthTable
from guard.inputs import InputChecker
from guard.ladder import Policy
from guard.names import check_name
from guard.pool import wire
from guard.pool.children import Child, remove_stash, stash_probe
from guard.pool.slot import Lost, Slot, Slots, SlotState, SlotStatus, Undelivered, stop
from guard.pool.worker import worker_main
from guard.session import Factory
from guard.wrapping import check_probe
from probes import Probe

__all__ = ["IMPORT_SECONDS", "MAX_WAITING", "START_METHODS", "STOP_SECONDS", "Pool"]

Array = NDArray[Any]
Inputs = Mapping[str, Any] | Sequence[Any]
log = logging.getLogger("mnn_guard")

START_METHODS = ("spawn", "forkserver")
IMPORT_SECONDS = 60.0  # allowance for a spawned worker to import numpy, scipy and MNN
STOP_SECONDS = 5.0  # how long close() waits for a worker to exit before killing it
WATCH_SECONDS = 0.25  # how soon a worker that died while idle is noticed, at the latest
MAX_WAITING = 256  # default bound on async calls waiting for a worker (beyond one per worker)


def _watch(ref: weakref.ref[Pool], done: threading.Event) -> None:
    """Replace idle workers that die (a kill, the OOM killer) until the pool closes or goes.

    Busy workers are their request's to watch; this thread holds the pool only between waits.
    """
    while not done.is_set():
        pool = ref()
        if pool is None:
            return
        idle = pool._slots.idle()
        del pool
        sentinels = {child.process.sentinel: (slot, child) for slot, child in idle}
        if not sentinels:
            done.wait(WATCH_SECONDS)
            continue
        dead = wait(list(sentinels), WATCH_SECONDS)
        pool = ref()
        if pool is None:
            return
        for sentinel in dead:
            slot, child = sentinels[sentinel]  # type: ignore[index]
            pool._retire(slot, "", idle=child)  # the message is read once the slot is checked
        del pool


class Pool:
    """Guarded worker processes: each builds its own session with `guard.wrap` after spawn.

    Nothing MNN crosses a process boundary: the factory and policy are pickled to the workers
    (`guard.mnn_factory` and `guard.testing.FaultyFactory` pickle), the probe goes through a
    private temp file, inputs and outputs travel as numpy arrays over one pipe per worker.

    Requests are checked here first: a bad one raises InputMismatch at once and no worker sees
    it. A worker that crashes or exceeds `request_timeout` is killed and replaced, and its
    request retried once on another worker; a request that costs two workers is a
    PoisonRequest and is not retried again. A worker whose session raises (its session FAILED,
    a forward failed) is replaced too and the request retried once; the caller gets the
    worker's exception itself (same type, message and attempts, with a note naming the worker).
    A caller waits at most `policy.wait_timeout` for a free worker (Unavailable).

    `arun` and `amap` are the same calls for asyncio: the event loop only checks and pickles
    the inputs. At most `processes + max_waiting` async calls are admitted at once; one more
    raises Unavailable at once (shed load rather than queue without end). A cancelled `arun`
    leaves the pool serving: a request not yet sent is dropped; one in flight is finished by
    the pool's thread and its reply discarded, so it never reaches another caller.

    Readiness: the pool is one entry of `health` (default: the process's table, which
    `guard.serve` and `guard.asgi_app` answer for), named `name`: ready while every worker
    serves; its state is the worst worker's (STARTING while one is replaced, FAILED when a
    replacement could not start), and it lists its workers. Workers' own sessions stay out of
    readiness. A worker that dies while idle is noticed within WATCH_SECONDS and replaced.

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
        self._args = (factory, probe_path, policy, name)
        self._ctx = multiprocessing.get_context(start_method)
        attempts = len(policy.ladder) * (1 + policy.reinit_attempts)
        self._startup_timeout = (
            None if policy.init_timeout is None else IMPORT_SECONDS + attempts * policy.init_timeout
        )
        self._slots = Slots(name, processes, policy.ladder)
        # Everything below is guarded by _cond, the slots' Condition.
        self._cond = self._slots.cond
        self._starters: set[threading.Thread] = set()
        self._replaced = 0
        self._pending = 0  # async calls admitted and not finished
        # one thread per worker waits for its reply, so that arun() never blocks the loop
        self._executor = ThreadPoolExecutor(processes, thread_name_prefix=f"mnn-guard-{name}-a")
        # readiness: one entry named after the pool, published in order by _publish
        self._health = health or HEALTH
        self._publishing = threading.Lock()
        self._published: Entry | None = None
        self._stop_watch = threading.Event()
        self._start()

    # -------------------------------------------------------------- workers

    def _start(self) -> None:
        """Start every worker and wait for all to serve; then watch the idle ones."""
        try:
            for slot in self._slots.all:
                slot.spawn(self._ctx, worker_main, self._args)
            self._publish()
            for slot in self._slots.all:
                self._ready(slot)
        except BaseException:
            self.close()
            for slot in self._slots.all:  # close() killed those still starting; reap them here
                stop(slot.child)
            raise
        threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop_watch),
            name=f"mnn-guard-{self.name}-watch",
            daemon=True,
        ).start()

    def _ready(self, slot: Slot) -> bool:
        """Wait for a spawned worker's session and put its slot in service (False: closed)."""
        report = slot.await_ready(self._startup_timeout)
        with self._cond:
            slot.note(report)
            serving = slot.to(SlotState.IDLE)
        self._publish()
        return serving

    def _retire(self, slot: Slot, why: str, *, idle: Child | None = None) -> None:
        """Stop a slot's failed worker and start its replacement.

        The slot's owner calls this, or the watcher with the `idle` child it saw die: then
        only if the slot still idles with it (else a request took it and finds it dead, and
        only that request may reap it: two threads reaping one child race for its exit code).
        """
        with self._cond:
            if idle is not None and (slot.state is not SlotState.IDLE or slot.child is not idle):
                return
            child, label = slot.child, slot.label
            replacing = slot.to(SlotState.STARTING)
        if idle is not None:
            why = f"{label} {idle.exit_text()} while idle"
        stop(child)
        if not replacing:
            return
        self._publish()
        log.warning("pool %s: %s; replacing it", self.name, why)
        thread = threading.Thread(
            target=self._replace,
            args=(slot,),
            name=f"mnn-guard-{self.name}-restart",
            daemon=True,
        )
        with self._cond:
            self._starters.add(thread)
        thread.start()

    def _replace(self, slot: Slot) -> None:
        """Start a replacement worker (a background thread); on failure the slot is FAILED."""
        try:
            slot.spawn(self._ctx, worker_main, self._args)
            serving = self._ready(slot)
        except Exception as exc:
            with self._cond:
                slot.error = exc  # readiness says why while the slot is FAILED
                failed = slot.to(SlotState.FAILED)
            if failed:
                self._publish()
                log.error(
                    "pool %s: replacement for worker %d failed: %s", self.name, slot.index, exc
                )
        else:
            if serving:
                with self._cond:
                    self._replaced += 1
            else:  # the pool closed meanwhile
                slot.ask_to_stop()
                stop(slot.child, STOP_SECONDS)
        finally:
            with self._cond:
                self._starters.discard(threading.current_thread())
                self._cond.notify_all()

    def _release(self, slot: Slot) -> None:
        """Put a slot whose worker answered back in service (or stop it if the pool closed)."""
        with self._cond:
            released = slot.to(SlotState.IDLE)
        if not released:
            slot.ask_to_stop()
            stop(slot.child, STOP_SECONDS)

    def _request(self, slot: Slot, data: bytes) -> wire.Reply:
        """Send one encoded request on a BUSY slot; keep what its worker reports with the reply."""
        reply = slot.request(data, self.request_timeout)
        if isinstance(reply, wire.Done | wire.Raised | wire.Refused):
            with self._cond:
                changed = slot.note(reply.report)
                slot.requests += 1
            if changed:
                self._publish()
        return reply

    # -------------------------------------------------------------- serving

    def _encode(self, inputs: Inputs) -> bytes:
        """Check the inputs here and encode the plain arrays MNN will read as one request."""
        arrays = self._check(inputs)  # InputMismatch, in the caller's thread
        # np.asarray: a plain ndarray of the same data; a subclass would pickle with its own
        # reduce, which the worker might not be able to undo
        request = wire.Run({n: np.asarray(a) for n, a in zip(self._names, arrays, strict=True)})
        try:
            return wire.encode(request)
        except Exception as exc:
            raise InputMismatch(
                f"pool {self.name!r}: the request cannot be encoded for a worker: {exc!r}"
            ) from exc

    def run(self, inputs: Inputs) -> dict[str, Array]:
        """Run one request on an idle worker; returns owned numpy arrays by output name."""
        return self._run_data(self._encode(inputs))

    def _run_data(self, data: bytes, deadline: float | None = None) -> dict[str, Array]:
        """Run one encoded request; the first wait for a worker ends at `deadline`."""
        failures: list[tuple[str, Exception | None]] = []  # why, and the worker's error if any
        unblamed = self.processes  # how many workers found dead before sending may be skipped
        while len(failures) < 2:
            slot = self._slots.acquire(deadline, self._wait_timeout)
            deadline = None  # a retry waits its own Policy.wait_timeout
            try:
                reply = self._request(slot, data)
            except Lost as lost:
                self._retire(slot, str(lost))
                if isinstance(lost, Undelivered) and unblamed > 0:
                    unblamed -= 1  # not the request's fault: try another worker, uncounted
                    continue
                failures.append((str(lost), None))
                continue
            except BaseException:
                self._retire(slot, "a request was interrupted")  # its reply would come late
                raise
            if isinstance(reply, wire.Done):
                self._release(slot)
                return reply.outputs
            if isinstance(reply, wire.Refused):
                self._release(slot)
                raise InputMismatch(
                    f"pool {self.name!r}: {slot.label} refused the request: {reply.reason}"
                )
            if not isinstance(reply, wire.Raised):
                why = f"{slot.label} answered a request with a {type(reply).__name__}"
                failures.append((why, None))
                self._retire(slot, why)
                continue
            error = reply.error
            error.add_note(f"raised in pool {self.name!r} by {slot.label}")
            if isinstance(error, InputMismatch):
                self._release(slot)
                raise error
            why = f"{slot.label} raised {type(error).__name__}: {error}"
            failures.append((why, error))
            self._retire(slot, why)
        raise self._failed(failures)

    def _failed(self, failures: list[tuple[str, Exception | None]]) -> Exception:
        """The error for a request that failed on two workers.

        Both workers lost (crashed or timed out): PoisonRequest. The second raised: its own
        error, noting the first failure. The first raised and the second was lost: WorkerFailed.
        """
        (first, first_error), (second, second_error) = failures
        if self._slots.closed:
            return SessionClosed(f"pool {self.name!r} was closed during the request")
        if second_error is not None:
            second_error.add_note(f"the request was retried after: {first}")
            return second_error
        if first_error is None:
            return PoisonRequest(
                f"pool {self.name!r}: poison request, not retried again: it cost two workers: "
                f"first {first}; then {second}"
            )
        error = WorkerFailed(
            f"pool {self.name!r}: the request failed on two workers: first {first}; then {second}"
        )
        error.__cause__ = first_error
        return error

    def map(self, inputs: Iterable[Inputs]) -> list[dict[str, Array]]:
        """Run many requests spread over every worker at once; results in input order."""
        items = list(inputs)
        if not items:
            return []
        workers = min(len(items), self.processes)
        with ThreadPoolExecutor(workers, thread_name_prefix=f"mnn-guard-{self.name}") as executor:
            futures = [executor.submit(self.run, item) for item in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    # ------------------------------------------------------------- asyncio

    async def arun(self, inputs: Inputs) -> dict[str, Array]:
        """`run` for asyncio: the loop only checks and pickles the inputs; owned arrays back.

        Raises InputMismatch at once for bad inputs, Unavailable at once when
        `processes + max_waiting` calls are already admitted, or when no worker was free
        within `Policy.wait_timeout`; otherwise whatever `run` raises. Cancelling the await
        drops a request not yet sent; one in flight finishes in the pool's thread and its
        reply is discarded: the worker goes on serving others.
        """
        data = self._encode(inputs)  # InputMismatch here, in the caller
        job = self._submit(data, time.monotonic() + self._wait_timeout)
        reply = asyncio.wrap_future(job)
        try:
            await asyncio.wait((reply,), timeout=self._wait_timeout)
            if not reply.done() and job.cancel():  # never reached a thread: not sent
                raise Unavailable(
                    f"pool {self.name!r}: no worker was free within {self._wait_timeout:g} s "
                    f"(Policy.wait_timeout); {self._pending} call(s) in flight or waiting"
                )
            return await reply
        except asyncio.CancelledError:
            reply.cancel()  # cancels the job too if no thread took it yet
            raise

    def _submit(self, data: bytes, deadline: float) -> concurrent.futures.Future[dict[str, Array]]:
        """Admit one encoded async call (bounded by max_waiting) and hand it to a thread."""
        limit = self.processes + self.max_waiting
        with self._cond:
            if self._slots.closed:
                raise SessionClosed(f"pool {self.name!r} is closed")
            if self._pending >= limit:
                raise Unavailable(
                    f"pool {self.name!r}: {self._pending} calls are already in flight or waiting "
                    f"(processes + max_waiting = {limit}); shed load or raise max_waiting"
                )
            self._pending += 1
        try:
            job = self._executor.submit(self._run_data, data, deadline)
        except RuntimeError:  # the executor was shut down: close() ran meanwhile
            self._finished()
            raise SessionClosed(f"pool {self.name!r} is closed") from None
        job.add_done_callback(self._finished)
        return job

    def _finished(self, job: object = None) -> None:
        """One admitted async call ended (served, failed or cancelled)."""
        with self._cond:
            self._pending -= 1

    async def amap(self, inputs: Iterable[Inputs]) -> list[dict[str, Array]]:
        """`map` for asyncio: every request through `arun`, one per worker at a time; in order.

        The first error is raised and the requests not yet done are cancelled.
        """
        items = list(inputs)
        turns = asyncio.Semaphore(self.processes)

        async def one(item: Inputs) -> dict[str, Array]:
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

        A request in flight is answered if its worker finishes within STOP_SECONDS; workers
        still starting are killed, and nothing is logged about them.
        """
        before = self._slots.close()
        if not before:
            return  # closed already
        with self._cond:
            starters = list(self._starters)
        self._stop_watch.set()
        self._executor.shutdown(wait=False)  # queued async calls raise SessionClosed
        with self._publishing:  # after any publication in progress
            self._health.forget(self.name, owner=self)
        for slot, state, child in before:
            if state is SlotState.IDLE:
                slot.ask_to_stop()  # a busy worker's request thread asks it once answered
            elif state is SlotState.STARTING and child is not None:
                child.kill()  # its starting thread reaps it
        deadline = time.monotonic() + STOP_SECONDS
        for _, state, child in before:
            if state is not SlotState.STARTING:
                # an idle worker's pipe is ours to close; a busy one's belongs to its request
                grace = max(0.0, deadline - time.monotonic())
                stop(child, grace, close=state is SlotState.IDLE)
        for thread in starters:
            thread.join(STOP_SECONDS + 1.0)
        self._unstash()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._slots.closed else f"{self.processes} worker(s)"
        return f"<Pool {self.name!r} {state}>"
