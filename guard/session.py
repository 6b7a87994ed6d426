"""The guarded session: one live module, its canary, its recovery, as a state machine.

The states and the moves between them are in `guard.state`; `GuardedSession._to` is the one
place the state changes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from numpy.typing import NDArray

from guard import mnn, reaper
from guard.canary import init_and_check
from guard.errors import (
    ConfigError,
    FactoryError,
    ForkAfterLoad,
    ForwardFailed,
    GuardError,
    InitTimeout,
    InputMismatch,
    OutputMismatch,
    RecoveryExhausted,
    SessionClosed,
    Unavailable,
)
from guard.inputs import InputChecker
from guard.judgement import Judgement
from guard.ladder import Action, Attempt, Basis, Outcome, Policy, Rung
from guard.listeners import CALL_OK, Call, Listener, notify
from guard.maintenance import Maintenance, maintenance_loop
from guard.shadow import Shadow
from guard.state import LIVE, MOVES, SessionStatus, State
from probes import Probe, Verdict

__all__ = ["Factory", "GuardedSession"]

Factory = Callable[..., Any]
"""`factory(**overrides)` -> an MNN module (`.forward(list_of_vars)`), an (Interpreter, Session)
pair, or any `guard.mnn.Runner`; `guard.mnn.adapt` makes each a numpy-level Runner."""

Array = NDArray[Any]
log = logging.getLogger("mnn_guard")


def _action(previous: int, index: int) -> Action:
    """Re-init on the same rung, fall back to a slower one, or promote to a faster one."""
    if index == previous:
        return Action.REINIT
    return Action.FALLBACK if index > previous else Action.PROMOTE


class _InitThread:
    """A daemon thread that runs `call_with_timeout`'s calls one at a time, kept while idle
    (a start costs no thread creation); one still busy past its timeout is simply not reused."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], dict[str, Any], threading.Event]]
        self.calls = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="mnn-guard-init", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, box, done = self.calls.get()
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            del fn, box
            _IDLE.append(self)  # before `done`: the caller's next call may take it again
            done.set()
            del done


_IDLE: list[_InitThread] = []  # init threads free for a call
os.register_at_fork(after_in_child=_IDLE.clear)  # their threads are not in a forked child


def call_with_timeout(fn: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """Run `fn` in a daemon thread and raise InitTimeout if it has not returned in `timeout` s.

    A hang inside MNN that holds the GIL cannot be interrupted this way (docs/ops.md); such
    hangs are prevented up front (ForkAfterLoad) and, in a pool, ended by the parent.
    """
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()
    try:
        thread = _IDLE.pop()
    except IndexError:
        thread = _InitThread()
    thread.calls.put((fn, box, done))
    if not done.wait(timeout):
        raise InitTimeout(f"{what} did not finish within {timeout:g} s (Policy.init_timeout)")
    if "error" in box:
        raise box["error"]
    return box["value"]


_SELF_CHECKED: dict[int, weakref.ref[Probe]] = {}  # probes whose goldens passed, by id


def self_check(probe: Probe) -> None:
    """Judge each case's goldens against themselves: a probe that fails this can pass nothing.

    Once per probe object: every later session of the same probe (a re-wrap, a replica's
    swap, the bench) starts without judging them again.
    """
    key = id(probe)
    known = _SELF_CHECKED.get(key)
    if known is not None and known() is probe:
        return
    for index, case in enumerate(probe.cases):
        verdict = probe.judge(case.outputs, case=index)
        if not verdict.passed:
            raise ConfigError(
                f"case {index}'s golden outputs fail the probe's own thresholds "
                f"({'; '.join(verdict.reasons)}); loosen the thresholds or re-record the probe"
            )
    _SELF_CHECKED[key] = weakref.ref(probe, partial(_forget_checked, key))


def forget_checked() -> None:
    """Forget which probes `self_check` passed (as in a fresh process)."""
    _SELF_CHECKED.clear()


def _forget_checked(key: int, _: object) -> None:
    """A checked probe was collected: its id may come back as another probe's."""
    _SELF_CHECKED.pop(key, None)


def _exhausted(name: str, history: Sequence[Attempt], why: str) -> RecoveryExhausted:
    """The error of a session whose recovery ended without a module, with every attempt."""
    lines = "\n  ".join(f"{i + 1}. {a.describe()}" for i, a in enumerate(history))
    error = RecoveryExhausted(f"session {name!r}: {why}:\n  {lines}", history)
    error.__cause__ = next((a.error for a in reversed(history) if a.error is not None), None)
    return error


def _forward_failed(name: str, exc: Exception) -> GuardError:
    """The error a caller gets when the forward raised: a GuardError as it is, else wrapped."""
    if isinstance(exc, GuardError):
        return exc
    error = ForwardFailed(f"session {name!r}: forward failed: {exc!r}")
    error.__cause__ = exc
    return error


def _served(runner: mnn.Runner, arrays: list[Array], count: int) -> list[Array]:
    """The first `count` outputs (the served ones: a probe's sentinels come after them),
    copied out of MNN alone when the runner can (`serve`)."""
    serve = getattr(runner, "serve", None)
    if callable(serve):
        served: list[Array] = serve(arrays, count)
        return served
    return runner.run(arrays)[:count]


def _fresh(recorded: RecoveryExhausted) -> RecoveryExhausted:
    """A new error equal to the recorded one: raising it never grows the recorded traceback."""
    error = RecoveryExhausted(str(recorded), recorded.attempts)
    error.__cause__ = recorded.__cause__
    return error


def _released(
    name: str, wake: threading.Event, listeners: tuple[Listener, ...], shadow: Shadow | None
) -> None:
    """What a collected, never-closed session owes (stop its threads and reference process,
    leave readiness and metrics), done by the reaper: a finalizer runs where the GC struck,
    maybe under a lock these take."""
    reaper.later(_release, name, wake, listeners, shadow)


def _on_collection(
    session: object,
    name: str,
    wake: threading.Event,
    listeners: tuple[Listener, ...],
    shadow: Shadow | None,
) -> weakref.finalize[Any, Any]:
    """The finalizer that releases a session collected without close() (none at exit: nothing
    is left to tell)."""
    reaper.start()
    finalizer = weakref.finalize(session, _released, name, wake, listeners, shadow)
    finalizer.atexit = False
    return finalizer


def _release(
    name: str, wake: threading.Event, listeners: tuple[Listener, ...], shadow: Shadow | None
) -> None:
    """Wake the session's maintenance thread (it ends), stop its shadow (thread and reference
    process), and tell its listeners it closed."""
    wake.set()
    if shadow is not None:
        shadow.close()
    notify(listeners, "on_close", name)


class GuardedSession(Maintenance):
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
        raise_exhausted: bool = True,
    ) -> None:
        if not callable(factory):
            raise FactoryError(f"factory must be callable, got {type(factory).__name__}")
        self_check(probe)
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
        self._output_names = probe.served_names
        self._sentinels = bool(probe.sentinel_names)  # loaded after the served outputs
        self._check_inputs = InputChecker(probe.inputs, check_finite=policy.check_finite_inputs)
        self._judgement = Judgement(probe, factory)  # a local reference, built when needed
        self._shadow: Shadow | None = None  # every N-th call judged against a reference
        if policy.shadow_every is not None:
            self._shadow = Shadow(
                name, probe, factory, every=policy.shadow_every, on_check=self._shadowed,
                process=policy.shadow_process, timeout=policy.init_timeout or policy.wait_timeout,
            )  # fmt: skip
        self._recorded = len(probe.cases)  # canary cases recorded (live ones may follow)
        self._served = 0  # calls served, counted for the shadow's sampling
        self._generation = 0  # modules installed so far (a shadow sample names its module)
        self._recheck_calls = policy.recheck_calls
        # Everything below is guarded by _cond; its lock also serialises forwards on _live.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = State.STARTING
        self._entered = time.time()  # wall-clock time of the last change of state
        self._live: mnn.Runner | None = None
        self._rung_index = 0
        self._history: tuple[Attempt, ...] = ()
        self._verdict: Verdict | None = None
        self._failure: RecoveryExhausted | None = None  # recorded in FAILED, never raised itself
        self._since = clock()  # when the current rung was entered or last tried for promotion
        self._last_check = self._since
        self._calls = 0  # successful calls since the last re-check
        self._maintaining = False  # one maintenance pass at a time
        # Listeners see states in order, each with the latest snapshot.
        self._publishing = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish()  # STARTING: not ready until a module passes
        if not self._recover(0, announce_first=False) and raise_exhausted:
            assert self._failure is not None
            if self._shadow is not None:
                self._shadow.close()
            raise _fresh(self._failure)
        self._finalizer = _on_collection(self, name, self._wake, self._listeners, self._shadow)
        self._await_shadow(policy.init_timeout or policy.wait_timeout)
        if policy.background and self._needs_maintenance():
            periods = [v for v in (policy.promote_after, policy.recheck_seconds) if v is not None]
            self._thread = threading.Thread(
                target=maintenance_loop,
                args=(weakref.ref(self), self._wake, min([*periods, 1.0])),
                name=f"mnn-guard-{name}",
                daemon=True,
            )
            self._thread.start()

    def _await_shadow(self, timeout: float) -> None:
        """Serve from the start with the shadow's reference built: wait for it, within `timeout`
        (a fault only live inputs show would be served unchecked meanwhile)."""
        shadow = self._shadow
        if shadow is None or self._state is not State.SERVING or shadow.wait_ready(timeout):
            return
        log.warning(
            "session %s: the shadow's reference was not built within %.0f s; serving, and "
            "checking sampled calls once it is", self.name, timeout,
        )  # fmt: skip

    # ----------------------------------------------------------------- state

    def _to(self, state: State) -> bool:
        """The one place the state changes (the caller holds `_cond`): check, set, wake waiters.

        A closed session stays closed: a move from CLOSED is refused (returns False), so work
        that finishes after `close()` changes nothing. Outside the live states no module is held.
        """
        if self._state is State.CLOSED:
            return False
        if state not in MOVES[self._state]:
            raise AssertionError(f"session {self.name!r}: no move {self._state} -> {state}")
        if state is not self._state:
            self._entered = time.time()
        self._state = state
        if state not in LIVE:
            self._live = None
        self._cond.notify_all()
        return True

    def _snapshot(self) -> SessionStatus:
        return SessionStatus(
            name=self.name,
            state=self._state,
            rung=self.policy.ladder[self._rung_index],
            rung_index=self._rung_index,
            verdict=self._verdict,
            history=self._history,
            since=self._entered,
            shadow=None if self._shadow is None else self._shadow.status,
        )

    @property
    def status(self) -> SessionStatus:
        """State, rung in use, attempts of the last recovery and the last verdict, all at once."""
        with self._lock:
            return self._snapshot()

    def _publish(self) -> None:
        """Tell listeners the latest status (in order: a late publisher sends the newest)."""
        with self._publishing:
            notify(self._listeners, "on_status", self.name, self.status)

    # -------------------------------------------------------------- building

    def _attempt(self, index: int, *, retry: bool = False) -> tuple[mnn.Runner | None, Attempt]:
        """One init + canary on rung `index`: the module (None unless it passed) and the record.

        `retry` (the rung already failed in this recovery) raises the SNR limits by
        `Policy.retry_margin_db`.
        """
        rung: Rung = self.policy.ladder[index]
        notify(self._listeners, "on_init", self.name, rung)
        start = time.perf_counter()
        runner: mnn.Runner | None = None
        verdict: Verdict | None = None
        error: BaseException | None = None
        failed: dict[int, Any] = {}
        notes: tuple[str, ...] = ()
        turned_static = False
        basis = Basis.GOLDEN
        margin = self.policy.retry_margin_db if retry else 0.0
        try:
            mnn.check_not_forked()

            what = f"init + canary of session {self.name!r} on rung {rung.name!r}"
            runner, canary = call_with_timeout(
                partial(
                    init_and_check,
                    self._factory,
                    rung.overrides,
                    self.probe,
                    self.policy.canary_runs,
                    judgement=self._judgement,
                    retry_margin_db=margin,
                ),
                self.policy.init_timeout,
                what,
            )
            verdict, failed = canary.verdict, canary.failed_outputs
            notes, turned_static, basis = canary.notes, canary.turned_static, canary.basis
            outcome = Outcome.PASS if verdict.passed else Outcome.FAIL
        except InitTimeout as exc:
            outcome, error = Outcome.TIMEOUT, exc
        except ForkAfterLoad:
            raise  # no rung can work in this process
        except Exception as exc:
            outcome, error, notes = Outcome.ERROR, exc, mnn.notes_of(exc)
        seconds = time.perf_counter() - start
        attempt = Attempt(
            rung, index, outcome, verdict, error, seconds, failed, notes, turned_static, basis
        )
        notify(self._listeners, "on_attempt", self.name, attempt)
        return (runner if attempt.passed else None), attempt

    def _recover(self, start: int, *, announce_first: bool) -> bool:
        """Walk the ladder from `start`: SERVING with the first module that passes, else FAILED.

        Whatever ends the walk, `BaseException` included, leaves a defined state: a walk that
        raises enters FAILED (recording why) before the exception goes on to its caller.
        """
        attempts: list[Attempt] = []
        previous = self._rung_index
        try:
            for walk in range(2):  # a second walk only when the goldens are in dispute
                for index in range(start, len(self.policy.ladder)):
                    for _ in range(1 + self.policy.reinit_attempts):
                        if attempts or announce_first:
                            self._announce(_action(previous, index), previous, index)
                        previous = index
                        retry = any(a.rung_index == index for a in attempts)
                        runner, attempt = self._attempt(index, retry=retry)
                        attempts.append(attempt)
                        if runner is not None:
                            self._install(runner, index, tuple(attempts))
                            return True
                why = None if walk else self._judgement.dispute([a.outputs for a in attempts])
                if why is None:
                    break
                log.warning("session %s: %s", self.name, why)
                previous = start  # the walk starts over: a re-init, not a promotion
        except BaseException as exc:
            why = f"recovery was interrupted by {type(exc).__name__}: {exc}"
            self._fail(tuple(attempts), why, cause=exc)
            raise
        self._fail(tuple(attempts), "every rung of the ladder failed its canary")
        return False

    def _announce(self, action: Action, previous: int, index: int) -> None:
        ladder = self.policy.ladder
        notify(self._listeners, "on_recover", self.name, action, ladder[previous], ladder[index])

    def _install(self, runner: mnn.Runner, index: int, history: tuple[Attempt, ...]) -> bool:
        """Enter SERVING with a module whose canary passed (dropped if the session closed)."""
        with self._cond:
            if not self._to(State.SERVING):
                return False
            self._live = runner
            self._rung_index = index
            self._history = history
            self._verdict = history[-1].verdict
            self._failure = None
            self._since = self._last_check = self._clock()
            self._calls = 0
            self._generation += 1
            if self._shadow is not None:  # its worst SNR starts over with this module
                self._shadow.installed(self._generation)
        self._publish()
        if self._shadow is not None:
            self._shadow.start()
        return True

    def _fail(
        self, history: tuple[Attempt, ...], why: str, cause: BaseException | None = None
    ) -> None:
        """Enter FAILED, recording the error that `run()` raises afresh to every caller."""
        error = _exhausted(self.name, history, why)
        if cause is not None:
            error.__cause__ = cause
        with self._cond:
            if not self._to(State.FAILED):
                return
            self._failure = error
            self._history = history
            if history:  # status, /readyz and the rung gauge name the rung the verdict is from
                self._verdict = history[-1].verdict
                self._rung_index = history[-1].rung_index
            self._since = self._clock()
        self._publish()

    # --------------------------------------------------------------- serving

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Array]:
        """Run the module on validated inputs; returns owned numpy arrays by output name."""
        start = time.perf_counter()
        try:
            arrays = self._check_inputs(inputs)
        except InputMismatch:
            self._ran(self._rung_index, start, Call.INVALID)
            raise
        sampled = 0  # the module generation of a call the shadow samples (0: not sampled)
        with self._lock:  # the condition's own lock (Condition.__enter__ costs a Python call)
            live = self._live  # set exactly in the live states (`_to`)
            refused = None
            if live is None:
                refused = self._await_module()
                live = self._live
            index = self._rung_index
            if refused is None:
                assert live is not None
                try:
                    if self._sentinels:
                        outputs = _served(live, arrays, len(self._output_names))
                    else:
                        outputs = live.run(arrays)
                except Exception as exc:
                    refused = (Call.ERROR, _forward_failed(self.name, exc))
                else:
                    if self._recheck_calls is not None:  # counted under the lock: none is lost
                        self._calls += 1
                        if self._calls == self._recheck_calls:
                            self._wake.set()
                    if self._shadow is not None:
                        self._served += 1
                        if self._served % self._shadow.every == 0:
                            sampled = self._generation
        if refused is None and len(outputs) != len(self._output_names):
            assert live is not None
            refused = (Call.ERROR, self._mismatch(live, arrays, len(outputs)))
        if refused is not None:
            self._ran(index, start, refused[0])
            raise refused[1]
        if sampled:  # copied before the caller owns the outputs; never waits (a full queue drops)
            assert self._shadow is not None
            self._shadow.offer(arrays, outputs, sampled, (index, self.policy.ladder[index]))
        if self._run_listeners:
            self._ran(index, start, CALL_OK)
        return dict(zip(self._output_names, outputs, strict=False))  # lengths checked above

    def _mismatch(self, live: mnn.Runner, arrays: list[Array], got: int) -> OutputMismatch:
        """The error of a forward that returned `got` outputs, with what MNN says on one more
        forward (under the module's lock; only on this error path, never on a served call)."""
        with self._lock:
            said = mnn.why_no_outputs(live, arrays)
        return OutputMismatch(
            f"session {self.name!r}: the module returned {got} outputs, expected "
            f"{self._output_names} (MNN returns [] on an internal shape error)"
            + (f"; MNN said: {'; '.join(said)}" if said else "")
        )

    def _await_module(self) -> tuple[Call, GuardError] | None:
        """Wait (holding `_cond`) until a module serves: None, or why the call is refused."""
        deadline = time.monotonic() + self.policy.wait_timeout
        while self._state not in LIVE:
            if self._state is State.CLOSED:
                return Call.CLOSED, SessionClosed(f"session {self.name!r} is closed")
            if self._state is State.FAILED:
                assert self._failure is not None
                return Call.FAILED, _fresh(self._failure)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Call.UNAVAILABLE, Unavailable(
                    f"session {self.name!r}: no healthy module within "
                    f"{self.policy.wait_timeout:g} s while it was {self._state.value} "
                    "(Policy.wait_timeout); try again later"
                )
            self._cond.wait(remaining)
        return None

    def _ran(self, index: int, start: float, result: Call) -> None:
        seconds = time.perf_counter() - start
        rung = self.policy.ladder[index]
        for listener in self._run_listeners:
            try:
                listener.on_run(self.name, rung, seconds, result)
            except Exception:  # as notify(): a listener never fails the call it observes
                log.exception("listener %r failed on on_run", listener)

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the module and stop the maintenance thread; idempotent."""
        with self._cond:
            if not self._to(State.CLOSED):
                return
        self._wake.set()
        if self._shadow is not None:
            self._shadow.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._publishing:
            self._finalizer.detach()
            notify(self._listeners, "on_close", self.name)

    def __enter__(self) -> GuardedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<GuardedSession {self.name!r} {self.status.describe()}>"
