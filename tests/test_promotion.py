"""Maintenance on the real demo vocoder: promotion back to the fast rung, periodic re-checks,
retries of a failed session, one pass at a time.

Time is the only thing faked: a FakeClock drives `maintain()`; modules, canaries and threads
are real.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, reference
from plans import (
    CANARY_FORWARDS,
    Checks,
    Counting,
    GaugeAtEvent,
    Plan,
    Turning,
    plan_session,
    raising,
    sample,
    served_clean,
)
from polling import BOUND, until
from prometheus_client import CollectorRegistry

import guard
import probes
from guard.ladder import Action, Attempt
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo
from probes import measures

Array = np.ndarray[Any, Any]
STATIC_FAILS = [True] * 4  # the first init and its 3 re-inits on the static rung


def fallen_back(
    demo_probe: probes.Probe,
    schedule: list[bool],
    *,
    promote_after: float | None = 300.0,
    registry: CollectorRegistry | None = None,
    listeners: tuple[guard.Listener, ...] = (),
) -> tuple[guard.GuardedSession, FaultyFactory, FakeClock]:
    """A session whose static inits follow `schedule`, built at fake time 1000."""
    faulty = FaultyFactory(demo.demo_factory(), fault=Fault.NOISE, schedule=schedule)
    clock = FakeClock()
    session = guard.wrap(
        faulty,
        demo_probe,
        name="promo",
        policy=guard.Policy(background=False, promote_after=promote_after),
        registry=registry,
        metrics=registry is not None,
        listeners=listeners,
        clock=clock,
    )
    return session, faulty, clock


def test_promotion_returns_to_static_after_fallback(demo_probe: probes.Probe) -> None:
    """Static degraded for the first 4 inits: dynamic serves, then promotion brings static back."""
    registry = CollectorRegistry()
    session, faulty, clock = fallen_back(demo_probe, STATIC_FAILS, registry=registry)
    assert (session.status.mode, session.status.healthy) == ("dynamic", True)
    assert faulty.inits == 5

    clock.advance(299)
    assert session.maintain() == []  # not yet due
    assert faulty.inits == 5 and session.status.mode == "dynamic"

    clock.advance(2)
    assert session.maintain() == [guard.ladder.Action.PROMOTE]
    assert (session.status.mode, session.status.rung_index, session.status.healthy) == (
        "static",
        0,
        True,
    )
    assert faulty.inits == 6
    x = demo.demo_mel(3, seed=7)
    assert measures.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"session": "promo", **labels})

    assert sample("mnn_guard_recoveries_total", action="promote") == 1
    assert sample("mnn_guard_recoveries_total", action="fallback") == 1
    assert (sample("mnn_guard_rung", rung="static"), sample("mnn_guard_rung", rung="dynamic")) == (
        1,
        0,
    )
    assert sample("mnn_guard_healthy") == 1
    clock.advance(10_000)
    assert session.maintain() == []  # already on the fastest rung: nothing to do
    assert faulty.inits == 6
    session.close()


def test_failed_promotion_keeps_serving_and_retries_later(demo_probe: probes.Probe) -> None:
    """A promotion whose canary fails changes nothing; the next period tries again."""
    listener = CapturingListener()
    schedule = [*STATIC_FAILS, False, True]  # init 4 is dynamic; init 5 (1st promotion) degraded
    session, faulty, clock = fallen_back(demo_probe, schedule, listeners=(listener,))
    clock.advance(301)
    assert session.maintain() == []
    assert (session.status.mode, session.status.healthy, faulty.inits) == ("dynamic", True, 6)
    last = listener.of("attempt")[-1]
    assert (last.rung, last.outcome) == ("static", "fail")
    x = demo.demo_mel(3, seed=8)
    assert measures.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45

    clock.advance(200)
    assert session.maintain() == []  # the failed try restarted the period
    clock.advance(101)
    assert session.maintain() == [guard.ladder.Action.PROMOTE]
    assert (session.status.mode, faulty.inits) == ("static", 7)
    session.close()


def test_promote_after_none_disables_promotion(demo_probe: probes.Probe) -> None:
    """With promote_after=None the session stays on the slower rung and builds nothing more."""
    session, faulty, clock = fallen_back(demo_probe, STATIC_FAILS, promote_after=None)
    clock.advance(1e9)
    assert session.maintain() == []
    assert (session.status.mode, faulty.inits) == ("dynamic", 5)
    session.close()


@pytest.mark.hostile
def test_calls_during_the_swap_are_all_correct(demo_probe: probes.Probe) -> None:
    """8 threads keep calling while a promotion builds and swaps: every output is its own input's
    reference, no call fails, and calls begin and end while the new module is built."""
    session, faulty, clock = fallen_back(demo_probe, STATIC_FAILS)
    xs = [demo.demo_mel(2, seed=k) for k in range(16)]
    refs = [reference(x) for x in xs]
    stop, building, served_during_build = threading.Event(), threading.Event(), threading.Event()
    during_build = [0]
    real_factory = faulty.factory

    def held_build(**overrides: Any) -> Any:
        """The real init, held (within a bound) until a call began and ended during it: on a
        busy machine a 40 ms build may otherwise see no call finish, though none is blocked."""
        if building.is_set():
            served_during_build.wait(30)
        return real_factory(**overrides)

    faulty.factory = held_build
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        i = 0
        while not stop.is_set():
            k = (t + i) % len(xs)
            i += 1
            began = building.is_set()  # the call starts while the new module is built
            try:
                out = session.run({"mel": xs[k]})["wav"]
                mode = session.status.mode
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                results.append((mode, measures.snr_db(refs[k], out) > 45))
                if began and building.is_set():  # and ends before the swap
                    during_build[0] += 1
                    served_during_build.set()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    until("calls before the swap", lambda: len(results) >= 8)
    clock.advance(301)
    building.set()
    done = session.maintain()
    building.clear()
    until("a call on the swapped-in module", lambda: ("static", True) in results)
    stop.set()
    for t in threads:
        t.join()
    session.close()
    modes = {m for m, _ in results}
    print(f"swap under load: {len(results)} calls, {during_build[0]} completed during the build")
    assert errors == []
    assert done == [guard.ladder.Action.PROMOTE]
    assert all(ok for _, ok in results)
    assert modes == {"dynamic", "static"}
    assert during_build[0] >= 1  # a call began and ended while the new module was built


def test_background_thread_promotes_by_itself(demo_probe: probes.Probe) -> None:
    """With the default background thread and a short period, the fast rung comes back unaided."""
    faulty = FaultyFactory(demo.demo_factory(), fault=Fault.NOISE, schedule=STATIC_FAILS)
    session = guard.wrap(
        faulty,
        demo_probe,
        name="bg",
        metrics=False,
        policy=guard.Policy(promote_after=0.2),
    )
    assert session.status.mode == "dynamic"
    deadline = time.monotonic() + 20
    while session.status.mode != "static" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.status.mode == "static"
    session.close()


def degrading_factory(after: int) -> FaultyFactory:
    """A factory whose first module turns noisy (29 dB) after `after` forwards; later ones don't."""
    return FaultyFactory(
        demo.demo_factory(), fault=Fault.NOISE, schedule=[True], degrade_after=after, seed=5
    )


def test_recheck_catches_a_module_that_degrades_after_k_calls(demo_probe: probes.Probe) -> None:
    """Every K calls the canary re-runs on the live module; a failure re-initialises it."""
    k = 20
    canary_forwards = 2 * len(demo_probe.cases)
    factory = degrading_factory(after=canary_forwards + 10)
    listener = CapturingListener()
    session = guard.wrap(
        factory,
        demo_probe,
        name="recheck",
        metrics=False,
        listeners=[listener],
        policy=guard.Policy(background=False, promote_after=None, recheck_every=k),
    )
    x = demo.demo_mel(3, seed=9)
    ref = reference(x)
    snrs = [measures.snr_db(ref, session.run({"mel": x})["wav"]) for _ in range(k)]
    assert all(s > 45 for s in snrs[:10]) and all(s < 45 for s in snrs[10:])  # it did degrade
    assert session.maintain() == ["recheck"]
    assert [e.outcome for e in listener.of("check")] == ["fail"]
    assert [e.action for e in listener.of("recover")] == ["reinit"]
    assert (session.status.mode, session.status.healthy) == ("static", True)
    assert measures.snr_db(ref, session.run({"mel": x})["wav"]) > 45
    assert factory.inits == 2
    session.close()


def test_recheck_not_due_does_nothing(demo_probe: probes.Probe) -> None:
    """Before K calls maintain() leaves the module alone; at the K-th call it re-checks."""
    factory = degrading_factory(after=10**9)
    listener = CapturingListener()
    session = guard.wrap(
        factory,
        demo_probe,
        name="recheck-calls",
        metrics=False,
        listeners=[listener],
        clock=FakeClock(),
        policy=guard.Policy(background=False, promote_after=None, recheck_every=50),
    )
    x = demo.demo_mel(3, seed=10)
    for _ in range(49):
        session.run({"mel": x})
    assert session.maintain() == []
    session.run({"mel": x})
    assert session.maintain() == ["recheck"]  # the 50th call
    assert [e.outcome for e in listener.of("check")] == ["pass"]
    assert session.maintain() == []  # the counter restarted
    for _ in range(49):
        session.run({"mel": x})
    assert session.maintain() == []
    session.run({"mel": x})
    assert session.maintain() == ["recheck"]  # the 50th call since the last check
    assert factory.inits == 1 and session.status.healthy
    session.close()


def test_recheck_by_time_waits_for_the_period(demo_probe: probes.Probe) -> None:
    """With a period in seconds, maintain() re-checks only once the period has passed."""
    clock = FakeClock()
    session = guard.wrap(
        degrading_factory(after=10**9),
        demo_probe,
        name="recheck-time",
        metrics=False,
        clock=clock,
        policy=guard.Policy(background=False, promote_after=None, recheck_every=60.0),
    )
    clock.advance(59)
    assert session.maintain() == []
    clock.advance(2)
    assert session.maintain() == ["recheck"]
    assert session.maintain() == []  # the period restarted
    clock.advance(60)
    assert session.maintain() == ["recheck"]
    session.close()


@pytest.mark.parametrize(
    ("every", "calls", "seconds"),
    [(100, 100, None), (30.0, None, 30.0), (timedelta(minutes=2), None, 120.0)],
)
def test_recheck_every_counts_calls_or_seconds(
    every: int | float | timedelta, calls: int | None, seconds: float | None
) -> None:
    """`recheck_every`: an int counts calls, a float or timedelta is seconds."""
    policy = guard.Policy(recheck_every=every)
    assert (policy.recheck_calls, policy.recheck_seconds) == (calls, seconds)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recheck_every": "5m"}, "recheck_every must be an int"),
        ({"recheck_every": 0}, "recheck_every must be >= 1 call"),
        ({"recheck_every": -1.0}, "recheck_every must be > 0 seconds"),
        ({"recheck_every": timedelta(0)}, "recheck_every must be > 0 seconds"),
        ({"recheck_every": True}, "recheck_every must be an int"),
        ({"wait_timeout": 0}, "wait_timeout must be > 0"),
        ({"promote_after": 0}, "promote_after must be > 0"),
    ],
)
def test_bad_maintenance_settings_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    """Nonsense re-check or promotion settings are refused when the policy is made."""
    with pytest.raises(guard.ConfigError, match=message):
        guard.Policy(**kwargs)


def test_passing_recheck_keeps_serving_between_its_forwards(demo_probe: probes.Probe) -> None:
    """A re-check holds the live module one forward at a time: calls complete during it."""
    checking = threading.Event()  # the session published CHECKING
    served = threading.Event()  # a call completed after that
    held: list[bool] = []

    class HoldTheCheck(guard.Listener):
        """Hold the re-check at CHECKING until a caller's call completed (bounded)."""

        def on_status(self, session: str, status: guard.SessionStatus) -> None:
            if status.state is guard.State.CHECKING and not checking.is_set():
                checking.set()
                held.append(served.wait(30))

    session = guard.wrap(
        demo.demo_factory(),
        demo_probe,
        name="recheck-serving",
        metrics=False,
        listeners=[HoldTheCheck()],
        policy=guard.Policy(background=False, promote_after=None),
    )
    x = demo.demo_mel(100, seed=11)
    ref = reference(x)
    stop = threading.Event()
    during: list[float] = []

    def caller() -> None:
        while not stop.is_set():
            snr = measures.snr_db(ref, session.run({"mel": x})["wav"])
            if checking.is_set() and session.status.state is guard.State.CHECKING:
                during.append(snr)
                served.set()

    thread = threading.Thread(target=caller)
    thread.start()
    done = session.maintain(force_recheck=True)
    stop.set()
    thread.join()
    session.close()
    assert done == ["recheck"]
    assert held == [True], "no call completed while the session was CHECKING"
    assert len(during) >= 1 and all(s > 45 for s in during)


# ------------------------------------------------------------------ maintenance, in detail


def test_passing_recheck_changes_nothing(demo_probe: probes.Probe) -> None:
    """A re-check that passes keeps the module (no init), publishes CHECKING then SERVING."""
    listener = CapturingListener()
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), listeners=[listener])
    verdict, since = s.status.verdict, s.status.since
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert s.status.since > since  # it left SERVING and came back
    assert [e.outcome for e in listener.of("check")] == ["pass"]
    assert [e.state for e in listener.of("status")] == [
        "starting",
        "serving",
        "checking",
        "serving",
    ]
    assert listener.of("recover") == [] and len(listener.of("init")) == 1
    assert s.status.verdict is not None and s.status.verdict is not verdict
    assert s.status.verdict.passed and s.status.history[-1].passed
    s.close()


@pytest.mark.usefixtures("hour_tick")
def test_recheck_by_calls_wakes_the_background_thread_at_once(demo_probe: probes.Probe) -> None:
    """The call completing recheck_every wakes the thread: the re-check runs without waiting
    for the thread's idle tick (an hour here)."""
    checked = threading.Event()

    class OnCheck(guard.Listener):
        def on_check(self, session: str, attempt: Attempt) -> None:
            checked.set()

    s = guard.wrap(
        demo.demo_factory(threads=1),
        demo_probe,
        name="wake",
        metrics=False,
        listeners=[OnCheck()],
        policy=guard.Policy(recheck_every=1, promote_after=None),
    )
    s.run({"mel": demo.demo_mel(4)})
    woken = checked.wait(BOUND)
    s.close()
    assert woken, "the call that completed recheck_every did not wake the background thread"


def test_a_recheck_that_raises_is_an_error_and_the_module_is_replaced(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A re-check whose forward raises is an error (no verdict, SNR -inf); it is replaced."""
    calls = [0]

    def factory(**kw: Any) -> Turning:
        calls[0] += 1
        return Turning(raising, after=CANARY_FORWARDS if calls[0] == 1 else 10**9, **kw)

    checks = Checks()
    gauges = GaugeAtEvent(registry)
    s = plan_session(
        factory, demo_probe, FakeClock(), registry=registry, listeners=[checks, gauges]
    )
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert gauges.seen[-2] == ("check", "error", None, -math.inf)
    (check,) = checks.attempts
    assert (check.outcome, check.verdict, check.rung_index) == (guard.ladder.Outcome.ERROR, None, 0)
    assert isinstance(check.error, RuntimeError) and check.outputs == {}
    assert sample(registry, "mnn_guard_canary_checks_total", rung="static", result="error") == 1
    assert (s.status.state, calls[0]) == (guard.State.SERVING, 2)
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert checks.attempts[-1].passed and checks.attempts[-1].error is None
    assert checks.attempts[-1].outputs == {}
    s.close()


def test_a_recheck_holds_the_module_one_forward_at_a_time(demo_probe: probes.Probe) -> None:
    """A caller's forward waits for a re-check's forward: never two forwards at once."""
    caller_waiting = threading.Event()
    caller_in = threading.Event()  # a forward began while the re-check's first was held
    modules: list[Counting] = []

    def hold(number: int) -> None:
        if number == CANARY_FORWARDS + 1:  # the re-check's first forward
            assert caller_waiting.wait(30)
            caller_in.wait(0.5)  # a caller that could enter would do so now (and end the hold)
        elif number > CANARY_FORWARDS + 1:
            caller_in.set()

    s = plan_session(
        lambda **kw: modules.append(Counting(hold, **kw)) or modules[-1],
        demo_probe, FakeClock(),
    )  # fmt: skip
    x = demo.demo_mel(4)

    def caller() -> None:
        while modules[0].forwards < CANARY_FORWARDS + 1:
            time.sleep(0.001)
        caller_waiting.set()
        s.run({"mel": x})

    thread = threading.Thread(target=caller)
    thread.start()
    assert s.maintain(force_recheck=True) == ["recheck"]
    thread.join(30)
    assert modules[0].most_at_once == 1
    assert modules[0].forwards == 2 * CANARY_FORWARDS + 1
    s.close()


def test_a_failed_recheck_on_a_slower_rung_retries_that_rung_first(
    demo_probe: probes.Probe,
) -> None:
    """On the dynamic rung, a failing re-check re-initialises dynamic, not the faster static."""
    listener = CapturingListener()
    factory = Plan("bad", "turns", "clean")
    s = plan_session(factory, demo_probe, FakeClock(), listeners=[listener], promote_after=None)
    assert s.status.mode == "dynamic"
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.mode, factory.inits) == ("dynamic", 3)
    recovered = [(e.action, e.rung, e.to_rung) for e in listener.of("recover")]
    assert recovered == [("fallback", "static", "dynamic"), ("reinit", "dynamic", "dynamic")]
    s.close()


def test_failed_session_is_retried_every_promote_after(demo_probe: probes.Probe) -> None:
    """A session FAILED after a re-check retries every promote_after seconds, not before."""
    factory = Plan("turns", "bad", "bad", "bad", "bad", "clean")
    clock = FakeClock()
    listener = CapturingListener()
    s = plan_session(factory, demo_probe, clock, listeners=[listener], promote_after=60.0)
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.state, factory.inits) == (guard.State.FAILED, 3)
    with pytest.raises(guard.RecoveryExhausted, match="every rung of the ladder failed"):
        s.run({"mel": demo.demo_mel(8)})
    clock.advance(59)
    assert s.maintain() == [] and factory.inits == 3
    clock.advance(2)
    assert s.maintain() == ["retry"]
    assert (s.status.state, factory.inits) == (guard.State.FAILED, 5)  # both rungs again
    clock.advance(59)
    assert s.maintain() == [] and factory.inits == 5  # the failed retry restarted the period
    clock.advance(2)
    assert s.maintain() == ["retry"]
    assert (s.status.state, s.status.rung_index, factory.inits) == (guard.State.SERVING, 0, 6)
    assert s.status.attempts == 1 and s.status.history[0].passed
    assert served_clean(s)
    # the re-check's recovery: reinit, fallback; the first retry's dynamic try: fallback
    assert [e.action for e in listener.of("recover")] == ["reinit", "fallback", "fallback"]
    s.close()


def test_fallback_after_a_failed_recheck_waits_before_promoting(demo_probe: probes.Probe) -> None:
    """A fallback caused by a failed re-check restarts the promotion period: no init churn."""
    factory = Plan("turns", "bad", "clean")
    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock, promote_after=300.0)
    clock.advance(10_000)  # long past the first period: only a fresh one may hold promotion
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.mode, factory.inits) == ("dynamic", 3)
    assert s.maintain() == []
    clock.advance(299)
    assert s.maintain() == [] and factory.inits == 3
    clock.advance(2)
    assert s.maintain() == [Action.PROMOTE]
    assert (s.status.mode, s.status.rung_index, factory.inits) == ("static", 0, 4)
    assert served_clean(s)
    s.close()


def test_promotion_is_due_at_exactly_promote_after(demo_probe: probes.Probe) -> None:
    """promote_after seconds to the tick after a fallback, the promotion runs."""
    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock)
    clock.advance(299.5)
    assert s.maintain() == []
    clock.advance(0.5)
    assert s.maintain() == [Action.PROMOTE]
    s.close()


def test_a_pass_rechecks_and_then_promotes(demo_probe: probes.Probe) -> None:
    """A re-check and a promotion both due: one pass does both, the passing re-check first."""
    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock, recheck_every=60.0)
    clock.advance(301)
    assert s.maintain() == ["recheck", Action.PROMOTE]
    assert s.status.mode == "static"
    s.close()


def test_a_second_maintenance_pass_during_one_does_nothing(demo_probe: probes.Probe) -> None:
    """maintain() while another pass builds a promotion returns [] at once (no second pass)."""
    building = threading.Event()
    release = threading.Event()
    plan = Plan("bad", "clean")

    def factory(**kw: Any) -> Any:
        if plan.inits == 2:  # the promotion's init
            building.set()
            assert release.wait(30)
        return plan(**kw)

    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock)
    clock.advance(301)
    done: list[Any] = []
    first = threading.Thread(target=lambda: done.append(s.maintain()))
    first.start()
    assert building.wait(30)
    assert s.maintain(force_recheck=True) == []
    release.set()
    first.join(30)
    assert done == [[Action.PROMOTE]]
    s.close()
