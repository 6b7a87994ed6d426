"""The shadow's reference module: in a spawned process of its own, or on the shadow's thread.

A PyMNN Module's forward holds the GIL for its whole length: a reference forward on a thread of
the serving process stalls every request meanwhile (a sleeping thread overshot by the forward's
length, 4 to 11 ms on the demo vocoder). In a process of its own the reference runs beside the
requests; the serving process only sends a sample's inputs and reads the outputs back. Where no
process can be used (`Policy.shadow_process=False`, a factory that does not pickle, or whose
class the new interpreter cannot import, such as one defined in a script) it runs on the
shadow's thread instead.

The process is a fresh interpreter started with `subprocess` (never a fork: MNN hangs in a
process forked after a load; and not multiprocessing's spawn, which runs the caller's script
again and cannot start from a daemonic process such as a `guard.Pool` worker). It reads the
factory from its pipe, exits when the pipe closes, and prints to the parent's stderr.

>>> ref, why_not = start(factory, overrides, ["mel"], ["wav"], timeout=60)  # doctest: +SKIP
>>> ref.where, ref.kind  # doctest: +SKIP
(<Where.PROCESS: 'process'>, <Reference.DYNAMIC: 'dynamic'>)
>>> wav, = ref.run([mel]); ref.close()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import spawn
from multiprocessing.connection import Connection
from typing import Any, Protocol

from numpy.typing import NDArray

from guard import mnn
from guard.errors import GuardError
from guard.exits import exit_text

__all__ = [
    "STOP_SECONDS",
    "InProcess",
    "InThread",
    "Reference",
    "ReferenceLost",
    "ReferenceModule",
    "Where",
    "child_main",
    "start",
]

Array = NDArray[Any]
STOP_SECONDS = 2.0  # a reference process is given this long to exit before it is killed


class ReferenceLost(GuardError):
    """The reference process died, hung or could not be reached; it was stopped."""


class Reference(enum.StrEnum):
    """What the shadow compares against."""

    NONE = "none"  # not built yet, or it could not be built (see `ShadowStatus.error`)
    DYNAMIC = "dynamic"  # the probe's reference configuration, as asked
    STATIC = "static"  # MNN loaded the reference statically (control flow): a second instance


class Where(enum.StrEnum):
    """Where the reference module runs."""

    NONE = "none"  # not built (yet)
    PROCESS = "process"  # a spawned process of its own: its forwards leave requests alone
    THREAD = "thread"  # the shadow's thread here: each forward holds the GIL meanwhile


class ReferenceModule(Protocol):
    """A built reference: run a sample's inputs (model order), get every probe output."""

    kind: Reference
    where: Where
    pid: int | None  # the reference process (None on a thread)

    def run(self, inputs: Sequence[Array]) -> list[Array]: ...

    def close(self) -> None: ...


def _build(
    factory: Callable[..., Any],
    overrides: Mapping[str, Any],
    inputs: Sequence[str],
    outputs: Sequence[str],
) -> tuple[mnn.Runner, Reference]:
    """The reference module, and whether MNN loaded it as asked or statically."""
    loaded, report = mnn.load(factory, overrides)
    runner = mnn.adapt(loaded, inputs, outputs)
    return runner, Reference.STATIC if report.turned_static else Reference.DYNAMIC


@dataclass(eq=False)
class InThread:
    """The reference module in this process, run on the shadow's thread."""

    runner: mnn.Runner
    kind: Reference
    where: Where = Where.THREAD
    pid: int | None = None

    def run(self, inputs: Sequence[Array]) -> list[Array]:
        """The reference's outputs for `inputs`."""
        return list(self.runner.run(list(inputs)))

    def close(self) -> None:
        """Nothing to stop: the module goes with this object."""


# ------------------------------------------------------------------ the reference process


def child_main(fd: int) -> None:
    """The reference process (`python -c`, never a fork; its sys.path is the parent's): read
    the pickled factory, build the module, say so, then answer inputs with outputs until told
    to stop (None) or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    try:
        factory, overrides, inputs, outputs = pickle.loads(conn.recv_bytes())
        runner, kind = _build(factory, overrides, inputs, outputs)
    except Exception as exc:
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            conn.send(("failed", repr(exc)))
        return
    with contextlib.suppress(OSError):
        conn.send(("ready", kind.value))
    while True:
        try:
            arrays = conn.recv()
        except (EOFError, OSError):
            return
        if arrays is None:
            return
        try:
            reply: tuple[str, Any] = ("ran", list(runner.run(list(arrays))))
        except Exception as exc:
            reply = ("raised", repr(exc))
        try:
            conn.send(reply)
        except OSError:
            return


def _frame(data: bytes) -> bytes:
    """The header multiprocessing's Connection puts before `data` (the child reads with one)."""
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(data))
    return struct.pack("!i", len(data))


def _left(deadline: float) -> float:
    """Seconds until `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class InProcess:
    """The reference module in a process of its own; this one sends inputs and reads outputs.

    Every exchange is bounded as a whole by `timeout` (a stopped process that takes no more of
    a long input, or sends half a reply, is killed), and only the process that started the
    reference talks to it or stops it: a forked child's copy closes its socket, nothing more.
    """

    where = Where.PROCESS

    def __init__(
        self, process: subprocess.Popen[bytes], sock: socket.socket, timeout: float
    ) -> None:
        self._process = process
        self._sock = sock
        self._owner = os.getpid()  # a fork's copy of this object must leave the process alone
        self.timeout = timeout
        self.pid: int | None = process.pid
        self.kind = Reference.NONE  # what the process says once its module is built

    def ready(self, payload: bytes) -> str | None:
        """Send the pickled factory and wait, within the bound, until the module is built:
        None, or what its build raised there (the process is stopped). ReferenceLost when the
        process died or did not answer meanwhile (stopped too)."""
        reply = self._ask(payload)
        if reply[0] == "ready" and reply[1] in tuple(Reference):
            self.kind = Reference(reply[1])
            return None
        self.close()
        if reply[0] == "failed":
            return f"the reference process could not build it: {reply[1]}"
        raise ReferenceLost(f"{reply[1]} while it built the module")

    def run(self, inputs: Sequence[Array]) -> list[Array]:
        """The reference's outputs for `inputs`: GuardError when its forward raised,
        ReferenceLost when the process died or did not answer within the bound (and is
        stopped)."""
        if os.getpid() != self._owner:
            raise ReferenceLost(
                f"the reference process belongs to process {self._owner}, which this one "
                "was forked from"
            )  # fmt: skip
        reply = self._ask(pickle.dumps(list(inputs), pickle.HIGHEST_PROTOCOL))
        if reply[0] == "ran":
            return list(reply[1])
        if reply[0] == "raised":
            raise GuardError(f"the shadow's reference raised {reply[1]}")
        self.close()  # gone or hung: no later sample can use it
        raise ReferenceLost(reply[1])

    def _ask(self, data: bytes) -> tuple[str, Any]:
        """Send one pickled message and read the process's reply, all within the bound; or
        why that failed (a process that did not make it in time is killed)."""
        deadline = time.monotonic() + self.timeout
        try:
            for part in (_frame(data), data):
                self._sock.settimeout(_left(deadline))
                self._sock.sendall(part)
            (size,) = struct.unpack("!i", self._read(4, deadline))
            if size == -1:
                (size,) = struct.unpack("!Q", self._read(8, deadline))
            body = self._read(size, deadline)
        except TimeoutError:
            self._process.kill()
            return ("lost", f"the reference process did not answer within {self.timeout:g} s")
        except (EOFError, OSError):
            return ("lost", f"the reference process {self.ended()}")
        except ValueError as exc:  # a header no frame has
            self._process.kill()  # the stream is out of step: no later reply can be read
            return ("lost", f"the reference process sent a malformed reply ({exc})")
        try:
            reply = pickle.loads(body)
        except Exception as exc:  # a reply that does not unpickle here
            return ("lost", f"the reference process sent what does not unpickle: {exc!r}")
        if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], str):
            return reply
        return ("lost", f"the reference process sent a {type(reply).__name__}, not a reply")

    def _read(self, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes from the process, by `deadline` (EOFError if it closed first;
        nothing is set aside for a size it merely claims)."""
        if size < 0:
            raise ValueError(f"a frame of {size} bytes")
        chunks, got = [], 0
        while got < size:
            self._sock.settimeout(_left(deadline))
            chunk = self._sock.recv(min(size - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def ended(self) -> str:
        """How the process ended: `exited with code 3`, `was killed by SIGSEGV`."""
        try:
            return exit_text(self._process.wait(STOP_SECONDS))
        except subprocess.TimeoutExpired:
            return "closed its pipe"

    def close(self) -> None:
        """Shut the socket (the process reads its end and exits; an exchange on another thread
        ends), kill the process after STOP_SECONDS, reap it. In a forked child: close the
        socket only (the process is the parent's)."""
        if os.getpid() == self._owner:
            with contextlib.suppress(OSError):  # gone or closed already
                self._sock.shutdown(socket.SHUT_RDWR)
            try:
                self._process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._sock.close()


def _spawn(payload: bytes, *, timeout: float) -> InProcess | str:
    """Start a reference process for the pickled factory and wait, within `timeout`, until its
    module is built; or why it cannot serve (it did not start, or the build raised there, e.g.
    the factory's class does not import). ReferenceLost when the process died or hung while it
    built: a load that crashed it would crash this process too."""
    ours, theirs = socket.socketpair()
    with theirs:
        fd = theirs.fileno()
        # the parent's import path first: the factory's class may live where only it looks
        code = f"import sys; sys.path[:0] = {sys.path!r}; import guard.reference as r; "
        code += f"r.child_main({fd})"
        try:  # the interpreter multiprocessing would spawn (set_executable() names another)
            process = subprocess.Popen(  # its stdout is our stderr: MNN's notes stay off stdout
                [spawn.get_executable(), "-c", code], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                stdout=2,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            ours.close()
            return f"the reference process could not start: {exc}"
    module = InProcess(process, ours, timeout)
    refusal = module.ready(payload)
    return module if refusal is None else refusal


def start(
    factory: Callable[..., Any],
    overrides: Mapping[str, Any],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    timeout: float,
    process: bool = True,
) -> tuple[ReferenceModule, str | None]:
    """The reference module `factory(**overrides)`, in a process of its own when `process` and
    one starts and builds it, else in this one (an error of that build raises); and, when
    `process` was asked for but the module runs here, why. ReferenceLost when the process died
    or hung while it built (that build is not tried here)."""
    refusal = None
    if process:
        try:
            payload = pickle.dumps((factory, dict(overrides), list(inputs), list(outputs)))
        except Exception as exc:
            refusal = f"the factory does not pickle ({type(exc).__name__}: {exc})"
        else:
            spawned = _spawn(payload, timeout=timeout)
            if isinstance(spawned, InProcess):
                return spawned, None
            refusal = spawned
    runner, kind = _build(factory, overrides, inputs, outputs)
    return InThread(runner, kind), refusal
