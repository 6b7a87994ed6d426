"""What `GuardedSession.maintain()` does: re-checks of the live module, promotion, retries.

A mixin of `guard.session.GuardedSession`: it changes state only through the session's one
transition method, `_to`, under the session's Condition, and builds modules through the
session's own `_attempt` and `_recover`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guard.canary import run_canary
from guard.errors import GuardError
from guard.judgement import Judgement
from guard.ladder import Action, Attempt, Basis, Outcome, Policy
from guard.listeners import Listener, notify
from guard.shadow import MAX_CASES, Sample, Shadow, ShadowCheck, ShadowResult
from guard.state import SessionStatus, State
from probes import Probe, ProbeError, Verdict

if TYPE_CHECKING:
    from guard import mnn

__all__ = ["Maintenance", "maintenance_loop"]

log = logging.getLogger("mnn_guard")


def maintenance_loop(ref: weakref.ref[Maintenance], wake: threading.Event, every: float) -> None:
    """Run `maintain()` when woken or every `every` s, until the session is closed or collected.

    It holds the session only during `maintain()`, so a session dropped without `close()` is
    collected and this thread ends.
    """
    while True:
        wake.wait(every)
        wake.clear()
        session = ref()
        if session is None or session.status.closed:
            return
        try:
            session.maintain()
        except GuardError:
            pass  # recorded in status and metrics; run() raises it to callers
        except BaseException:  # even SystemExit from a factory: record it, keep maintaining
            log.exception("session %s: maintenance failed", session.name)
        del session


class Maintenance:
    """Re-checks, promotion and retries of a guarded session (a mixin of GuardedSession)."""

    # what the session holds (all guarded by _cond, whose lock is _lock)
    name: str
    probe: Probe
    policy: Policy
    _cond: threading.Condition
    _lock: threading.Lock
    _state: State
    _live: mnn.Runner | None
    _rung_index: int
    _verdict: Verdict | None
    _since: float
    _last_check: float
    _calls: int
    _maintaining: bool
    _clock: Callable[[], float]
    _judgement: Judgement
    _listeners: tuple[Listener, ...]
    _shadow: Shadow | None
    _generation: int
    _recorded: int  # canary cases the probe was recorded with (live ones follow)

    if TYPE_CHECKING:  # the session's own methods, which the mixin uses

        @property
        def status(self) -> SessionStatus: ...
        def _to(self, state: State) -> bool: ...
        def _publish(self) -> None: ...
        def _attempt(
            self, index: int, *, retry: bool = False
        ) -> tuple[mnn.Runner | None, Attempt]: ...
        def _recover(self, start: int, *, announce_first: bool) -> bool: ...
        def _announce(self, action: Action, previous: int, index: int) -> None: ...
        def _fail(
            self, history: tuple[Attempt, ...], why: str, cause: BaseException | None = None
        ) -> None: ...
        def _install(
            self, runner: mnn.Runner, index: int, history: tuple[Attempt, ...]
        ) -> bool: ...

    def _needs_maintenance(self) -> bool:
        p = self.policy
        return p.promote_after is not None or p.recheck_every is not None

    def maintain(self, *, force_recheck: bool = False) -> list[Action | str]:
        """Do whatever is due now: a re-check of the live module, a promotion, a retry.

        Runs in the background thread when `Policy.background` is set; call it yourself with a
        fake clock in tests. Returns what it did. One pass at a time: a call made while another
        runs returns [] at once.
        """
        with self._cond:
            if self._maintaining or self._state is State.CLOSED:
                return []
            self._maintaining = True
        try:
            return self._maintain(force_recheck)
        finally:
            with self._cond:
                self._maintaining = False

    def _maintain(self, force_recheck: bool) -> list[Action | str]:
        p = self.policy
        now = self._clock()
        with self._lock:
            state, since, last_check = self._state, self._since, self._last_check
            calls, index = self._calls, self._rung_index
        promote_due = p.promote_after is not None and now - since >= p.promote_after
        if state is State.FAILED:
            if not promote_due:
                return []
            self._recover(0, announce_first=False)
            return ["retry"]
        if state is not State.SERVING:
            return []
        done: list[Action | str] = []
        every_calls, every_seconds = p.recheck_calls, p.recheck_seconds
        calls_due = every_calls is not None and calls >= every_calls
        time_due = every_seconds is not None and now - last_check >= every_seconds
        if force_recheck or calls_due or time_due:
            done.append("recheck")
            if not self._recheck():
                return done
        if index > 0 and promote_due and self._promote(index):
            done.append(Action.PROMOTE)
        return done

    def _recheck(self) -> bool:
        """Re-run the canary on the live module (CHECKING); on failure replace it (REPLACING).

        Callers keep being served between the canary's forwards (each holds the module's lock
        for one forward); judging happens outside the lock. At the first failing judgement the
        module is taken out of service and callers wait for its replacement.
        """
        with self._cond:
            live, index, last_check = self._live, self._rung_index, self._last_check
            if live is None or not self._to(State.CHECKING):
                return False
            self._calls = 0
            self._last_check = self._clock()
        self._publish()
        attempt: Attempt | None = None
        try:
            attempt = self._check(live, index)
            notify(self._listeners, "on_check", self.name, attempt)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: leave CHECKING, then raise
            self._interrupted(exc, attempt, last_check)
            raise
        with self._cond:
            if not self._to(State.SERVING if attempt.passed else State.REPLACING):
                return False  # closed meanwhile
            self._verdict = attempt.verdict
        self._publish()
        if attempt.passed:
            return True
        return self._recover(index, announce_first=True)

    def _check(self, live: mnn.Runner, index: int) -> Attempt:
        """The canary on the live module, as an attempt (a forward that raised is an error)."""
        start = time.perf_counter()
        verdict: Verdict | None = None
        error: Exception | None = None
        failed: dict[int, Any] = {}
        basis = Basis.GOLDEN
        try:
            canary = run_canary(
                live,
                self.probe,
                self.policy.canary_runs,
                judgement=self._judgement,
                gate=self._lock,
                stop_at_failure=True,
            )
            verdict, failed, basis = canary.verdict, canary.failed_outputs, canary.basis
            outcome = Outcome.PASS if verdict.passed else Outcome.FAIL
        except Exception as exc:
            outcome, error = Outcome.ERROR, exc
        seconds = time.perf_counter() - start
        rung = self.policy.ladder[index]
        return Attempt(rung, index, outcome, verdict, error, seconds, failed, basis=basis)

    def _interrupted(self, exc: BaseException, attempt: Attempt | None, last_check: float) -> None:
        """Leave CHECKING after an interrupted re-check.

        A module the re-check found bad is out of service (FAILED, saying why); one it did not
        find bad serves on, and the re-check stays due.
        """
        why = f"a re-check was interrupted by {type(exc).__name__}: {exc}"
        if attempt is not None and not attempt.passed:
            with self._cond:
                self._to(State.REPLACING)
            self._fail((attempt,), why, exc)
            return
        with self._cond:
            self._last_check = last_check
            moved = self._to(State.SERVING)
        if moved:
            self._publish()
        log.warning("session %s: %s; the module serves on (nothing found it bad)", self.name, why)

    def _shadowed(self, check: ShadowCheck) -> None:
        """A shadow check ended (in the shadow's thread): listeners hear it; a divergence acts."""
        notify(self._listeners, "on_shadow", self.name, check)
        if check.result is ShadowResult.FAIL and check.sample is not None:
            self._diverged(check, check.sample)

    def _diverged(self, check: ShadowCheck, sample: Sample) -> None:
        """A live call diverged from the reference: its inputs join the canary, and the module
        that served it leaves service at once (as after a failed re-check); a module installed
        since is re-checked with the new case."""
        with self._cond:
            while self._maintaining and self._state is not State.CLOSED:
                self._cond.wait(0.05)  # one maintenance pass at a time (maintain() polls too)
            if self._state is State.CLOSED:
                return
            self._maintaining = True
        try:
            self._adopt(check)
            with self._cond:
                serving = self._state is State.SERVING
                current = serving and sample.generation == self._generation
                index = self._rung_index
                if current and not self._to(State.REPLACING):
                    return
            if current:
                self._publish()
                self._recover(index, announce_first=True)
            elif serving:
                self._recheck()
        finally:
            with self._cond:
                self._maintaining = False

    def _adopt(self, check: ShadowCheck) -> None:
        """Add the diverging call to the session's canary (at most MAX_CASES live cases)."""
        probe = self.probe
        if len(probe.cases) - self._recorded >= MAX_CASES:
            return
        try:
            extended = dataclasses.replace(probe, cases=(*probe.cases, check.case(probe)))
        except ProbeError as exc:  # e.g. a reference output with NaN: no golden to keep
            log.warning("session %s: the diverging call cannot join the canary: %s", self.name, exc)
            return
        judgement = self._judgement.with_probe(extended, check.reference)
        with self._cond:
            self.probe, self._judgement = extended, judgement
        if self._shadow is not None:
            self._shadow.probe = extended
        notify(self._listeners, "on_canary", self.name, extended)

    def _promote(self, current: int) -> bool:
        """Build each faster rung off the request path; swap in the first whose canary passes."""
        with self._lock:
            self._since = self._clock()
        for index in range(current):
            runner, attempt = self._attempt(index)
            if runner is not None:
                self._announce(Action.PROMOTE, current, index)
                return self._install(runner, index, (attempt,))
        return False
