"""A pool of guarded worker processes, started with spawn so that MNN never meets a fork.

>>> with guard.Pool(guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"]), probe, processes=2) as pool:
...     wavs = pool.map([{"mel": m} for m in mels])  # doctest: +SKIP
...     wav = (await pool.arun({"mel": mel}))["wav"]  # in a coroutine  # doctest: +SKIP

The parent checks every request against the probe and sends workers only the plain arrays MNN
will read; each worker builds one guarded session and serves requests from its pipe. Messages
on a pipe are the small dataclasses below, pickled by the sender.

The async face (`arun`, `amap`) keeps an event loop free: the loop itself only checks and
pickles the inputs (tens of microseconds, whatever the forward costs); a thread of the pool
waits for a worker and its reply, with the GIL released, while the forward runs in the worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    GuardError,
    InputMismatch,
    PoisonRequest,
    RecoveryExhausted,
    SessionClosed,
    Unavailable,
    WorkerFailed,
)
from guard.health import HEALTH, HealthTable
from guard.inputs import InputChecker
from guard.ladder import Policy, Rung
from guard.session import Factory, GuardedSession
from guard.state import LIVE, SessionStatus, State
from guard.workers import Child, Event, load_stashed_probe, remove_stash, stash_probe
from guard.wrapping import check_probe, wrap
from probes import Probe

# load_stashed_probe, remove_stash and stash_probe moved to guard.workers; importable here for now
__all__ = ["Pool", "WorkerStatus", "load_stashed_probe", "remove_stash", "stash_probe"]

Array = NDArray[Any]
Inputs = Mapping[str, Any] | Sequence[Any]
log = logging.getLogger("mnn_guard")

START_METHODS = ("spawn", "forkserver")
IMPORT_SECONDS = 60.0  # allowance for a spawned worker to import numpy, scipy and MNN
STOP_SECONDS = 5.0  # how long close() waits for a worker to exit before killing it
WATCH_SECONDS = 0.25  # how soon a worker that died while idle is noticed, at the latest
MAX_WAITING = 256  # default bound on async calls waiting for a worker (beyond one per worker)
# how bad each state of a worker is for the pool's readiness entry, from fine to worst
_SEVERITY = (State.SERVING, State.CHECKING, State.STARTING, State.REPLACING, State.FAILED)


# ------------------------------------------------------------------ pipe messages


@dataclass(frozen=True, slots=True)
class _Health:
    """A worker session's state and rung index, sent with every reply."""

    state: State
    rung_index: int


@dataclass(frozen=True, slots=True)
class _Run:
    """Parent to worker: run one request (checked plain arrays by input name)."""

    arrays: dict[str, Array]


@dataclass(frozen=True, slots=True)
class _Stop:
    """Parent to worker: exit after the request in hand."""


@dataclass(frozen=True, slots=True)
class _Ready:
    """Worker to parent: the session passed its canary and serves."""

    health: _Health


@dataclass(frozen=True, slots=True)
class _StartFailed:
    """Worker to parent: building the session raised `error`; the worker exits."""

    error: Exception


@dataclass(frozen=True, slots=True)
class _Done:
    """Worker to parent: the request's outputs."""

    outputs: dict[str, Array]
    health: _Health


@dataclass(frozen=True, slots=True)
class _Raised:
    """Worker to parent: the session raised `error` for the request."""

    error: Exception
    health: _Health


@dataclass(frozen=True, slots=True)
class _Refused:
    """Worker to parent: the message could not be decoded (or was no request); still serving."""

    reason: str
    health: _Health


_Reply = _Ready | _StartFailed | _Done | _Raised | _Refused


# ------------------------------------------------------------------ worker side


def _pickles(obj: object) -> bool:
    """True when `obj` survives a pickle round trip."""
    try:
        pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return False
    return True


def _stand_in(exc: BaseException) -> GuardError:
    """A GuardError with the message of an exception that does not pickle."""
    error = GuardError(str(exc))
    error.add_note(f"in the worker this was a {type(exc).__qualname__}, which does not pickle")
    return error


def _portable(exc: Exception) -> Exception:
    """`exc` if it pickles, else with stand-ins for its attempts' errors, else a stand-in."""
    if _pickles(exc):
        return exc
    if isinstance(exc, RecoveryExhausted):
        attempts = [
            a
            if a.error is None or _pickles(a.error)
            else dataclasses.replace(a, error=_stand_in(a.error))
            for a in exc.attempts
        ]
        error = RecoveryExhausted(str(exc), attempts)
        if _pickles(error):
            return error
    return _stand_in(exc)


def _health(session: GuardedSession) -> _Health:
    status = session.status
    return _Health(status.state, status.rung_index)


def _send(conn: Connection, reply: _Reply) -> bool:
    """Send a reply; False when the parent is gone."""
    try:
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        return False
    return True


def _serve(conn: Connection, session: GuardedSession) -> None:
    """Answer requests until the parent says stop or goes away; an undecodable one is refused."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        try:
            message = pickle.loads(data)
        except Exception as exc:
            reason = f"it could not be decoded: {type(exc).__name__}: {exc}"
            if not _send(conn, _Refused(reason, _health(session))):
                return
            continue
        if isinstance(message, _Stop):
            return
        if not isinstance(message, _Run):
            reason = f"a {type(message).__name__} is not a request"
            if not _send(conn, _Refused(reason, _health(session))):
                return
            continue
        try:
            reply: _Reply = _Done(session.run(message.arrays), _health(session))
        except Exception as exc:
            reply = _Raised(_portable(exc), _health(session))
        if not _send(conn, reply):
            return


def _worker_main(
    conn: Connection, factory: Factory, probe_path: str, policy: Policy, name: str
) -> None:
    """A worker process: build one guarded session here, then serve requests from the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        # the parent answers for its workers' readiness (one entry per pool): a private table
        # keeps this session out of PROMETHEUS_MULTIPROC_DIR's health files
        probe = load_stashed_probe(probe_path)
        session = wrap(factory, probe, policy=policy, name=name, health=HealthTable())
    except Exception as exc:
        _send(conn, _StartFailed(_portable(exc)))
        return
    try:
        if _send(conn, _Ready(_health(session))):
            _serve(conn, session)
    finally:
        session.close()


# ------------------------------------------------------------------ parent side


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStatus:
    """One slot of the pool: its process, its session's state and rung, requests served.

    Fields as in `guard.SessionStatus`: `mode` is the rung's name, `healthy` means serving.
    """

    slot: int
    pid: int | None  # None while a replacement has no process yet, or after it failed to start
    state: State
    rung: Rung
    rung_index: int
    requests: int
    busy: bool = False  # a request is in hand

    @property
    def mode(self) -> str:
        """The name of the rung in use ("static", "dynamic", ...)."""
        return self.rung.name

    @property
    def healthy(self) -> bool:
        """True while the worker's session serves with a module whose canary passed."""
        return self.state in LIVE


@dataclass(eq=False)
class _Worker:
    """The parent's record of one slot's worker, from spawn until it is stopped.

    Its pipe belongs to one thread at a time: the starting thread until the worker is ready,
    then the thread that acquired it for a request, or close() while it is idle.
    """

    slot: int
    child: Child | None = None  # None until spawned
    state: State = State.STARTING
    rung_index: int = 0
    requests: int = 0
    error: Exception | None = None  # why it could not start (the slot then shows FAILED)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        pid = self.child.pid if self.child is not None else None
        return f"worker {self.slot} (pid {pid})"


class _Lost(Exception):
    """A request's worker crashed or timed out; it is replaced and the request retried once."""


class _Undelivered(_Lost):
    """The worker died before the request reached it: replaced, and the request not blamed."""


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges in prometheus_client multiprocess mode."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client.multiprocess import mark_process_dead

    try:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError:
        log.warning("could not drop the metrics files of dead worker pid %d", pid)


def _watch(ref: weakref.ref[Pool], stop: threading.Event) -> None:
    """Replace idle workers that die (a kill, the OOM killer) until the pool closes or goes.

    Busy workers are their request's to watch; this thread holds the pool only between waits.
    """
    while not stop.is_set():
        pool = ref()
        if pool is None:
            return
        idle = pool._idle_children()
        del pool
        sentinels = {w.child.process.sentinel: w for w in idle if w.child is not None}
        if not sentinels:
            stop.wait(WATCH_SECONDS)
            continue
        dead = wait(list(sentinels), WATCH_SECONDS)
        pool = ref()
        if pool is None:
            return
        for sentinel in dead:
            pool._reap_idle(sentinels[sentinel])  # type: ignore[index]
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
        self._ladder = policy.ladder
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
        # Everything below is guarded by _cond.
        self._cond = threading.Condition(threading.Lock())
        self._slots: dict[int, _Worker] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        self._starters: set[threading.Thread] = set()
        self._closed = False
        self._replaced = 0
        self._pending = 0  # async calls admitted and not finished
        # one thread per worker waits for its reply, so that arun() never blocks the loop
        self._executor = ThreadPoolExecutor(processes, thread_name_prefix=f"mnn-guard-{name}-a")
        # readiness: one entry named after the pool, published in order by _publish
        self._health = health or HEALTH
        self._publishing = threading.Lock()
        self._published: tuple[Any, ...] | None = None
        self._since = time.time()
        self._stop_watch = threading.Event()
        self._start()

    # -------------------------------------------------------------- workers

    def _start(self) -> None:
        """Start every worker and wait for all to serve; then watch the idle ones."""
        workers = [_Worker(slot) for slot in range(self.processes)]
        try:
            for worker in workers:
                self._launch(worker)
            self._publish()
            for worker in workers:
                self._await_ready(worker)
        except BaseException:
            self.close()
            for worker in workers:  # close() killed those still starting; reap them here
                self._stop(worker)
            raise
        with self._cond:
            self._idle.extend(workers)
        threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop_watch),
            name=f"mnn-guard-{self.name}-watch",
            daemon=True,
        ).start()

    def _launch(self, worker: _Worker) -> None:
        """Spawn the worker's process and put the worker in its slot (STARTING)."""
        with self._cond:
            if self._closed:
                raise SessionClosed(f"pool {self.name!r} is closed")
            self._slots[worker.slot] = worker
        child = Child.spawn(
            self._ctx, _worker_main, self._args, name=f"mnn-guard-{self.name}-{worker.slot}"
        )
        with self._cond:
            worker.child = child
            closed = self._closed
        if closed:  # close() ran meanwhile and could not see this process
            child.kill()

    def _await_ready(self, worker: _Worker) -> None:
        """Wait for a spawned worker's session; raise the worker's own error if it failed."""
        child = worker.child
        assert child is not None
        prefix = f"pool {self.name!r}: {worker.label} could not start"
        try:
            event = child.wait(self._startup_timeout)
            if event is Event.TIMEOUT:
                raise WorkerFailed(
                    f"{prefix}: no session within {self._startup_timeout:g} s; killed"
                )
            try:
                reply = self._receive(worker, child) if event is Event.MESSAGE else None
            except _Lost as lost:
                raise WorkerFailed(f"{prefix}: {lost}") from None
            if reply is None:
                raise WorkerFailed(f"{prefix}: it {child.exit_text()}")
            if isinstance(reply, _StartFailed):
                reply.error.add_note(prefix)
                raise reply.error
            if not isinstance(reply, _Ready):
                raise WorkerFailed(f"{prefix}: it sent a {type(reply).__name__} first")
        except BaseException:
            child.stop()
            _mark_dead(child.pid)
            raise
        with self._cond:
            self._note(worker, reply.health)
        self._publish()

    @staticmethod
    def _receive(worker: _Worker, child: Child) -> _Reply | None:
        """The next reply on a worker's pipe; None when the worker died instead."""
        try:
            data = child.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        try:
            reply = pickle.loads(data)
        except Exception as exc:
            raise _Lost(f"{worker.label} sent a reply that could not be decoded: {exc!r}") from exc
        if not isinstance(reply, _Ready | _StartFailed | _Done | _Raised | _Refused):
            raise _Lost(f"{worker.label} sent a {type(reply).__name__}, not a reply")
        return reply

    @staticmethod
    def _note(worker: _Worker, health: _Health) -> bool:
        """Record a worker's reported health (the caller holds _cond); True if it changed."""
        changed = (worker.state, worker.rung_index) != (health.state, health.rung_index)
        worker.state, worker.rung_index = health.state, health.rung_index
        return changed

    def _stop(self, worker: _Worker, grace: float = 0.0, *, close: bool = True) -> None:
        """Stop and reap a worker's process; drop its metrics."""
        if worker.child is not None:
            worker.child.stop(grace, close=close)
            _mark_dead(worker.child.pid)

    def _ask_to_stop(self, worker: _Worker) -> None:
        """Ask a worker to finish its request in hand and exit."""
        if worker.child is None:
            return
        try:
            with worker.send_lock:
                worker.child.conn.send_bytes(pickle.dumps(_Stop()))
        except OSError:
            pass  # already gone, or its pipe closed; it is reaped by its owner

    def _retire(self, worker: _Worker, why: str) -> None:
        """Stop a worker that failed (its owner calls this) and start its replacement."""
        replacement: _Worker | None = None
        with self._cond:
            if self._slots.get(worker.slot) is worker and not self._closed:
                replacement = _Worker(worker.slot)
                self._slots[worker.slot] = replacement
            self._cond.notify_all()
        self._stop(worker)
        if replacement is None:
            return
        self._publish()
        log.warning("pool %s: %s; replacing it", self.name, why)
        thread = threading.Thread(
            target=self._replace,
            args=(replacement,),
            name=f"mnn-guard-{self.name}-restart",
            daemon=True,
        )
        with self._cond:
            self._starters.add(thread)
        thread.start()

    def _replace(self, worker: _Worker) -> None:
        """Start a replacement worker (a background thread); on failure the slot shows FAILED."""
        try:
            self._launch(worker)
            self._await_ready(worker)
        except Exception as exc:
            with self._cond:
                closed = self._closed
                worker.state, worker.error, worker.child = State.FAILED, exc, None
            if not closed:
                self._publish()
                log.error(
                    "pool %s: replacement for worker %d failed: %s", self.name, worker.slot, exc
                )
        else:
            with self._cond:
                closed = self._closed
                if not closed:
                    self._idle.append(worker)
                    self._replaced += 1
            if closed:
                self._ask_to_stop(worker)
                self._stop(worker, STOP_SECONDS)
        finally:
            with self._cond:
                self._starters.discard(threading.current_thread())
                self._cond.notify_all()

    def _acquire(self, deadline: float | None = None) -> _Worker:
        """An idle worker; waits (until `deadline`, by default Policy.wait_timeout from now)
        while all are busy or starting."""
        if deadline is None:
            deadline = time.monotonic() + self._wait_timeout
        with self._cond:
            while True:
                if self._closed:
                    raise SessionClosed(f"pool {self.name!r} is closed")
                if self._idle:
                    return self._idle.popleft()
                if all(w.error is not None for w in self._slots.values()):
                    error = next((w.error for w in self._slots.values() if w.error), None)
                    raise WorkerFailed(
                        f"pool {self.name!r}: no worker is left; the last replacement failed: "
                        f"{error}"
                    ) from error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    starting = sum(w.state is State.STARTING for w in self._slots.values())
                    raise Unavailable(
                        f"pool {self.name!r}: no worker was free within {self._wait_timeout:g} s "
                        f"(Policy.wait_timeout); {starting} of {self.processes} starting, the "
                        "rest busy"
                    )
                self._cond.wait(remaining)

    def _release(self, worker: _Worker) -> None:
        """Return a worker that answered to the idle ones (or stop it if the pool closed)."""
        with self._cond:
            closed = self._closed
            if not closed:
                self._idle.append(worker)
                self._cond.notify()
        if closed:
            self._ask_to_stop(worker)
            self._stop(worker, STOP_SECONDS)

    def _request(self, worker: _Worker, data: bytes) -> _Reply:
        """Send one encoded request and wait for its reply; raise _Lost when the worker died."""
        child = worker.child
        assert child is not None
        try:
            if child.conn.poll():  # an idle worker has nothing to say: it died while idle
                raise _Undelivered(f"{worker.label} {child.exit_text()} while idle")
            with worker.send_lock:
                child.conn.send_bytes(data)
        except (EOFError, OSError):
            raise _Undelivered(f"{worker.label} {child.exit_text()} while idle") from None
        event = child.wait(self.request_timeout)
        if event is Event.TIMEOUT:
            child.kill()
            raise _Lost(
                f"{worker.label} exceeded request_timeout={self.request_timeout:g} s and was killed"
            )
        reply = self._receive(worker, child) if event is Event.MESSAGE else None
        if reply is None:
            raise _Lost(f"{worker.label} {child.exit_text()}")
        if isinstance(reply, _Done | _Raised | _Refused):
            with self._cond:
                changed = self._note(worker, reply.health)
                worker.requests += 1
            if changed:
                self._publish()
        return reply

    # -------------------------------------------------------------- serving

    def _encode(self, inputs: Inputs) -> bytes:
        """Check the inputs here and encode the plain arrays MNN will read as one request."""
        arrays = self._check(inputs)  # InputMismatch, in the caller's thread
        # np.asarray: a plain ndarray of the same data; a subclass would pickle with its own
        # reduce, which the worker might not be able to undo
        request = _Run({n: np.asarray(a) for n, a in zip(self._names, arrays, strict=True)})
        try:
            return pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
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
            worker = self._acquire(deadline)
            deadline = None  # a retry waits its own Policy.wait_timeout
            try:
                reply = self._request(worker, data)
            except _Lost as lost:
                self._retire(worker, str(lost))
                if isinstance(lost, _Undelivered) and unblamed > 0:
                    unblamed -= 1  # not the request's fault: try another worker, uncounted
                    continue
                failures.append((str(lost), None))
                continue
            except BaseException:
                self._retire(worker, "a request was interrupted")  # its reply would come late
                raise
            if isinstance(reply, _Done):
                self._release(worker)
                return reply.outputs
            if isinstance(reply, _Refused):
                self._release(worker)
                raise InputMismatch(
                    f"pool {self.name!r}: {worker.label} refused the request: {reply.reason}"
                )
            if not isinstance(reply, _Raised):
                why = f"{worker.label} answered a request with a {type(reply).__name__}"
                failures.append((why, None))
                self._retire(worker, why)
                continue
            error = reply.error
            error.add_note(f"raised in pool {self.name!r} by {worker.label}")
            if isinstance(error, InputMismatch):
                self._release(worker)
                raise error
            why = f"{worker.label} raised {type(error).__name__}: {error}"
            failures.append((why, error))
            self._retire(worker, why)
        raise self._failed(failures)

    def _failed(self, failures: list[tuple[str, Exception | None]]) -> Exception:
        """The error for a request that failed on two workers.

        Both workers lost (crashed or timed out): PoisonRequest. The second raised: its own
        error, noting the first failure. The first raised and the second was lost: WorkerFailed.
        """
        (first, first_error), (second, second_error) = failures
        if self._closed:
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
            if self._closed:
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
        """Put the pool's state into its health table, if it changed (in order)."""
        with self._publishing:
            with self._cond:
                if self._closed or not self._slots:
                    return
                workers = sorted(self._slots.values(), key=lambda w: w.slot)
                state = max((w.state for w in workers), key=_SEVERITY.index)
                index = max(w.rung_index for w in workers)
                listed = [
                    {
                        "slot": w.slot,
                        "pid": w.child.pid if w.child is not None else None,
                        "state": w.state.value,
                        "rung": self._ladder[w.rung_index].name,
                    }
                    for w in workers
                ]
                reasons = [
                    f"worker {w.slot} (pid {w.child.pid if w.child else None}) is "
                    f"{w.state.value}" + (f": {w.error}" if w.error is not None else "")
                    for w in workers
                    if w.state not in LIVE
                ]
            key = (state, index, repr(listed), reasons)
            if key == self._published:
                return
            if self._published is None or self._published[0] is not state:
                self._since = time.time()
            self._published = key
            status = SessionStatus(
                name=self.name,
                state=state,
                rung=self._ladder[index],
                rung_index=index,
                verdict=None,
                history=(),
                since=self._since,
            )
            self._health.record(self, status, {"workers": listed, "reasons": reasons})

    def _reap_idle(self, worker: _Worker) -> None:
        """Retire a worker found dead while idle (the watcher calls this)."""
        with self._cond:
            if worker not in self._idle:
                return  # a request took it meanwhile: that request finds it dead
            self._idle.remove(worker)
        child = worker.child
        assert child is not None
        self._retire(worker, f"{worker.label} {child.exit_text()} while idle")

    def _idle_children(self) -> list[_Worker]:
        """The idle workers (the watcher waits for their deaths)."""
        with self._cond:
            return [] if self._closed else list(self._idle)

    def status(self) -> list[WorkerStatus]:
        """Every slot in order, truthful through replacements; [] once closed.

        A serving worker shows its session's state and rung as of its last reply (they change
        only with requests); a replacement being started shows STARTING on the first rung, its
        pid once it has one; a slot whose replacement failed shows FAILED with pid None.
        """
        with self._cond:
            if self._closed:
                return []
            idle = set(self._idle)
            return [
                WorkerStatus(
                    slot=w.slot,
                    pid=w.child.pid if w.child is not None else None,
                    state=w.state,
                    rung=self._ladder[w.rung_index],
                    rung_index=w.rung_index,
                    requests=w.requests,
                    busy=w.child is not None and w.state in LIVE and w not in idle,
                )
                for w in sorted(self._slots.values(), key=lambda w: w.slot)
            ]

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
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = list(self._slots.values())
            idle = set(self._idle)
            self._idle.clear()
            starters = list(self._starters)
            self._cond.notify_all()
        self._stop_watch.set()
        self._executor.shutdown(wait=False)  # queued async calls raise SessionClosed
        with self._publishing:  # after any publication in progress
            self._health.forget(self.name, owner=self)
        for worker in workers:
            if worker.state is State.STARTING and worker.child is not None:
                worker.child.kill()  # its starting thread reaps it
            else:
                self._ask_to_stop(worker)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in workers:
            if worker.state is not State.STARTING:
                # an idle worker's pipe is ours to close; a busy one's belongs to its request
                grace = max(0.0, deadline - time.monotonic())
                self._stop(worker, grace, close=worker in idle)
        for thread in starters:
            thread.join(STOP_SECONDS + 1.0)
        self._unstash()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.processes} worker(s)"
        return f"<Pool {self.name!r} {state}>"
