"""Readiness: the health table of sessions by name, its files across worker processes, and what
a session publishes to it from starting to closed."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import pytest
from plans import Plan, served_clean

import guard
import probes
from guard.health import Entry, HealthListener
from guard.tools import demo

# ------------------------------------------------------------------ the table


def test_readiness_needs_every_session_healthy(demo_probe: probes.Probe) -> None:
    """One healthy and one exhausted session: not ready until the exhausted one is closed."""
    table = guard.health.HealthTable()
    assert table.readiness() == (False, [])
    healthy = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    failed = guard.wrap(
        Plan("bad"), demo_probe, name="b", metrics=False, health=table, raise_exhausted=False,
        policy=guard.Policy(background=False, reinit_attempts=0),
    )  # fmt: skip
    ready, details = guard.readiness(table)
    assert ready is False
    assert [(e["name"], e["state"], e["healthy"]) for e in details] == [
        ("a", "serving", True),
        ("b", "failed", False),
    ]
    assert any("snr_db" in r for r in details[1]["reasons"]) and details[0]["reasons"] == []
    assert (details[1]["rung"], details[1]["rung_index"]) == ("dynamic", 1)
    failed.close()
    assert table.readiness() == (True, [{**details[0], "since": healthy.status.since}])
    assert table.readiness(expect=["a", "c"])[0] is False
    healthy.close()
    assert table.readiness() == (False, [])


def test_a_session_still_starting_is_listed_not_ready(demo_probe: probes.Probe) -> None:
    """While the first init runs the session is listed as starting, unhealthy, with no reasons."""
    table = guard.health.HealthTable()
    seen: list[tuple[bool, list[dict[str, Any]]]] = []

    table_starting: list[guard.SessionStatus] = []

    class Peek(guard.Listener):
        def on_init(self, session: str, rung: guard.Rung) -> None:
            seen.append(table.readiness())

        def on_status(self, session: str, status: guard.SessionStatus) -> None:
            if status.state is guard.State.STARTING:
                table_starting.append(status)

    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        listeners=[Peek()], policy=guard.Policy(background=False),
    )  # fmt: skip
    ((ready, (entry,)),) = seen
    serving = "<GuardedSession 'a' serving on rung 'static' (0) after 1 attempt(s); PASSED"
    assert re.fullmatch(
        re.escape(serving) + r"( worst SNR \d+\.\d dB)?>", repr(s)
    )  # bit-exact: none
    (starting,) = table_starting
    assert starting.describe() == "starting on rung 'static' (0) after 0 attempt(s); no verdict"
    assert 0 < starting.since <= s.status.since
    assert ready is False
    assert (entry["state"], entry["healthy"], entry["reasons"], entry["rung"]) == (
        "starting",
        False,
        [],
        "static",
    )
    s.close()


def test_nothing_published_after_close_reaches_the_table(demo_probe: probes.Probe) -> None:
    """Nothing published after a close (or in CLOSED) is recorded; a close forgets only its own."""
    table = guard.health.HealthTable()  # only the listeners below write here
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False,
        health=guard.health.HealthTable(), policy=guard.Policy(background=False),
    )  # fmt: skip
    serving = s.status
    late, newer = HealthListener(table), HealthListener(table)
    late.on_status("a", serving)
    newer.on_status("a", serving)
    late.on_close("a")  # an older listener closing: the newer entry stays
    assert list(table.sessions()) == ["a"]
    late.on_status("a", serving)  # published after its close
    newer.on_close("a")
    assert table.sessions() == {}
    late.on_status("a", serving)
    s.close()
    HealthListener(table).on_status("a", s.status)  # CLOSED is never recorded
    assert table.sessions() == {}


def test_forgetting_an_unknown_session_is_no_error() -> None:
    """HealthTable.forget of a name it never had, with or without an owner, changes nothing."""
    table = guard.health.HealthTable()
    table.forget("nobody")
    table.forget("nobody", owner=object())
    assert table.sessions() == {} and table.readiness() == (False, [])


def test_table_entries_carry_each_sessions_detail(demo_probe: probes.Probe) -> None:
    """HealthTable.entries() is each session's readiness entry with the detail recorded for it."""
    with guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="e", metrics=False,
        policy=guard.Policy(background=False), health=guard.health.HealthTable(),
    ) as s:  # fmt: skip
        status = s.status
    table = guard.health.HealthTable()
    entry = dataclasses.replace(Entry.of(status), detail={"workers": [{"slot": 0}]})
    table.record(object(), entry)
    assert table.entries() == [
        {"name": "e", "state": "serving", "rung": "static", "rung_index": 0, "healthy": True,
         "since": status.since, "reasons": [], "workers": [{"slot": 0}]},
    ]  # fmt: skip


def test_an_unwritable_health_folder_never_breaks_serving(
    demo_probe: probes.Probe, tmp_path: Any
) -> None:
    """Health files that cannot be written are skipped, by the table itself: the session serves
    and is listed."""
    table = guard.health.HealthTable(tmp_path / "missing")
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    assert served_clean(s) and table.readiness()[0] is True
    table.record(s, Entry.of(s.status))  # directly: a listener's errors would be logged
    assert list(table.sessions()) == ["a"]
    s.close()


def test_stuck_lists_sessions_failed_for_longer_than_the_bound() -> None:
    """stuck() names FAILED entries older than `after` seconds, never others or untimed ones."""
    from guard.health import stuck

    now = time.time()
    entries = [
        {"name": "old", "state": "failed", "since": now - 100},
        {"name": "new", "state": "failed", "since": now - 1},
        {"name": "up", "state": "serving", "since": now - 1000},
        {"name": "untimed", "state": "failed"},
    ]
    assert [e["name"] for e in stuck(entries, 50)] == ["old"]
    assert [e["name"] for e in stuck(entries, 0.5)] == ["old", "new"]


# ------------------------------------------------------------------ across processes


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_health_files_answer_for_every_live_worker(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """Health files: this process's kept current, live workers read, dead reaped, junk skipped."""
    import json
    import os
    import subprocess

    from guard import health

    table = guard.health.HealthTable(tmp_path)
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    ours = tmp_path / f"mnn_guard_health_{os.getpid()}.json"
    doc = json.loads(ours.read_text())
    assert doc == {"pid": os.getpid(), "sessions": table.entries()}
    assert [e["name"] for e in doc["sessions"]] == ["a"]
    gone = dead_pid()
    (tmp_path / f"mnn_guard_health_{gone}.json").write_text(
        json.dumps({"pid": gone, "sessions": [{**doc["sessions"][0], "healthy": False}]})
    )
    (tmp_path / "mnn_guard_health_0a.json").write_text("{not json")  # read first, skipped
    assert health.worker_entries(tmp_path) == [{"pid": os.getpid(), "sessions": doc["sessions"]}]
    assert not (tmp_path / f"mnn_guard_health_{gone}.json").exists()
    ready, details = health.worker_readiness(tmp_path)
    assert (ready, details) == (True, [{**doc["sessions"][0], "pid": os.getpid()}])
    ready, details = health.worker_readiness(tmp_path, expect=["a", "b"])
    assert ready is False
    assert details[1:] == [
        {
            "name": "b",
            "pid": os.getpid(),
            "state": "missing",
            "healthy": False,
            "reasons": ["no such session in this worker yet"],
        },
    ]
    assert table.readiness(expect=["b"])[1][1:] == [
        {"name": "b", "state": "missing", "healthy": False, "reasons": ["no such session yet"]}
    ]
    other = subprocess.Popen(["sleep", "60"])  # a second live worker, with a session "z"
    try:
        entry = {**doc["sessions"][0], "name": "z"}
        (tmp_path / f"mnn_guard_health_{other.pid}.json").write_text(
            json.dumps({"pid": other.pid, "sessions": [entry]})
        )
        ready, details = health.worker_readiness(tmp_path)
        assert ready is True
        assert [(e["name"], e["pid"]) for e in details] == [("a", os.getpid()), ("z", other.pid)]
    finally:
        other.kill()
        other.wait()
    s.close()
    assert json.loads(ours.read_text()) == {"pid": os.getpid(), "sessions": []}
    assert health.worker_readiness(tmp_path) == (False, [])
    health.mark_process_dead(os.getpid(), tmp_path)
    assert not ours.exists()


def test_forgetting_a_dead_process_removes_its_files(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mark_process_dead drops a pid's health and live gauge files; none to drop is no error."""
    from guard import health

    gone = dead_pid()
    files = [tmp_path / f"mnn_guard_health_{gone}.json", tmp_path / f"gauge_liveall_{gone}.db"]
    for f in files:
        f.write_text("{}")
    kept = tmp_path / f"counter_{gone}.db"
    kept.write_text("")
    health.mark_process_dead(gone, tmp_path)
    assert [f.exists() for f in (*files, kept)] == [False, False, True]
    health.mark_process_dead(gone, tmp_path)  # nothing left to remove
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    health.mark_process_dead(gone)  # no folder: nothing to do
    files[0].write_text("{}")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    health.mark_process_dead(gone)
    assert not files[0].exists()


def serving_entry(name: str) -> Entry:
    """A healthy session's entry, as a listener records it."""
    return Entry(
        name=name, state=guard.State.SERVING, rung="static", rung_index=0, healthy=True,
        since=time.time(),
    )  # fmt: skip


def test_abandoning_what_was_never_recorded_changes_nothing() -> None:
    """abandon() of a name the table has never seen, or of an owner that wrote nothing of a
    name others wrote, leaves every entry as it was."""
    table = guard.health.HealthTable()
    writer, other = object(), object()
    table.record(writer, serving_entry("kept"))
    table.abandon("never-seen", owner=other)
    table.abandon("kept", owner=other)
    assert list(table.sessions()) == ["kept"] and table.live("kept") == 1


def test_an_abandoned_listener_records_nothing_after(demo_probe: probes.Probe) -> None:
    """A listener whose session was abandoned ignores the statuses published after it: the
    abandoned entry stays until another session of the name records one."""
    table = guard.health.HealthTable()
    listener = HealthListener(table)
    session = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="ab", metrics=False, health=table,
        policy=guard.Policy(background=False, promote_after=None),
    )  # fmt: skip
    status = session.status
    session.close()
    listener.on_status("ab", status)
    listener.abandon("ab")
    listener.on_status("ab", dataclasses.replace(status, state=guard.State.FAILED))
    assert table.sessions()["ab"].state is guard.State.SERVING


def test_worker_sessions_name_each_entry_with_its_process(tmp_path: Any) -> None:
    """A table with a directory writes this process's file there; worker_sessions reads every
    session of it with this process's pid."""
    import os

    table = guard.health.HealthTable(tmp_path)
    table.record(object(), serving_entry("one"))
    table.record(object(), serving_entry("two"))
    found = guard.health.worker_sessions(tmp_path)
    assert sorted(e["name"] for e in found) == ["one", "two"]
    assert {e["pid"] for e in found} == {os.getpid()}


def test_asking_whether_a_process_lives_sends_it_no_signal() -> None:
    """_alive checks with signal 0: asked about this very process, no handler runs (a signal
    sent to oneself is handled before the next line), and a reaped child reads as gone."""
    import os
    import signal
    import subprocess
    import sys

    got: list[int] = []
    before = {
        s: signal.signal(s, lambda n, _: got.append(n)) for s in (signal.SIGHUP, signal.SIGUSR1)
    }
    try:
        assert guard.health._alive(os.getpid())
        assert got == []
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not guard.health._alive(child.pid)


def test_a_name_shows_its_worst_session_and_how_many_it_has() -> None:
    """Two live sessions of one name, one healthy, one not: readiness shows the unhealthy one,
    whichever wrote last, with the count of sessions in its detail."""
    table = guard.health.HealthTable()
    bad = dataclasses.replace(serving_entry("n"), healthy=False, state=guard.State.REPLACING)
    for first, second in ((bad, serving_entry("n")), (serving_entry("n"), bad)):
        table.clear()
        table.record(object(), first)
        table.record(object(), second)
        shown = table.sessions()["n"]
        assert (shown.healthy, shown.state) == (False, guard.State.REPLACING)
        assert shown.detail["sessions"] == 2
