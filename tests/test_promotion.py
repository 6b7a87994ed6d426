"""Promotion back to the fast rung and periodic re-checks, on the real demo vocoder.

Time is the only thing faked: a FakeClock drives `maintain()`; modules, canaries and threads
are real.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, reference
from prometheus_client import CollectorRegistry

import guard
import probes
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
    reference, no call fails, and calls keep completing while the new module is built."""
    session, _, clock = fallen_back(demo_probe, STATIC_FAILS)
    xs = [demo.demo_mel(2, seed=k) for k in range(16)]
    refs = [reference(x) for x in xs]
    stop = threading.Event()
    building = threading.Event()
    during_build = [0]
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        i = 0
        while not stop.is_set():
            k = (t + i) % len(xs)
            i += 1
            try:
                out = session.run({"mel": xs[k]})["wav"]
                mode = session.status.mode
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                results.append((mode, measures.snr_db(refs[k], out) > 45))
                during_build[0] += building.is_set()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    clock.advance(301)
    building.set()
    done = session.maintain()
    building.clear()
    time.sleep(0.2)
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
    assert during_build[0] >= 8  # run() was not blocked while the new module was built


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
    session = guard.wrap(
        demo.demo_factory(),
        demo_probe,
        name="recheck-serving",
        metrics=False,
        policy=guard.Policy(background=False, promote_after=None),
    )
    x = demo.demo_mel(100, seed=11)
    ref = reference(x)
    checking = threading.Event()
    stop = threading.Event()
    during: list[float] = []

    def caller() -> None:
        while not stop.is_set():
            snr = measures.snr_db(ref, session.run({"mel": x})["wav"])
            if checking.is_set():
                during.append(snr)

    thread = threading.Thread(target=caller)
    thread.start()
    time.sleep(0.1)
    checking.set()
    done = session.maintain(force_recheck=True)
    checking.clear()
    stop.set()
    thread.join()
    session.close()
    assert done == ["recheck"]
    assert len(during) >= 1 and all(s > 45 for s in during)
