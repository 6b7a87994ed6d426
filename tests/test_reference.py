"""The shadow's reference module: in a process of its own, or on the shadow's thread.

A PyMNN forward holds the GIL, so the reference runs in a fresh interpreter where it can; these
tests hold where it runs, that it never outlives its session or its parent, and what happens
when it cannot be used.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.spawn
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import reference
from polling import until

import guard
import probes
from guard import reference as references
from guard.errors import FactoryError
from guard.reference import Reference, ReferenceLost, Where
from guard.testing import Fault, FaultyFactory, LouderThan
from guard.tools import demo
from probes.measures import snr_db

LOUD = 10.0  # the canary mels peak below this; a mel x4 above
BOUND = 30.0  # seconds any wait here may take at most


def policy(**kw: Any) -> guard.Policy:
    """A policy without background maintenance."""
    return guard.Policy(**{"background": False, "promote_after": None, **kw})


def loud_only() -> FaultyFactory:
    """Every static init degraded (30 dB noise) on loud inputs only (it pickles)."""
    return FaultyFactory(
        demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, snr_db=30.0,
        trigger=LouderThan(LOUD), seed=0,
    )  # fmt: skip


def gone(pid: int) -> bool:
    """True once process `pid` has ended (reaped, or a zombie waiting for its new parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def shadow_of(session: guard.GuardedSession) -> Any:
    """The session's shadow status (the test asked for shadow checks)."""
    status = session.status.shadow
    assert status is not None
    return status


def test_the_reference_runs_in_a_process_of_its_own_and_ends_with_the_session(
    demo_probe: probes.Probe,
) -> None:
    """A factory that pickles gets a reference process (another pid, alive while the session
    serves), the divergence it finds acts as usual, and close() ends the process."""
    loud = demo.demo_mel(40, seed=3) * np.float32(4.0)
    with guard.wrap(loud_only(), demo_probe, policy=policy(shadow_every=1), metrics=False) as s:
        status = shadow_of(s)
        assert (status.where, status.reference) == (Where.PROCESS, Reference.DYNAMIC)
        pid = status.pid
        assert pid is not None and pid != os.getpid() and not gone(pid)
        s.run({"mel": loud})
        until("the diverging static module was replaced", lambda: s.status.mode == "dynamic")
        assert snr_db(reference(loud), s.run({"mel": loud})["wav"]) > 100.0
        assert shadow_of(s).failed >= 1
    until("the reference process ended at close", lambda: gone(pid))


def test_a_killed_reference_process_ends_the_checks_and_says_why(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL of the reference process: the next sample is not judged, the status and the log
    say the process was killed, and the session serves on."""
    mel = demo.demo_mel(30, seed=4)
    with caplog.at_level(logging.ERROR, logger="mnn_guard"), guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=policy(shadow_every=1), metrics=False
    ) as s:  # fmt: skip
        pid = shadow_of(s).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        s.run({"mel": mel})
        until("the lost reference was noticed", lambda: shadow_of(s).error is not None)
        status = shadow_of(s)
        assert "SIGKILL" in str(status.error)
        assert (status.where, status.reference, status.checks) == (Where.NONE, Reference.NONE, 0)
        assert any("SIGKILL" in r.getMessage() for r in caplog.records)
        assert s.status.mode == "static" and s.status.healthy
        assert snr_db(reference(mel), s.run({"mel": mel})["wav"]) > 100.0


class Unpicklable:
    """A factory holding a lock (it does not pickle)."""

    def __init__(self) -> None:
        self.factory = demo.demo_factory(threads=1)
        self.lock = __import__("threading").Lock()

    def __call__(self, **overrides: Any) -> Any:
        return self.factory(**overrides)


@pytest.mark.hostile
def test_a_factory_that_does_not_pickle_gets_a_reference_here_and_a_warning(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """The shadow still checks, on its thread, and the warning says why and what it costs."""
    with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
        Unpicklable(), demo_probe, policy=policy(shadow_every=1), metrics=False
    ) as s:  # fmt: skip
        status = shadow_of(s)
        assert (status.where, status.pid) == (Where.THREAD, None)
        assert status.reference is Reference.DYNAMIC
        said = [r.getMessage() for r in caplog.records if "runs on a thread" in r.getMessage()]
        assert len(said) == 1 and "does not pickle" in said[0] and "GIL" in said[0]
        s.run({"mel": demo.demo_mel(30, seed=5)})
        until("the sample was checked on the thread", lambda: shadow_of(s).checks == 1)


@pytest.mark.hostile
@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_a_shadow_process_that_is_not_a_bool_is_refused(value: Any) -> None:
    """shadow_process is True or False."""
    with pytest.raises(guard.ConfigError, match="shadow_process"):
        guard.Policy(shadow_process=value)


@pytest.mark.hostile
def test_an_interpreter_that_cannot_start_leaves_the_reference_here(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference process is started with the interpreter multiprocessing would spawn
    (`multiprocessing.set_executable`); one that cannot start leaves the reference on the
    shadow's thread, and the warning says why."""
    missing = "/nonexistent/python"
    before = multiprocessing.spawn.get_executable()
    multiprocessing.set_executable(missing)
    try:
        with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
            loud_only(), demo_probe, policy=policy(shadow_every=1), metrics=False
        ) as s:  # fmt: skip
            assert shadow_of(s).where is Where.THREAD
    finally:
        multiprocessing.set_executable(before)
    said = [r.getMessage() for r in caplog.records if "runs on a thread" in r.getMessage()]
    assert len(said) == 1 and "could not start" in said[0] and missing in said[0]


SCRIPT = """
import sys
import guard, probes
from guard.testing import Fault, FaultyFactory, LouderThan
from guard.tools import demo
{factory}
model, folder = demo.ensure_demo()
policy = guard.Policy(shadow_every=1, background=False, promote_after=None)
session = guard.wrap(factory, probes.load(folder), policy=policy, metrics=False)
status = session.status.shadow
print("ran", status.where, status.pid, flush=True)
{tail}
"""
PICKLES = "factory = demo.demo_factory(threads=1)"
SCRIPT_CLASS = """
class Local:
    def __init__(self):
        self.factory = demo.demo_factory(threads=1)
    def __call__(self, **overrides):
        return self.factory(**overrides)
factory = Local()
"""


def run_script(tmp_path: Path, factory: str, tail: str = "session.close()") -> list[str]:
    """Run SCRIPT (no main guard) as a program; the lines it printed on stdout."""
    path = tmp_path / "serve.py"
    path.write_text(SCRIPT.format(factory=textwrap.dedent(factory), tail=tail))
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.slow
def test_a_script_without_a_main_guard_is_not_run_again_and_stdout_stays_clean(
    tmp_path: Path,
) -> None:
    """The reference process is a fresh interpreter: the caller's script runs once (no spawn
    re-import), and nothing MNN prints there reaches the caller's stdout."""
    lines = run_script(tmp_path, PICKLES)
    assert len(lines) == 1 and lines[0].startswith("ran process "), lines


@pytest.mark.slow
def test_a_factory_the_new_interpreter_cannot_import_falls_back_to_the_thread(
    tmp_path: Path,
) -> None:
    """A factory class defined in the script pickles but cannot be imported by the reference
    process: the reference runs on the shadow's thread (and the script runs once)."""
    lines = run_script(tmp_path, SCRIPT_CLASS)
    assert lines == ["ran thread None"], lines


@pytest.mark.slow
def test_the_reference_process_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A serving process killed with SIGKILL leaves no reference process behind."""
    path = tmp_path / "serve.py"
    path.write_text(SCRIPT.format(factory=PICKLES, tail="import time; time.sleep(120)"))
    parent = subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert line[:2] == ["ran", "process"], line
        pid = int(line[2])
        assert not gone(pid)
        parent.kill()
        parent.wait(BOUND)
        until("the orphaned reference process exited", lambda: gone(pid))
    finally:
        parent.kill()
        parent.wait(BOUND)


class FailsToBuild:
    """A factory (it pickles) that notes the pid of each process building it, then raises."""

    def __init__(self, notes: Path) -> None:
        self.notes = notes

    def __call__(self, **overrides: Any) -> Any:
        with self.notes.open("a") as f:
            f.write(f"{os.getpid()}\n")
        raise FactoryError("this reference cannot be built")


def test_a_reference_process_whose_build_fails_is_stopped_and_the_build_tried_here(
    tmp_path: Path,
) -> None:
    """start(): the process that could not build the module ends, the build is tried here, and
    its own error is what the caller sees."""
    notes = tmp_path / "pids"
    with pytest.raises(FactoryError, match="cannot be built"):
        references.start(FailsToBuild(notes), {"dynamic": True}, ["mel"], ["wav"], timeout=BOUND)
    child, here = (int(x) for x in notes.read_text().split())
    assert here == os.getpid() and child != here
    until("the failed reference process ended", lambda: gone(child))


def test_a_reference_process_that_does_not_answer_is_killed(demo_probe: probes.Probe) -> None:
    """A forward that takes longer than the bound: ReferenceLost, and the process is killed."""
    module, why = references.start(
        demo.demo_factory(threads=1), {"dynamic": True}, ["mel"], ["wav"], timeout=BOUND
    )
    assert (module.where, why) == (Where.PROCESS, None)
    assert isinstance(module, references.InProcess)
    pid = module.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # stopped: it will not answer
    module.timeout = 0.5  # from now on
    with pytest.raises(ReferenceLost, match=r"did not answer within 0\.5 s"):
        module.run([demo.demo_mel(30, seed=6)])
    until("the silent reference process was killed", lambda: gone(pid))


# ------------------------------------------------------------ hostile: leaks, hangs, forks


def finishes(call: Callable[[], object], pid: int) -> BaseException | None:
    """Run `call` on a thread; assert it returns within BOUND (else SIGKILL `pid`, which must
    release it); what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BOUND)
    hung = thread.is_alive()
    if hung:
        os.kill(pid, signal.SIGKILL)
    assert not hung, f"{call!r} still waiting after {BOUND} s"
    return raised[0] if raised else None


def longer_than_the_pipe() -> Any:
    """A mel of twice the bytes a socket pair buffers (a long utterance)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        buffered = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        buffered += theirs.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    frames = 2 * buffered // demo.demo_mel(1).nbytes  # the demo probe takes up to 4000
    return demo.demo_mel(frames, seed=8)


def test_a_session_dropped_without_close_ends_its_reference_process(
    demo_probe: probes.Probe,
) -> None:
    """A session collected without close() is collected (its shadow's thread held it alive, and
    the reference process with it, for the interpreter's life) and its reference process ends."""
    session = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=policy(shadow_every=1), metrics=False
    )  # fmt: skip
    pid = shadow_of(session).pid
    assert pid is not None
    dropped = weakref.ref(session)
    del session
    until("the dropped session was collected", lambda: gc.collect() >= 0 and dropped() is None)
    until("the dropped session's reference process ended", lambda: gone(pid))


@pytest.mark.hostile
def test_a_stopped_reference_process_is_killed_even_when_the_inputs_fill_the_pipe() -> None:
    """A stopped process cannot take a long input (more than the socket pair buffers): the
    sample's send is bounded too, ReferenceLost within the timeout, and the process is killed."""
    module, _ = references.start(
        demo.demo_factory(threads=1), {"dynamic": True}, ["mel"], ["wav"], timeout=BOUND
    )
    pid = module.pid
    assert isinstance(module, references.InProcess) and pid is not None
    os.kill(pid, signal.SIGSTOP)
    module.timeout = 0.5
    raised = finishes(lambda: module.run([longer_than_the_pipe()]), pid)
    assert isinstance(raised, ReferenceLost) and "within 0.5 s" in str(raised), raised
    until("the stopped reference process was killed", lambda: gone(pid))


@pytest.mark.hostile
def test_close_returns_while_a_stopped_reference_process_holds_a_long_sample(
    demo_probe: probes.Probe,
) -> None:
    """close() within the bound while the shadow's thread is stuck sending a long sample to a
    stopped reference process (it used to wait forever on the same full pipe)."""
    session = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=policy(shadow_every=1), metrics=False
    )  # fmt: skip
    pid = shadow_of(session).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    session.run({"mel": longer_than_the_pipe()})
    assert finishes(session.close, pid) is None
    until("the stopped reference process was killed", lambda: gone(pid))


MISBEHAVING = """#!{python}
import os, re, sys, time
from multiprocessing.connection import Connection
conn = Connection(int(re.search(r"child_main\\((\\d+)\\)", sys.argv[-1]).group(1)))
conn.recv_bytes()
conn.send(("ready", "dynamic"))
conn.recv_bytes()
os.write(conn.fileno(), {sent!r})
time.sleep(3600)
"""
HALF_A_REPLY = (1 << 20).to_bytes(4, "big") + b"half"  # the head of a 1 MB reply, then nothing
NEGATIVE_SIZE = (-2).to_bytes(4, "big", signed=True) + b"garbage"  # no frame has that header


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("sent", "why"),
    [(HALF_A_REPLY, r"within 0\.5 s"), (NEGATIVE_SIZE, "malformed")],
    ids=["half", "negative-size"],
)
def test_a_reference_process_that_sends_a_broken_reply_is_killed(
    tmp_path: Path, sent: bytes, why: str
) -> None:
    """A reference interpreter (`multiprocessing.set_executable`) that answers a sample with
    half a reply, or a frame no Connection sends: ReferenceLost within the timeout (not a read
    that waits for the rest forever, nor a stream read out of step), and the process is
    killed."""
    python = tmp_path / "misbehaving-python"
    python.write_text(MISBEHAVING.format(python=sys.executable, sent=sent))
    python.chmod(0o755)
    before = multiprocessing.spawn.get_executable()
    multiprocessing.set_executable(str(python))
    try:
        module, refusal = references.start(
            demo.demo_factory(threads=1), {"dynamic": True}, ["mel"], ["wav"], timeout=BOUND
        )
    finally:
        multiprocessing.set_executable(before)
    pid = module.pid
    assert isinstance(module, references.InProcess) and refusal is None and pid is not None
    module.timeout = 0.5
    raised = finishes(lambda: module.run([demo.demo_mel(30, seed=9)]), pid)
    assert isinstance(raised, ReferenceLost) and re.search(why, str(raised)), raised
    until("the misbehaving reference process was killed", lambda: gone(pid))


FORK_AND_CLOSE = """
import os, time
child = os.fork()
if child == 0:
    session.close()  # this child's copy of the parent's session
    os._exit(0)
os.waitpid(child, 0)
session.run({"mel": demo.demo_mel(30, seed=10)})
deadline = time.monotonic() + 30
while session.status.shadow.checks == 0 and session.status.shadow.error is None:
    assert time.monotonic() < deadline, "no check within 30 s"
    time.sleep(0.01)
print("after", session.status.shadow.checks, session.status.shadow.error, flush=True)
session.close()
"""


@pytest.mark.slow
def test_a_forked_child_closing_its_copy_of_the_session_leaves_the_reference_alone(
    tmp_path: Path,
) -> None:
    """A child forked after the reference started (gunicorn --preload style) that closes the
    session it inherited stops nothing of its parent's: the parent's next sample is checked."""
    lines = run_script(tmp_path, PICKLES, FORK_AND_CLOSE)
    assert lines[0].startswith("ran process ") and lines[1:] == ["after 1 None"], lines


class Stalls:
    """A factory (it pickles) that notes the pid of each process calling it, then takes longer
    than the bound to build."""

    def __init__(self, notes: Path) -> None:
        self.notes = notes

    def __call__(self, **overrides: Any) -> Any:
        with self.notes.open("a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(BOUND)
        return demo.demo_factory(threads=1)(**overrides)


@pytest.mark.hostile
def test_a_reference_process_that_does_not_build_in_time_is_not_retried_here(
    tmp_path: Path,
) -> None:
    """start(): a process that did not build the module within the bound is killed and the
    build is not tried again on this process's thread (as slow, and holding the GIL after)."""
    notes = tmp_path / "pids"
    with pytest.raises(ReferenceLost, match=r"did not answer within 5 s while it built"):
        references.start(Stalls(notes), {"dynamic": True}, ["mel"], ["wav"], timeout=5.0)
    noted = notes.read_text().split() if notes.exists() else []
    assert str(os.getpid()) not in noted, noted


CRASHES = """
import os, signal
from guard.tools import demo

class CrashesDynamic:
    def __init__(self):
        self.factory = demo.demo_factory(threads=1)

    def __call__(self, **overrides):
        if overrides.get("dynamic"):  # as MNN's dynamic load does on some models: SIGSEGV
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.factory(**overrides)
"""


@pytest.mark.slow
def test_a_reference_load_that_crashes_its_process_is_not_retried_in_the_serving_one(
    tmp_path: Path,
) -> None:
    """A reference load that kills the reference process (SIGSEGV) is not tried again in the
    serving process, where it would kill that too: no shadow checks, and the status says why."""
    (tmp_path / "crashing.py").write_text(CRASHES)
    tail = "print('error', session.status.shadow.error); session.close()"
    lines = run_script(
        tmp_path, "from crashing import CrashesDynamic\nfactory = CrashesDynamic()", tail
    )
    assert lines[0] == "ran none None" and "SIGSEGV" in lines[1], lines
