"""A pool of guarded worker processes, started with spawn so that MNN never meets a fork.

>>> with guard.Pool(guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"]), probe, processes=2) as pool:
...     wavs = pool.map([{"mel": m} for m in mels])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    FactoryError,
    ForkAfterLoad,
    GuardError,
    InitTimeout,
    InputMismatch,
    RecoveryExhausted,
    SessionClosed,
    WorkerFailed,
)
from guard.ladder import Policy
from guard.session import Factory, GuardedSession
from guard.wrapping import check_probe, wrap
from probes import Probe, ProbeError

__all__ = ["Pool", "WorkerStatus", "load_stashed_probe", "stash_probe"]

Array = NDArray[Any]
Inputs = Mapping[str, Any] | Sequence[Any]
log = logging.getLogger("mnn_guard")

START_METHODS = ("spawn", "forkserver")
IMPORT_SECONDS = 60.0  # allowance for a spawned worker to import numpy, scipy and MNN
STOP_SECONDS = 5.0  # how long close() waits for a worker to exit before killing it

# Error types a worker's message is rebuilt into; anything else arrives as a plain GuardError.
_REMOTE_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        FactoryError,
        ForkAfterLoad,
        GuardError,
        InitTimeout,
        SessionClosed,
        WorkerFailed,
        ProbeError,
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStatus:
    """One worker as last reported: slot, pid, rung in use, health, requests served."""

    slot: int
    pid: int
    rung: str
    healthy: bool
    requests: int


@dataclass(eq=False)
class _Worker:
    """The parent's handle on one worker process."""

    slot: int
    process: BaseProcess
    conn: Connection
    rung: str = ""
    healthy: bool = False
    requests: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return f"worker {self.slot} (pid {self.process.pid})"


class _Lost(Exception):
    """A request's worker crashed, timed out or failed; it is replaced and the request retried."""


# ------------------------------------------------------------------ probe hand-over


def stash_probe(probe: Probe) -> str:
    """Pickle a probe once into a private temp file that spawned children load themselves.

    Spawn writes a child's pickled arguments into a 64 KB pipe, and Process.start() blocks
    until the child has imported its main module when they do not fit: a 270 KB probe in
    the arguments made worker start-ups run one after another.
    """
    fd, path = tempfile.mkstemp(prefix="mnn-guard-probe-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(probe, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_stashed_probe(path: str) -> Probe:
    """The probe written by `stash_probe` (a file this user's parent process created)."""
    with open(path, "rb") as f:
        probe = pickle.load(f)
    if not isinstance(probe, Probe):
        raise ProbeError(f"{path!r} does not hold a pickled probes.Probe")
    return probe


def remove_stash(path: str) -> None:
    """Delete a stashed probe; missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ------------------------------------------------------------------ worker side


def _error_payload(exc: BaseException) -> tuple[str, str, str | None]:
    """What crosses the pipe for an exception: type name, message, offending input name."""
    return type(exc).__name__, str(exc), getattr(exc, "input", None)


def _rebuild(kind: str, message: str, input_name: str | None) -> Exception:
    """The caller-side exception for a worker's error payload (same type and message)."""
    if kind == InputMismatch.__name__:
        return InputMismatch(message, input=input_name)
    if kind == RecoveryExhausted.__name__:
        return RecoveryExhausted(message, ())
    cls = _REMOTE_ERRORS.get(kind)
    return cls(message) if cls is not None else GuardError(f"{kind}: {message}")


def _state(session: GuardedSession) -> tuple[str, bool]:
    status = session.status
    return status.mode, status.healthy


def _worker_main(
    conn: Connection, factory: Factory, probe_path: str, policy: Policy, name: str
) -> None:
    """A worker process: build one guarded session here, then serve requests from the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        session = wrap(factory, load_stashed_probe(probe_path), policy=policy, name=name)
    except Exception as exc:
        conn.send(("failed", _error_payload(exc)))
        return
    conn.send(("ready", _state(session)))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if message[0] != "run":
                return
            try:
                outputs = session.run(message[1])
            except Exception as exc:
                conn.send(("error", _error_payload(exc), _state(session)))
            else:
                conn.send(("ok", outputs, _state(session)))
    finally:
        session.close()


# ------------------------------------------------------------------ parent side


def _exit_text(process: BaseProcess) -> str:
    """`exited with code 3` / `was killed by SIGKILL`."""
    process.join(1.0)
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges in prometheus_client multiprocess mode."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client.multiprocess import mark_process_dead

    try:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError:
        log.warning("could not drop the metrics files of dead worker pid %d", pid)


class Pool:
    """Guarded worker processes: each builds its own session with `guard.wrap` after spawn.

    Nothing MNN crosses a process boundary: the factory and policy are pickled to the workers
    (`guard.mnn_factory` and `guard.testing.FaultyFactory` pickle), the probe goes through a
    private temp file, inputs and outputs travel as numpy arrays over one pipe per worker.
    A worker that crashes or takes longer than `request_timeout` is killed and replaced, and
    its request retried once on another worker; a second failure raises WorkerFailed.
    InputMismatch is raised as is, without a retry.

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
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"processes must be a positive int, got {processes!r}")
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
        probe_path = stash_probe(probe)
        self._unstash = weakref.finalize(self, remove_stash, probe_path)
        self._args = (factory, probe_path, policy, name)
        self._ctx = multiprocessing.get_context(start_method)
        attempts = len(policy.ladder) * (1 + policy.reinit_attempts)
        self._startup_timeout = (
            None if policy.init_timeout is None else IMPORT_SECONDS + attempts * policy.init_timeout
        )
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: dict[int, _Worker] = {}
        self._spawning: dict[int, BaseProcess] = {}
        self._restarts: list[threading.Thread] = []
        self._closed = False
        self._replaced = 0
        self._last_error: Exception | None = None
        started = [self._spawn(slot) for slot in range(processes)]
        try:
            for slot, (process, conn) in enumerate(started):
                worker = self._await_ready(slot, process, conn)
                self._workers[slot] = worker
                self._idle.put(worker)
        except BaseException:
            self.close()
            for process, conn in started:
                process.kill()
                process.join()
                conn.close()
            raise

    # -------------------------------------------------------------- workers

    def _spawn(self, slot: int) -> tuple[BaseProcess, Connection]:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child, *self._args),
            name=f"mnn-guard-{self.name}-{slot}",
            daemon=True,
        )
        process.start()
        child.close()  # the parent keeps only its end, so a dead worker reads as EOF
        with self._lock:
            self._spawning[slot] = process
        return process, parent

    def _await_ready(self, slot: int, process: BaseProcess, conn: Connection) -> _Worker:
        """Wait for a spawned worker's session; raise the worker's own error if it failed."""
        prefix = f"pool {self.name!r}: worker {slot} (pid {process.pid}) could not start"
        try:
            ready = wait([conn, process.sentinel], timeout=self._startup_timeout)
            if conn in ready:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    raise WorkerFailed(f"{prefix}: it {_exit_text(process)}") from None
                if reply[0] == "failed":
                    kind, message, input_name = reply[1]
                    raise _rebuild(kind, f"{prefix}: {message}", input_name)
                worker = _Worker(slot, process, conn)
                worker.rung, worker.healthy = reply[1]
                return worker
            if ready:
                raise WorkerFailed(f"{prefix}: it {_exit_text(process)}")
            process.kill()
            raise WorkerFailed(f"{prefix}: no session within {self._startup_timeout:g} s; killed")
        except BaseException:
            process.kill()
            process.join()
            conn.close()
            raise
        finally:
            with self._lock:
                if self._spawning.get(slot) is process:
                    del self._spawning[slot]

    def _stop(self, worker: _Worker, deadline: float | None = None) -> None:
        """Kill a worker unless it exits by `deadline` (after a close request); reap it."""
        if deadline is not None:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        _mark_dead(worker.process.pid)

    def _ask_to_close(self, worker: _Worker) -> None:
        """Ask a worker to finish its request in hand and exit."""
        try:
            with worker.send_lock:
                worker.conn.send(("close",))
        except OSError:
            pass  # already gone; _stop reaps it

    def _retire(self, worker: _Worker) -> None:
        """Kill a failed worker and start its replacement in the background."""
        with self._lock:
            if self._workers.get(worker.slot) is worker:
                del self._workers[worker.slot]
            restart = not self._closed
            if restart:
                thread = threading.Thread(
                    target=self._restart,
                    args=(worker.slot,),
                    name=f"mnn-guard-{self.name}-restart",
                    daemon=True,
                )
                self._restarts.append(thread)
        self._stop(worker)
        if restart:
            thread.start()

    def _restart(self, slot: int) -> None:
        worker: _Worker | None = None
        error: Exception | None = None
        if not self._closed:
            try:
                process, conn = self._spawn(slot)
                worker = self._await_ready(slot, process, conn)
            except Exception as exc:
                log.error("pool %s: replacement for worker %d failed: %s", self.name, slot, exc)
                error = exc
        with self._lock:
            self._restarts.remove(threading.current_thread())
            closed = self._closed
            if worker is None:
                self._last_error = error or self._last_error
                return
            if not closed:
                self._workers[slot] = worker
                self._replaced += 1
        if closed:
            self._ask_to_close(worker)
            self._stop(worker, time.monotonic() + STOP_SECONDS)
        else:
            self._idle.put(worker)

    def _acquire(self) -> _Worker:
        """An idle worker; waits while every worker is busy or being replaced."""
        while True:
            if self._closed:
                raise SessionClosed(f"pool {self.name!r} is closed")
            try:
                worker = self._idle.get(timeout=0.1)
            except queue.Empty:
                with self._lock:
                    if not self._workers and not self._restarts and not self._closed:
                        raise WorkerFailed(
                            f"pool {self.name!r}: no worker is left; the last replacement failed: "
                            f"{self._last_error}"
                        ) from self._last_error
                continue
            with self._lock:
                if self._workers.get(worker.slot) is worker:
                    return worker

    def _request(self, worker: _Worker, inputs: Inputs) -> tuple[str, Any]:
        """Send one request and wait for its reply; raise _Lost when the worker failed."""
        try:
            with worker.send_lock:
                worker.conn.send(("run", inputs))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            self._idle.put(worker)
            raise InputMismatch(
                f"pool {self.name!r}: the inputs cannot be sent to a worker process ({exc}); "
                "pass numpy arrays by input name"
            ) from exc
        except OSError:
            raise _Lost(f"{worker.label} {_exit_text(worker.process)}") from None
        ready = wait([worker.conn, worker.process.sentinel], timeout=self.request_timeout)
        if worker.conn in ready:
            try:
                kind, payload, state = worker.conn.recv()
            except (EOFError, OSError):
                raise _Lost(f"{worker.label} {_exit_text(worker.process)}") from None
            worker.rung, worker.healthy = state
            worker.requests += 1
            return kind, payload
        if ready:
            raise _Lost(f"{worker.label} {_exit_text(worker.process)}")
        raise _Lost(
            f"{worker.label} exceeded request_timeout={self.request_timeout:g} s and was killed"
        )

    # -------------------------------------------------------------- serving

    def run(self, inputs: Inputs) -> dict[str, Array]:
        """Run one request on an idle worker; returns owned numpy arrays by output name."""
        failures: list[str] = []
        while len(failures) < 2:
            worker = self._acquire()
            try:
                kind, payload = self._request(worker, inputs)
            except _Lost as lost:
                failures.append(str(lost))
                self._retire(worker)
                continue
            except InputMismatch:
                raise
            except BaseException:
                self._retire(worker)  # interrupted mid-request: its reply would come out of step
                raise
            if kind == "ok":
                self._idle.put(worker)
                result: dict[str, Array] = payload
                return result
            error = _rebuild(*payload)
            if isinstance(error, InputMismatch):
                self._idle.put(worker)
                raise error
            failures.append(f"{worker.label} raised {payload[0]}: {payload[1]}")
            self._retire(worker)
        if self._closed:
            raise SessionClosed(f"pool {self.name!r} was closed during the request")
        raise WorkerFailed(
            f"pool {self.name!r}: the request failed on two workers: first {failures[0]}; "
            f"then {failures[1]}"
        )

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

    def status(self) -> list[WorkerStatus]:
        """Each live worker as of its last reply (rung and health change only with requests)."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: w.slot)
        return [
            WorkerStatus(
                slot=w.slot,
                pid=w.process.pid or 0,
                rung=w.rung,
                healthy=w.healthy,
                requests=w.requests,
            )
            for w in workers
        ]

    @property
    def replaced(self) -> int:
        """How many workers were replaced after a crash, timeout or failure."""
        return self._replaced

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop every worker and reap it; idempotent. Later `run()` calls raise SessionClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
            spawning = list(self._spawning.values())
            restarts = list(self._restarts)
        for process in spawning:
            process.kill()
        for worker in workers:
            self._ask_to_close(worker)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in workers:
            self._stop(worker, deadline)
        for thread in restarts:
            thread.join(STOP_SECONDS + 1.0)
        self._unstash()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.status())} worker(s)"
        return f"<Pool {self.name!r} {state}>"
