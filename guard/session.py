"""The guarded session: canary after every init, recovery down the ladder, safe `run()`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from guard import mnn
from guard.canary import run_canary
from guard.errors import (
    ConfigError,
    FactoryError,
    ForkAfterLoad,
    GuardError,
    InitTimeout,
    RecoveryExhausted,
    SessionClosed,
)
from guard.inputs import InputChecker
from guard.ladder import Action, Attempt, Outcome, Policy, Rung
from guard.listeners import Listener, notify
from probes import Probe, Verdict

__all__ = ["Factory", "GuardedSession", "SessionStatus"]

Factory = Callable[..., Any]
"""`factory(**overrides) -> module` whose `.forward(list_of_vars)` returns a list of Vars."""

Array = NDArray[Any]
log = logging.getLogger("mnn_guard")


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A snapshot: rung in use, health, attempts of the last recovery and the last verdict."""

    name: str
    mode: str
    rung: int
    healthy: bool
    attempts: int
    verdict: Verdict | None
    history: tuple[Attempt, ...]
    closed: bool = False

    def describe(self) -> str:
        """One line for logs and tables."""
        state = "closed" if self.closed else ("healthy" if self.healthy else "UNHEALTHY")
        verdict = self.verdict.describe() if self.verdict is not None else "no verdict"
        tries = f"after {self.attempts} attempt(s)"
        return f"{state} on rung {self.mode!r} ({self.rung}) {tries}; {verdict}"


def _action(previous: int, index: int) -> Action:
    """Re-init on the same rung, fall back to a slower one, or promote to a faster one."""
    if index == previous:
        return Action.REINIT
    return Action.FALLBACK if index > previous else Action.PROMOTE


def call_with_timeout(fn: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """Run `fn` in a daemon thread and raise InitTimeout if it has not returned in `timeout` s.

    A hang inside MNN that holds the GIL cannot be interrupted this way (see DESIGN.md); such
    hangs are prevented up front (ForkAfterLoad) and, in a pool, ended by the parent.
    """
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="mnn-guard-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise InitTimeout(f"{what} did not finish within {timeout:g} s (Policy.init_timeout)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _self_check(probe: Probe) -> None:
    """Judge each case's goldens against themselves: a probe that fails this can pass nothing.

    It also pays the judge's one-off costs (scipy.signal's import, window caches) here, so
    they never count against `Policy.init_timeout`.
    """
    for index, case in enumerate(probe.cases):
        verdict = probe.judge(case.outputs, case=index)
        if not verdict.passed:
            raise ConfigError(
                f"case {index}'s golden outputs fail the probe's own thresholds "
                f"({'; '.join(verdict.reasons)}); loosen the thresholds or re-record the probe"
            )


class GuardedSession:
    """A module that passed its canary, with recovery, promotion and re-checks.

    >>> session = guard.wrap(factory, probe, name="vocoder")  # doctest: +SKIP
    >>> session.run({"mel": mel})["wav"]  # doctest: +SKIP
    """

    def __init__(
        self,
        factory: Factory,
        probe: Probe,
        *,
        policy: Policy,
        name: str,
        listeners: Sequence[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(factory):
            raise FactoryError(f"factory must be callable, got {type(factory).__name__}")
        self.name = name
        self.probe = probe
        self.policy = policy
        self._factory = factory
        self._listeners = tuple(listeners)
        # on_run is on the hot path: call only the listeners that override it
        self._run_listeners = tuple(
            x for x in self._listeners if type(x).on_run is not Listener.on_run
        )
        self._clock = clock
        self._lock = threading.Lock()  # serialises forward on the live module and swaps
        self._cond = threading.Condition(self._lock)
        self._pending = False  # a recovery is replacing a module that failed its re-check
        self._checker_waiting = False  # a re-check wants the lock: callers let it go first
        self._recovering = threading.Lock()  # one recovery or promotion at a time
        self._module: Any = None
        self._rung = 0
        self._healthy = False
        self._closed = False
        self._failure: GuardError | None = None
        self._history: tuple[Attempt, ...] = ()
        self._verdict: Verdict | None = None
        self._since = clock()  # when the current rung was entered or last tried for promotion
        self._last_check = clock()
        self._calls = 0  # successful calls since the last re-check
        self._recheck_calls = policy.recheck_every_calls
        self._output_names = probe.output_names
        self._check_inputs = InputChecker(probe.inputs, check_finite=policy.check_finite_inputs)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        _self_check(probe)
        with self._recovering:
            self._recover(0, first=True)
        if policy.background and self._needs_maintenance():
            self._thread = threading.Thread(
                target=self._maintenance_loop, name=f"mnn-guard-{name}", daemon=True
            )
            self._thread.start()

    # ----------------------------------------------------------------- state

    @property
    def status(self) -> SessionStatus:
        """Rung in use, health, attempts of the last recovery and the last verdict."""
        rung = self.policy.ladder[self._rung]
        return SessionStatus(
            name=self.name,
            mode=rung.name,
            rung=self._rung,
            healthy=self._healthy and not self._closed,
            attempts=len(self._history),
            verdict=self._verdict,
            history=self._history,
            closed=self._closed,
        )

    def _publish(self) -> None:
        notify(self._listeners, "on_status", self.name, self.status)

    # -------------------------------------------------------------- building

    def _attempt(self, index: int) -> tuple[Any, Attempt]:
        """One init + canary on rung `index`: the module (None unless it passed) and the record."""
        rung: Rung = self.policy.ladder[index]
        notify(self._listeners, "on_init", self.name, rung, index)
        start = time.perf_counter()
        module: Any = None
        verdict: Verdict | None = None
        error: BaseException | None = None
        try:
            mnn.check_not_forked()

            def build() -> tuple[Any, Verdict]:
                built = self._factory(**rung.overrides)
                mnn.note_load()
                if not callable(getattr(built, "forward", None)):
                    raise FactoryError(
                        f"the factory returned a {type(built).__name__} without a forward() method"
                    )
                return built, run_canary(built, self.probe, self.policy.canary_runs)

            what = f"init + canary of session {self.name!r} on rung {rung.name!r}"
            module, verdict = call_with_timeout(build, self.policy.init_timeout, what)
            outcome = Outcome.PASS if verdict.passed else Outcome.FAIL
        except InitTimeout as exc:
            outcome, error = Outcome.TIMEOUT, exc
        except ForkAfterLoad:
            raise
        except Exception as exc:
            outcome, error = Outcome.ERROR, exc
        attempt = Attempt(rung.name, index, outcome, verdict, error, time.perf_counter() - start)
        notify(self._listeners, "on_attempt", self.name, attempt)
        return (module if attempt.passed else None), attempt

    def _recover(self, start: int, *, first: bool = False) -> None:
        """Walk the ladder from rung `start`; install the first module whose canary passes."""
        attempts: list[Attempt] = []
        previous = self._rung
        for index in range(start, len(self.policy.ladder)):
            for _ in range(1 + self.policy.reinit_attempts):
                if attempts or not first:
                    notify(
                        self._listeners,
                        "on_recover",
                        self.name,
                        _action(previous, index),
                        previous,
                        index,
                    )
                previous = index
                module, attempt = self._attempt(index)
                attempts.append(attempt)
                if module is not None:
                    self._install(module, index, tuple(attempts))
                    return
        self._fail(tuple(attempts))

    def _install(self, module: Any, index: int, history: tuple[Attempt, ...]) -> None:
        with self._cond:
            old, self._module = self._module, module
            self._rung = index
            self._healthy = True
            self._failure = None
            self._pending = False
            self._history = history
            self._verdict = history[-1].verdict
            self._since = self._last_check = self._clock()
            self._cond.notify_all()
        del old  # release the previous module (and its buffers)
        self._publish()

    def _fail(self, history: tuple[Attempt, ...]) -> None:
        lines = "\n  ".join(f"{i + 1}. {a.describe()}" for i, a in enumerate(history))
        error = RecoveryExhausted(
            f"session {self.name!r}: every rung of the ladder failed its canary:\n  {lines}",
            history,
        )
        last_error = next((a.error for a in reversed(history) if a.error is not None), None)
        error.__cause__ = last_error
        with self._cond:
            self._module = None
            self._healthy = False
            self._failure = error
            self._pending = False
            self._history = history
            self._verdict = history[-1].verdict if history else None
            if history:  # status, /readyz and the rung gauge name the rung the verdict is from
                self._rung = history[-1].rung_index
            self._since = self._clock()
            self._cond.notify_all()
        self._publish()
        raise error

    # --------------------------------------------------------------- serving

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Array]:
        """Run the module on validated inputs; returns owned numpy arrays by output name."""
        arrays = self._check_inputs(inputs)
        start = time.perf_counter()
        with self._lock:  # the condition's own lock (Condition.__enter__ costs a Python call)
            while (self._pending or self._checker_waiting) and not self._closed:
                self._cond.wait()  # a re-check goes first; a failed one is replaced first
            if self._closed:
                raise SessionClosed(f"session {self.name!r} is closed")
            if self._module is None:
                assert self._failure is not None
                raise self._failure
            rung = self._rung
            try:
                outputs = mnn.forward(self._module, arrays)
            except GuardError:
                self._ran(rung, start, ok=False)
                raise
            except Exception as exc:
                self._ran(rung, start, ok=False)
                raise GuardError(f"session {self.name!r}: forward failed: {exc!r}") from exc
            if self._recheck_calls is not None:  # counted under the lock: no call is lost
                self._calls += 1
                if self._calls == self._recheck_calls:
                    self._wake.set()
        if len(outputs) != len(self._output_names):
            self._ran(rung, start, ok=False)
            raise GuardError(
                f"session {self.name!r}: the module returned {len(outputs)} outputs, expected "
                f"{self._output_names} (MNN returns [] on an internal shape error)"
            )
        self._ran(rung, start, ok=True)
        return dict(zip(self._output_names, outputs, strict=True))

    def _ran(self, rung: int, start: float, *, ok: bool) -> None:
        seconds = time.perf_counter() - start
        name = self.policy.ladder[rung].name
        for listener in self._run_listeners:
            listener.on_run(self.name, rung, name, seconds, ok)

    # ----------------------------------------------------------- maintenance

    def _needs_maintenance(self) -> bool:
        p = self.policy
        return any(
            v is not None for v in (p.promote_after, p.recheck_every_calls, p.recheck_every_seconds)
        )

    def _maintenance_loop(self) -> None:
        p = self.policy
        periods = [v for v in (p.promote_after, p.recheck_every_seconds) if v is not None]
        interval = min([*periods, 1.0])
        while not self._closed:
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed:
                return
            try:
                self.maintain()
            except GuardError:
                pass  # recorded in status and metrics; run() raises it to callers
            except Exception:
                log.exception("session %s: maintenance failed", self.name)

    def maintain(self, *, force_recheck: bool = False) -> list[Action | str]:
        """Do whatever is due now: a re-check of the live module, a promotion, a retry.

        Runs in the background thread when `Policy.background` is set; call it yourself with a
        fake clock in tests. Returns what it did.
        """
        done: list[Action | str] = []
        if self._closed or not self._recovering.acquire(blocking=False):
            return done
        try:
            now = self._clock()
            p = self.policy
            if self._module is None:
                if p.promote_after is not None and now - self._since >= p.promote_after:
                    done.append("retry")
                    self._recover(0, first=True)
                return done
            calls_due = p.recheck_every_calls is not None and self._calls >= p.recheck_every_calls
            time_due = (
                p.recheck_every_seconds is not None
                and now - self._last_check >= p.recheck_every_seconds
            )
            if force_recheck or calls_due or time_due:
                done.append("recheck")
                if not self._recheck():
                    return done
            promote_due = p.promote_after is not None and now - self._since >= p.promote_after
            if self._rung > 0 and promote_due and self._promote():
                done.append(Action.PROMOTE)
            return done
        finally:
            self._recovering.release()

    def _recheck(self) -> bool:
        """Re-run the canary on the live module; on failure recover while callers wait.

        Callers keep being served between the canary's forwards (each holds the module's lock
        for one forward); judging happens outside the lock. At the first failing judgement the
        module is taken out of service and callers wait for its replacement.
        """
        with self._lock:
            module, index = self._module, self._rung
            self._calls = 0
            self._last_check = self._clock()
        if module is None:
            return False
        start = time.perf_counter()
        rung = self.policy.ladder[index]
        try:
            verdict = run_canary(
                module, self.probe, self.policy.canary_runs, gate=self._ahead, stop_at_failure=True
            )
            outcome, error = (Outcome.PASS if verdict else Outcome.FAIL), None
        except Exception as exc:
            verdict, outcome, error = None, Outcome.ERROR, exc
        attempt = Attempt(rung.name, index, outcome, verdict, error, time.perf_counter() - start)
        notify(self._listeners, "on_check", self.name, attempt)
        with self._cond:
            if self._module is not module or self._closed:
                return attempt.passed  # closed or replaced meanwhile: nothing to take down
            self._verdict = verdict
            if attempt.passed:
                return True
            self._healthy = False
            self._module = None  # nothing degraded is served: callers wait for the replacement
            self._pending = True
        self._publish()
        try:
            self._recover(index)
        except RecoveryExhausted:
            return False
        return True

    @contextlib.contextmanager
    def _ahead(self) -> Iterator[None]:
        """Hold the module's lock for one re-check forward, ahead of callers waiting for it."""
        self._checker_waiting = True
        with self._cond:
            self._checker_waiting = False
            self._cond.notify_all()  # waiting callers go on once this forward releases the lock
            yield

    def _promote(self) -> bool:
        """Build each faster rung off the request path; swap in the first whose canary passes."""
        current = self._rung
        self._since = self._clock()
        for index in range(current):
            module, attempt = self._attempt(index)
            if module is not None:
                notify(self._listeners, "on_recover", self.name, Action.PROMOTE, current, index)
                self._install(module, index, (attempt,))
                return True
        return False

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the module and stop the maintenance thread; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._module = None
            self._healthy = False
            self._cond.notify_all()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        notify(self._listeners, "on_close", self.name)

    def __enter__(self) -> GuardedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<GuardedSession {self.name!r} {self.status.describe()}>"
