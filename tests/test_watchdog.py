"""The watchdog (guard/integrations/watchdog.py): real worker processes that wrote their health
files, killed only when their session overstayed its deadline. Only `since` is set in the past;
gunicorn's side is in tests/test_recipes.py."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from health_files import Workers

from guard.errors import ConfigError
from guard.integrations.watchdog import Deadlines, Watchdog
from guard.state import State


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker processes writing to a fresh health directory (killed at the end)."""
    started = Workers(tmp_path)
    yield started
    started.close()


def killed(process: subprocess.Popen[str]) -> bool:
    """True when the process ended by SIGKILL within 10 s."""
    try:
        return process.wait(10) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


def test_a_worker_starting_past_its_deadline_is_killed_and_no_other(
    workers: Workers,
) -> None:
    """One pass kills the worker STARTING for longer than `start`; a worker STARTING for less,
    and a serving one however old, go on."""
    hung = workers.start(State.STARTING, 700)
    young = workers.start(State.STARTING, 5)
    serving = workers.start(State.SERVING, 10_000)
    kills = Watchdog(workers.folder, Deadlines(start=600, failed=None)).check()
    assert [(k.pid, k.session, k.state) for k in kills] == [(hung.pid, "vocoder", State.STARTING)]
    assert 700 <= kills[0].seconds < 800
    assert killed(hung)
    assert young.poll() is None and serving.poll() is None


def test_a_worker_failed_past_its_deadline_is_killed_unless_told_never(
    workers: Workers,
) -> None:
    """A worker FAILED for longer than `failed` is killed; with `failed=None` it is not."""
    failed = workers.start(State.FAILED, 1000)
    assert Watchdog(workers.folder, Deadlines(failed=None)).check() == []
    assert failed.poll() is None
    (kill,) = Watchdog(workers.folder, Deadlines(failed=900)).check()
    assert (kill.pid, kill.state) == (failed.pid, State.FAILED)
    assert killed(failed)


def test_only_the_servers_own_workers_are_signalled(
    workers: Workers,
) -> None:
    """With `workers`, a stuck process the server does not list is left alone."""
    stranger = workers.start(State.STARTING, 700)
    mine = workers.start(State.STARTING, 700)
    watchdog = Watchdog(workers.folder, Deadlines(start=600), workers=lambda: {mine.pid})
    assert [k.pid for k in watchdog.check()] == [mine.pid]
    assert killed(mine)
    assert stranger.poll() is None


def test_a_started_watchdog_kills_by_itself_and_closes(
    workers: Workers,
) -> None:
    """`start()` runs its passes in a thread: the stuck worker dies without a call to check;
    `close()` ends the thread."""
    hung = workers.start(State.STARTING, 700)
    watchdog = Watchdog(workers.folder, Deadlines(start=600, every=0.1)).start()
    try:
        assert killed(hung)
    finally:
        watchdog.close()
    assert watchdog._thread is not None and not watchdog._thread.is_alive()


def test_a_killed_worker_is_signalled_once(
    workers: Workers,
) -> None:
    """A killed worker whose file is still listed (its server has not reaped it yet) is not
    killed again at the next pass."""
    hung = workers.start(State.STARTING, 700)
    watchdog = Watchdog(workers.folder, Deadlines(start=600))
    assert [k.pid for k in watchdog.check()] == [hung.pid]
    assert watchdog.check() == []  # a zombie until this test (its parent) reaps it
    assert killed(hung)


@pytest.mark.parametrize(
    "bad",
    [
        {"start": 0},
        {"failed": -1.0},
        {"every": 0},
        {"every": None},
        {"start": True},
        {"start": "9"},
    ],
)
def test_bad_deadlines_are_refused(bad: dict[str, object]) -> None:
    """Deadlines are positive seconds (None for never, but not for the period)."""
    with pytest.raises(ConfigError, match="Deadlines"):
        Deadlines(**bad)  # type: ignore[arg-type]


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    """The watchdog reads an existing directory, or says which one is missing."""
    with pytest.raises(ConfigError, match="nope"):
        Watchdog(tmp_path / "nope")
