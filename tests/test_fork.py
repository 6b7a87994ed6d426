"""Fork after load is a clear ForkAfterLoad, never a hang; a hanging init times out and recovers.

Each scenario runs in a spawned helper process with a hard deadline, so a regression (a hang
inside MNN holds the GIL) fails the test instead of blocking CI; the helper forks, never pytest.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from spawning import report_from_spawned

import guard
import probes
from guard.session import call_with_timeout
from guard.testing import CapturingListener, FaultyFactory
from guard.tools import demo

CHILD_SECONDS = 10.0  # a forked child must answer within this
HELPER_SECONDS = 60.0  # a helper process must report within this
INIT_TIMEOUT = 2.0  # the hang tests' Policy.init_timeout: far above a real init + canary


def quiet_policy(**kw: Any) -> guard.Policy:
    """A policy with no background thread."""
    return guard.Policy(background=False, promote_after=None, **kw)


def session(probe_dir: str) -> guard.GuardedSession:
    """A guarded demo session with MNN's default threads (a fork after this load really hangs)."""
    factory = guard.mnn_factory(demo.DEMO_MODEL, [demo.DEMO_INPUT], [demo.DEMO_OUTPUT])
    return guard.wrap(
        factory, probes.load(probe_dir), policy=quiet_policy(), name="fork", metrics=False
    )


def child_init(probe_dir: str, conn: Connection) -> None:
    """In a child: build a session and report what happened."""
    try:
        s = session(probe_dir)
        s.run({"mel": demo.demo_mel(20)})
        conn.send(("ok", s.status.mode))
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc)))


def fork_and_report(how: str, probe_dir: str, load_first: bool) -> tuple[str, str, float]:
    """Fork a child (os.fork or multiprocessing 'fork'); its report and how long it took."""
    parent_session = session(probe_dir) if load_first else None
    start = time.monotonic()
    if how == "multiprocessing":
        ctx = multiprocessing.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=child_init, args=(probe_dir, writer))
        process.start()
        writer.close()
        if not reader.poll(CHILD_SECONDS):
            process.kill()
            process.join()
            return "hung", f"no answer within {CHILD_SECONDS} s", time.monotonic() - start
        kind, detail = reader.recv()
        process.join(CHILD_SECONDS)
        return kind, detail, time.monotonic() - start
    reader, writer = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once without running the parent's cleanup
        try:
            if how == "run" and parent_session is not None:
                try:
                    parent_session.run({"mel": demo.demo_mel(20)})
                    writer.send(("ok", "served"))
                except Exception as exc:
                    writer.send((type(exc).__name__, str(exc)))
            else:
                child_init(probe_dir, writer)
        finally:
            os._exit(0)
    writer.close()
    answered = reader.poll(CHILD_SECONDS)
    if not answered:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if not answered:
        return "hung", f"no answer within {CHILD_SECONDS} s", time.monotonic() - start
    kind, detail = reader.recv()
    return kind, detail, time.monotonic() - start


def fork_helper(how: str, probe_dir: str, load_first: bool, out: Connection) -> None:
    """Spawned helper: load (or not), fork, send the child's report to the test."""
    out.send(fork_and_report(how, probe_dir, load_first))


def in_helper(target: Any, *args: Any) -> Any:
    """Run `target(*args, conn)` in a spawned process; its one report, killed after a deadline."""
    return report_from_spawned(target, *args, seconds=HELPER_SECONDS)


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing", "run"])
def test_child_forked_after_load_gets_fork_after_load(demo_paths: Any, how: str) -> None:
    """A child forked after a guarded load gets ForkAfterLoad within seconds, not a hang."""
    kind, detail, seconds = in_helper(fork_helper, how, str(demo_paths[1]), True)
    assert kind == "ForkAfterLoad", detail
    assert seconds < 5.0
    assert "spawn" in detail and "--preload" in detail


def test_child_forked_before_any_load_works(demo_paths: Any) -> None:
    """Importing MNN before the fork is fine: a child forked before any load serves normally."""
    kind, detail, _ = in_helper(fork_helper, "os.fork", str(demo_paths[1]), False)
    assert (kind, detail) == ("ok", "static")


def hang_helper(probe_dir: str, reinit_attempts: int, out: Connection) -> None:
    """Spawned helper: guard a factory whose first init hangs; report outcomes and metrics."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1), fault="hang", affects="all", schedule=[True], hang_seconds=30
    )
    listener = CapturingListener()
    registry = CollectorRegistry()
    policy = quiet_policy(
        init_timeout=INIT_TIMEOUT, reinit_attempts=reinit_attempts, ladder=(guard.STATIC,)
    )
    start = time.monotonic()
    try:
        s = guard.wrap(
            faulty,
            probes.load(probe_dir),
            policy=policy,
            name="hang",
            registry=registry,
            listeners=[listener],
        )
        result: tuple[Any, ...] = ("ok", s.status.mode, s.status.healthy)
    except guard.RecoveryExhausted as exc:
        errors = [type(a.error).__name__ for a in exc.attempts]
        result = ("RecoveryExhausted", errors, str(exc))
    timeouts = registry.get_sample_value(
        "mnn_guard_canary_checks_total", {"session": "hang", "rung": "static", "result": "timeout"}
    )
    outcomes = [e.outcome for e in listener.of("attempt")]
    out.send((result, outcomes, timeouts, time.monotonic() - start))


def test_hanging_init_times_out_and_next_init_recovers(demo_paths: Any) -> None:
    """A hanging factory times out after init_timeout, counts as timeout; a re-init serves."""
    result, outcomes, timeouts, seconds = in_helper(hang_helper, str(demo_paths[1]), 1)
    assert result == ("ok", "static", True)
    assert outcomes == ["timeout", "pass"]
    assert timeouts == 1.0
    assert seconds < 5 * INIT_TIMEOUT


def test_hanging_init_without_retries_raises_init_timeout(demo_paths: Any) -> None:
    """With no retry left, the hang ends in RecoveryExhausted whose attempt error is InitTimeout."""
    result, outcomes, timeouts, _ = in_helper(hang_helper, str(demo_paths[1]), 0)
    assert result[:2] == ("RecoveryExhausted", ["InitTimeout"])
    assert f"did not finish within {INIT_TIMEOUT:g} s" in result[2]
    assert (outcomes, timeouts) == (["timeout"], 1.0)


def test_call_with_timeout_raises_init_timeout() -> None:
    """call_with_timeout raises InitTimeout naming the step once the deadline passes."""
    start = time.monotonic()
    with pytest.raises(guard.errors.InitTimeout, match=r"slow step did not finish within 0\.2 s"):
        call_with_timeout(lambda: time.sleep(5), 0.2, "slow step")
    assert time.monotonic() - start < 2.0


def first_init_helper(probe_dir: str, out: Connection) -> None:
    """Spawned helper: which lazy imports were loaded when the first timed init began."""
    import sys

    before = "scipy.signal" in sys.modules

    class Spy(guard.Listener):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_init(self, session: str, rung: guard.Rung) -> None:
            self.seen.append("scipy.signal" in sys.modules)

    spy = Spy()
    guard.wrap(
        demo.demo_factory(threads=1),
        probes.load(probe_dir),
        policy=quiet_policy(),
        name="first",
        metrics=False,
        listeners=[spy],
    )
    out.send((before, spy.seen))


def test_judge_one_off_costs_are_paid_before_the_timed_init(demo_paths: Any) -> None:
    """scipy.signal (~1-2 s cold) is never imported: the judges' Hann window comes from numpy."""
    before, seen = in_helper(first_init_helper, str(demo_paths[1]))
    assert before is False  # a fresh process has not imported it yet
    assert seen == [False]
