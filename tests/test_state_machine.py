"""The session's state machine: every way out of a recovery ends in a defined state, nothing
waits without bound, a failed session does not leak, a dropped one cleans up after itself.

Real demo-vocoder modules throughout; faults wrap them; only time is faked (FakeClock).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, reference
from plans import CANARY_FORWARDS, Plan, Turning, plan_session, served_clean

import guard
import probes
from guard import health
from guard.ladder import Attempt
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo
from probes import measures

Array = np.ndarray[Any, Any]
BOUND = 30.0  # no test step may take longer than this: a hang fails instead of blocking CI


def rss_mb() -> float:
    """This process's resident set size in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Scripted:
    """A factory whose n-th init does what `plan[n]` says (the last entry repeats).

    "clean": a real module; "turns": a real module that degrades once its canary has run
    (4 forwards); "bad": degraded at once; "exit": raises SystemExit after `gate` is set;
    "gated": a real module, built once `gate` is set.
    """

    def __init__(self, plan: list[str], gate: threading.Event | None = None) -> None:
        self.plan = plan
        self.gate = gate
        self.inits = 0
        self.entered = threading.Event()  # an init that waits on `gate` has begun
        real = demo.demo_factory()
        self._makers: dict[str, Callable[..., Any]] = {
            "clean": real,
            "turns": FaultyFactory(real, fault=Fault.ZEROS, rate=1.0, degrade_after=4),
            "bad": FaultyFactory(real, fault=Fault.ZEROS, rate=1.0, affects="all"),
        }

    def __call__(self, **overrides: Any) -> Any:
        step = self.plan[min(self.inits, len(self.plan) - 1)]
        self.inits += 1
        if step in ("exit", "gated"):
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(BOUND)
        if step == "exit":
            raise SystemExit(3)
        return self._makers["clean" if step == "gated" else step](**overrides)


def recheck_fails_then(
    plan_after: list[str], demo_probe: probes.Probe, **kw: Any
) -> tuple[guard.GuardedSession, Scripted, FakeClock, CapturingListener]:
    """A serving session whose first module turns bad; later inits follow `plan_after`."""
    factory = Scripted(["turns", *plan_after], gate=kw.pop("gate", None))
    clock, listener = FakeClock(), CapturingListener()
    session = guard.wrap(
        factory,
        demo_probe,
        name="sm",
        metrics=False,
        clock=clock,
        listeners=[listener],
        policy=guard.Policy(
            background=False, promote_after=60.0, reinit_attempts=0, wait_timeout=BOUND, **kw
        ),
    )
    return session, factory, clock, listener


def test_systemexit_during_replacement_fails_callers_within_the_bound(
    demo_probe: probes.Probe,
) -> None:
    """A factory raising SystemExit while a failed re-check is replaced: the waiting caller gets
    RecoveryExhausted (not a hang), maintain() re-raises SystemExit, the session is FAILED."""
    gate = threading.Event()
    session, factory, _, _ = recheck_fails_then(["exit"], demo_probe, gate=gate)
    x = demo.demo_mel(50, seed=4)
    outcome: list[BaseException | str] = []

    def caller() -> None:
        assert factory.entered.wait(BOUND)  # the replacement has begun: this call must wait
        try:
            session.run({"mel": x})
            outcome.append("served")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    releaser = threading.Timer(0.2, gate.set)  # let the caller reach its wait first
    releaser.start()
    with pytest.raises(SystemExit):
        session.maintain(force_recheck=True)
    thread.join(BOUND)
    releaser.join()
    assert not thread.is_alive(), "a caller was still waiting after the recovery ended"
    assert session.status.state is guard.State.FAILED
    assert len(outcome) == 1 and isinstance(outcome[0], guard.RecoveryExhausted)
    assert "SystemExit" in str(outcome[0])
    assert isinstance(outcome[0].__cause__, SystemExit)
    session.close()


def test_a_later_maintenance_pass_recovers_after_systemexit(demo_probe: probes.Probe) -> None:
    """After SystemExit ended a replacement in FAILED, the next retry builds a good module."""
    session, _, clock, listener = recheck_fails_then(["exit", "clean"], demo_probe)
    with pytest.raises(SystemExit):
        session.maintain(force_recheck=True)
    assert session.status.state is guard.State.FAILED
    with pytest.raises(guard.RecoveryExhausted):
        session.run({"mel": demo.demo_mel(20)})
    assert session.maintain() == []  # the retry waits for promote_after
    clock.advance(61)
    assert session.maintain() == ["retry"]
    x = demo.demo_mel(30, seed=8)
    assert measures.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45
    states = [e.state for e in listener.of("status")]
    assert states == ["starting", "serving", "checking", "replacing", "failed", "serving"]
    session.close()


def test_background_thread_survives_systemexit_and_retries(demo_probe: probes.Probe) -> None:
    """The maintenance thread records a SystemExit from the factory and keeps going: a later
    pass (real time, promote_after 0.2 s) brings the session back to SERVING."""
    factory = Scripted(["turns", "exit", "clean"])
    session = guard.wrap(
        factory,
        demo_probe,
        name="sm-bg",
        metrics=False,
        policy=guard.Policy(promote_after=0.2, reinit_attempts=0, recheck_every=6),
    )
    x = demo.demo_mel(20, seed=2)
    deadline = time.monotonic() + BOUND
    served_after = None
    while time.monotonic() < deadline:
        try:
            out = session.run({"mel": x})["wav"]
        except guard.RecoveryExhausted:
            continue  # FAILED until the retry
        if factory.inits >= 3:
            served_after = out
            break
    assert served_after is not None, f"no recovery within {BOUND} s; {session.status.describe()}"
    assert measures.snr_db(reference(x), served_after) > 45
    session.close()


def test_failed_session_raises_a_fresh_error_per_call(demo_probe: probes.Probe) -> None:
    """Each run() on a FAILED session raises a new exception; none grows a shared traceback."""
    session, _, _, _ = recheck_fails_then(["bad"], demo_probe)
    session.maintain(force_recheck=True)
    assert session.status.state is guard.State.FAILED
    seen: list[guard.RecoveryExhausted] = []
    for _ in range(3):
        with pytest.raises(guard.RecoveryExhausted) as info:
            session.run({"mel": demo.demo_mel(10)})
        seen.append(info.value)
    assert len({id(e) for e in seen}) == 3
    assert all(e.attempts == seen[0].attempts and str(e) == str(seen[0]) for e in seen)
    session.close()


def test_failing_calls_with_large_inputs_keep_rss_flat(demo_probe: probes.Probe) -> None:
    """1,000 failing calls with 1 MB inputs each: RSS stays within a few MB."""
    session, _, _, _ = recheck_fails_then(["bad"], demo_probe)
    session.maintain(force_recheck=True)
    base = demo.demo_mel(3277)  # 80 x 3277 float32: 1 MB
    assert base.nbytes >= 1 << 20

    def fail_once() -> None:
        with contextlib.suppress(guard.RecoveryExhausted):
            session.run({"mel": base.copy()})

    for _ in range(20):
        fail_once()
    gc.collect()
    before = rss_mb()
    for _ in range(1000):
        fail_once()
    gc.collect()
    grown = rss_mb() - before
    print(f"1,000 failing calls with 1 MB inputs: RSS {grown:+.1f} MB")
    assert grown < 16
    session.close()


def test_sessions_dropped_without_close_are_collected(demo_probe: probes.Probe) -> None:
    """60 sessions (each with a maintenance thread) dropped without close(): threads end, the
    sessions are collected, readiness forgets them, RSS returns near baseline."""

    def build(k: int) -> weakref.ref[guard.GuardedSession]:
        session = guard.wrap(demo.demo_factory(), demo_probe, name=f"drop-{k}", metrics=False)
        assert session.status.healthy
        return weakref.ref(session)

    def our_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("mnn-guard-drop-")]

    def wait_for_no_threads() -> None:
        deadline = time.monotonic() + BOUND
        while our_threads() and time.monotonic() < deadline:
            time.sleep(0.01)  # each thread ends by itself once woken; wait for that, bounded

    build(-1)  # warm up: MNN's pools and caches
    gc.collect()
    wait_for_no_threads()
    threads_before = threading.active_count()
    rss_before = rss_mb()
    refs = [build(k) for k in range(60)]
    assert len(our_threads()) <= 60
    gc.collect()
    wait_for_no_threads()
    alive = [r for r in refs if r() is not None]
    grown = rss_mb() - rss_before
    print(f"60 dropped sessions: {len(alive)} alive, RSS {grown:+.1f} MB")
    assert alive == []
    assert our_threads() == []
    assert threading.active_count() <= threads_before
    assert not any(name.startswith("drop-") for name in health.HEALTH.sessions())
    assert grown < 20


def test_status_snapshots_are_never_torn(demo_probe: probes.Probe) -> None:
    """8 threads read status while the session swaps rungs again and again: every snapshot is
    one state (its rung is the one its last attempt ran on, and a healthy one passed)."""
    # per cycle: a promotion to static that passes and then turns, a failing static re-init,
    # a clean dynamic init
    plan = ["bad", "clean"] + ["turns", "bad", "clean"] * 6
    factory = Scripted(plan)
    clock = FakeClock()
    session = guard.wrap(
        factory,
        demo_probe,
        name="torn",
        metrics=False,
        clock=clock,
        # inits in this thread: at a 1 us switch interval beside 8 readers, an init thread of
        # its own got too little of the GIL on a loaded CI machine and hit its 60 s bound
        policy=guard.Policy(
            background=False, promote_after=1.0, reinit_attempts=0, init_timeout=None
        ),
    )
    stop = threading.Event()
    torn: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            s = session.status
            reads[0] += 1
            if s.history and s.rung_index != s.history[-1].rung_index:
                torn.append(f"rung {s.rung_index} vs last attempt {s.history[-1].rung_index}")
            if s.healthy and s.history and not s.history[-1].passed:
                torn.append(f"healthy after a failed attempt: {s.describe()}")

    threads = [threading.Thread(target=reader) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: tears would show
    for t in threads:
        t.start()
    rungs = []
    try:
        for _ in range(6):
            clock.advance(2)
            assert session.maintain() == [guard.ladder.Action.PROMOTE]
            rungs.append(session.status.rung_index)
            assert session.maintain(force_recheck=True) == ["recheck"]
            rungs.append(session.status.rung_index)
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for t in threads:
            t.join(BOUND)
    print(f"status reads: {reads[0]}, torn: {len(torn)}")
    assert rungs == [0, 1] * 6
    assert torn == []
    session.close()


def test_every_move_is_one_the_table_allows(demo_probe: probes.Probe) -> None:
    """Each published state follows from the previous one by a move in guard.state.MOVES."""
    from guard.state import MOVES, State

    session, _, clock, listener = recheck_fails_then(["bad", "bad", "clean"], demo_probe)
    session.maintain(force_recheck=True)  # turns bad -> replacing -> both rungs fail -> failed
    clock.advance(61)
    session.maintain()  # retry -> serving
    session.close()
    states = [State(e.state) for e in listener.of("status")]
    assert states[:2] == [State.STARTING, State.SERVING]
    for old, new in itertools.pairwise(states):
        assert new in MOVES[old], f"{old} -> {new}"
    assert listener.of("close") and session.status.state is State.CLOSED
    with pytest.raises(guard.errors.SessionClosed):
        session.run({"mel": demo.demo_mel(10)})


def test_a_caller_waiting_for_a_replacement_is_served_by_it(demo_probe: probes.Probe) -> None:
    """A call that arrives while the module is being replaced waits, then runs on the new one."""
    gate = threading.Event()
    session, factory, _, _ = recheck_fails_then(["gated"], demo_probe, gate=gate)
    worker = threading.Thread(target=session.maintain, kwargs={"force_recheck": True})
    worker.start()
    assert factory.entered.wait(BOUND)  # the re-check failed; the replacement is being built
    assert session.status.state is guard.State.REPLACING
    opener = threading.Timer(0.2, gate.set)  # long after run() below has begun to wait
    opener.start()
    mel = demo.demo_mel(30)
    out = session.run({"mel": mel})["wav"]
    worker.join(BOUND)
    np.testing.assert_allclose(out, reference(mel), rtol=0, atol=1e-5)
    assert (session.status.state, factory.inits) == (guard.State.SERVING, 2)
    session.close()


def test_wait_for_a_replacement_is_bounded_by_policy(demo_probe: probes.Probe) -> None:
    """A caller waiting for a replacement that takes longer than wait_timeout gets Unavailable,
    which names the setting that bounded the wait."""
    gate = threading.Event()
    factory = Scripted(["turns", "exit"], gate=gate)
    session = guard.wrap(
        factory,
        demo_probe,
        name="bounded",
        metrics=False,
        policy=guard.Policy(
            background=False, promote_after=None, reinit_attempts=0, wait_timeout=0.3
        ),
    )
    errors: list[BaseException] = []

    def maintain() -> None:
        try:
            session.maintain(force_recheck=True)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=maintain)
    worker.start()
    assert factory.entered.wait(BOUND)
    started = time.monotonic()
    with pytest.raises(guard.Unavailable, match="wait_timeout") as info:
        session.run({"mel": demo.demo_mel(10)})
    waited = time.monotonic() - started
    gate.set()
    worker.join(BOUND)
    assert 0.3 <= waited < BOUND
    assert str(info.value) == (
        "session 'bounded': no healthy module within 0.3 s while it was replacing "
        "(Policy.wait_timeout); try again later"
    )
    assert [type(e) for e in errors] == [SystemExit]
    session.close()


# ------------------------------------------------------------------ close and the background thread


class InterruptOnce:
    """A forward fault that raises `signal` the first time (as Ctrl-C landing in a re-check's
    forward), then lets the module's own outputs through."""

    def __init__(self, signal: type[BaseException]) -> None:
        self.signal = signal
        self.raised = 0

    def __call__(self, outputs: list[Array]) -> list[Array]:
        if not self.raised:
            self.raised += 1
            raise self.signal()
        return outputs


@pytest.mark.parametrize("signal", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_recheck_of_a_clean_module_serves_on(
    demo_probe: probes.Probe, signal: type[BaseException]
) -> None:
    """An interrupt in a re-check that found nothing bad reaches maintain()'s caller; the module
    serves on (healthy, never FAILED, even with promote_after=None) and the re-check stays due."""
    clock = FakeClock()
    interrupt = InterruptOnce(signal)
    s = plan_session(
        lambda **kw: Turning(interrupt, after=CANARY_FORWARDS, **kw),
        demo_probe, clock, promote_after=None, recheck_every=60.0,
    )  # fmt: skip
    clock.advance(60)
    with pytest.raises(signal):
        s.maintain()
    assert (interrupt.raised, s.status.state, s.status.healthy) == (1, guard.State.SERVING, True)
    assert served_clean(s)
    assert s.maintain() == ["recheck"]  # still due: the interrupted one did not count
    assert (s.status.state, s.maintain()) == (guard.State.SERVING, [])
    s.close()


def test_a_recheck_interrupted_after_finding_the_module_bad_leaves_failed(
    demo_probe: probes.Probe,
) -> None:
    """An interrupt after a re-check found the module bad: maintain() re-raises it, the module
    is out of service (FAILED, saying why, the failing check in its history)."""

    class Interrupting(guard.Listener):
        def on_check(self, session: str, attempt: Attempt) -> None:
            raise KeyboardInterrupt

    s = plan_session(Plan("turns"), demo_probe, FakeClock(), listeners=[Interrupting()])
    with pytest.raises(KeyboardInterrupt):
        s.maintain(force_recheck=True)
    assert s.status.state is guard.State.FAILED
    assert [a.outcome for a in s.status.history] == [guard.ladder.Outcome.FAIL]
    with pytest.raises(guard.RecoveryExhausted, match="a re-check was interrupted by Keyboard"):
        s.run({"mel": demo.demo_mel(8)})
    s.close()


def test_work_finishing_after_close_changes_nothing(demo_probe: probes.Probe) -> None:
    """A promotion whose init finishes after close() installs nothing and reports nothing."""
    plan = Plan("bad", "clean")
    holder: list[guard.GuardedSession] = []

    def factory(**kw: Any) -> Any:
        if plan.inits == 2:
            holder[0].close()
        return plan(**kw)

    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock)
    holder.append(s)
    clock.advance(301)
    assert s.maintain() == []
    assert s.status.state is guard.State.CLOSED and plan.inits == 3
    with pytest.raises(guard.errors.SessionClosed):
        s.run({"mel": demo.demo_mel(8)})


def test_status_says_since_when_in_wall_clock_time(demo_probe: probes.Probe) -> None:
    """status.since is the wall-clock time the session entered its state (what stuck() reads)."""
    before = time.time()
    s = plan_session(Plan("clean"), demo_probe, FakeClock())
    assert before <= s.status.since <= time.time()
    s.close()


@pytest.mark.usefixtures("hour_tick")
def test_close_stops_the_maintenance_thread_at_once(demo_probe: probes.Probe) -> None:
    """close() wakes and ends the background thread (idle for an hour here) within its join."""
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="stop", metrics=False,
        policy=guard.Policy(recheck_every=30.0, promote_after=None),
    )  # fmt: skip
    (thread,) = [t for t in threading.enumerate() if t.name == "mnn-guard-stop"]
    assert thread.daemon  # a session never closed cannot keep the process from exiting
    s.close()
    assert not thread.is_alive()
    assert "mnn-guard-stop" not in [t.name for t in threading.enumerate()]


def dropped(make: Callable[[], guard.GuardedSession], thread_name: str) -> threading.Thread:
    """Build a session and drop it without close(): once it is collected (asserted), its
    thread named `thread_name`."""
    session = make()
    (thread,) = [t for t in threading.enumerate() if t.name == thread_name]
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None
    return thread


@pytest.mark.usefixtures("hour_tick")
def test_a_dropped_session_cleans_up_after_itself(demo_probe: probes.Probe) -> None:
    """A session dropped without close() is collected; its thread ends; all hear of a close."""
    table = guard.health.HealthTable()
    listener = CapturingListener()
    thread = dropped(
        lambda: guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name="dropped", metrics=False,
            health=table, listeners=[listener],
            policy=guard.Policy(recheck_every=30.0, promote_after=None),
        ),
        "mnn-guard-dropped",
    )  # fmt: skip
    thread.join(BOUND)  # woken by the reaper: its idle tick is an hour away
    assert not thread.is_alive()
    deadline = time.monotonic() + BOUND  # the reaper thread tells the listeners
    while table.sessions() or [e.kind for e in listener.events][-1] != "close":
        assert time.monotonic() < deadline, "the collected session was not released"
        time.sleep(0.01)


class LockingListener(guard.Listener):
    """A listener with a lock of its own (as prometheus_client's metrics have), under which a
    garbage collection strikes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed: list[str] = []

    def on_status(self, session: str, status: Any) -> None:
        with self.lock:
            gc.collect()  # a collection while this thread holds the lock

    def on_close(self, session: str) -> None:
        with self.lock:
            self.closed.append(session)


def test_a_session_collected_under_a_listeners_lock_does_not_deadlock(
    demo_probe: probes.Probe,
) -> None:
    """A session dropped without close() and collected while its thread holds a lock its own
    release takes (a listener's, the health table's): the release waits for the reaper thread
    instead of deadlocking the collecting thread."""
    listener = LockingListener()
    policy = guard.Policy(background=False, promote_after=None)

    def drop() -> None:
        dropped = guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name="collected", metrics=False,
            listeners=[listener], policy=policy,
        )  # fmt: skip
        dropped.cycle = dropped  # type: ignore[attr-defined]  # freed only by a collection

    def collect_under_the_lock() -> None:
        drop()
        guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name="collector", metrics=False,
            listeners=[listener], policy=policy,
        ).close()  # fmt: skip

    worker = threading.Thread(target=collect_under_the_lock, daemon=True)
    worker.start()
    worker.join(BOUND)
    assert not worker.is_alive(), "the collecting thread deadlocked"
    deadline = time.monotonic() + BOUND
    while "collected" not in listener.closed:
        assert time.monotonic() < deadline, "the collected session was never released"
        time.sleep(0.01)


def test_a_failing_background_pass_is_logged_and_maintenance_goes_on(
    demo_probe: probes.Probe,
) -> None:
    """SystemExit from the factory in the maintenance thread is logged with the session's name."""
    import logging

    logged = threading.Event()
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info is not None:
                messages.append(record.getMessage())
                logged.set()

    handler = Catch()
    logging.getLogger("mnn_guard").addHandler(handler)
    try:
        s = guard.wrap(
            Plan("turns", "exit", "clean"), demo_probe, name="bg", metrics=False,
            policy=guard.Policy(recheck_every=2, promote_after=None, reinit_attempts=0),
        )  # fmt: skip
        x = demo.demo_mel(4)
        for _ in range(2):
            s.run({"mel": x})
        assert logged.wait(10)
        s.close()
    finally:
        logging.getLogger("mnn_guard").removeHandler(handler)
    assert messages == ["session bg: maintenance failed"]


def test_status_line_names_both_a_static_load_and_a_local_basis(demo_probe: probes.Probe) -> None:
    """describe() of a module MNN loaded statically and judged against a local reference says
    both."""
    from guard.ladder import STATIC_LOAD, Basis, Outcome
    from guard.state import SessionStatus, State

    verdict = demo_probe.judge(demo_probe.cases[0].outputs, case=0)
    rung = guard.DYNAMIC
    attempt = Attempt(
        rung, 1, Outcome.PASS, verdict, None, 0.1, turned_static=True, basis=Basis.LOCAL
    )
    status = SessionStatus(
        name="s", state=State.SERVING, rung=rung, rung_index=1, verdict=verdict, history=(attempt,)
    )
    assert f"({1}) [{STATIC_LOAD}] [judged against a local reference] after 1" in status.describe()


def test_a_dropped_shadowed_session_stops_its_shadow(demo_probe: probes.Probe) -> None:
    """A shadowed session dropped without close() is collected and its shadow thread ends."""
    thread = dropped(
        lambda: guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name="dropped-shadow", metrics=False,
            policy=guard.Policy(background=False, promote_after=None, shadow_every=1,
                                shadow_process=False),
        ),
        "mnn-guard-shadow-dropped-shadow",
    )  # fmt: skip
    thread.join(BOUND)  # the reaper closes the shadow, whose thread then ends
    assert not thread.is_alive()
