"""MNN itself: importing it, what it prints on fds 1 and 2, fork bookkeeping, runtime managers."""

from __future__ import annotations

import abc
import contextlib
import ctypes
import hashlib
import importlib.metadata
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from guard.errors import ConfigError, ForkAfterLoad

__all__ = [
    "CAPTURE_WAIT",
    "MAX_NOTES",
    "MAX_THREADS",
    "MNN",
    "STATIC_LOAD_NOTE",
    "F",
    "LoadReport",
    "Loader",
    "build_info",
    "captured_output",
    "check_not_forked",
    "check_threads",
    "loaded_pid",
    "mnn_version",
    "nn",
    "note_load",
    "notes_of",
    "runtime_manager",
    "stdout_to_stderr",
]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send C-level stdout to stderr (MNN prints a banner on import that would spoil --json)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreters): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


with stdout_to_stderr():
    import MNN
    import MNN.expr as F
    from MNN import nn

STATIC_LOAD_NOTE = "turn back to static load"
"""What MNN prints when it loads a model with control flow statically despite dynamic=True."""
MAX_NOTES = 40  # lines of MNN output kept per load (the rest are counted)
CAPTURE_WAIT = 30.0  # seconds to wait for another thread's capture before loading uncaptured
MAX_THREADS = 32  # MNN's CPU backend runs at most this many threads (MAX_THREAD_NUMBER)


def mnn_version() -> str:
    """The installed PyMNN version string."""
    return str(MNN.version())


# ----------------------------------------------------- what MNN prints on fd 1 and 2

_capture_lock = threading.RLock()
_capturing = threading.local()

try:
    _LIBC: Any = ctypes.CDLL(None)
except OSError:  # no C library to open by name: stdio buffers are left to flush themselves
    _LIBC = None


def _flush_c_stdio() -> None:
    """Flush C stdio buffers (MNN prints with printf, fully buffered when fd 1 is not a tty)."""
    if _LIBC is not None:
        _LIBC.fflush(None)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte to `fd` (os.write may write part of it)."""
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]


def _sink() -> IO[bytes]:
    """An anonymous file for what native code prints: in memory where the platform can (a
    memfd costs microseconds; a temporary file on disk, tens of them)."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("mnn-guard-capture", os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


@contextlib.contextmanager
def captured_output(*, echo: bool = True) -> Iterator[list[str]]:
    """Collect what native code prints on fd 1 and 2 in the block, as lines; then echo it.

    The list yielded is filled when the block ends. fds 1 and 2 are process-wide, so captures
    take turns under one lock; what other threads print meanwhile is collected too and, with
    `echo`, re-emitted on the real stderr afterwards (nothing is lost, some of it is late).
    A nested capture in the same thread yields an empty list (the outer one collects).
    """
    lines: list[str] = []
    if getattr(_capturing, "active", False) or not _capture_lock.acquire(timeout=CAPTURE_WAIT):
        yield lines
        return
    try:
        _capturing.active = True
        with _sink() as sink:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()
            try:
                saved = (os.dup(1), os.dup(2))
            except OSError:  # no fd 1 or 2 (embedded interpreters): nothing to capture
                yield lines
                return
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                yield lines
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                sink.seek(0)
                data = sink.read()
                if echo:
                    _write_all(2, data)
                lines.extend(_lines(data.decode("utf-8", "replace")))
    finally:
        _capturing.active = False
        _capture_lock.release()


def _lines(text: str) -> list[str]:
    """Non-empty stripped lines, repeats dropped, at most MAX_NOTES (the rest counted)."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if len(lines) > MAX_NOTES:
        lines = [*lines[:MAX_NOTES], f"... and {len(lines) - MAX_NOTES} more line(s)"]
    return lines


def notes_of(exc: BaseException) -> tuple[str, ...]:
    """The notes attached to an exception (`add_note`): what MNN printed, for instance."""
    return tuple(str(n) for n in getattr(exc, "__notes__", ()))


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What MNN printed while loading one module, and whether it ignored dynamic=True."""

    notes: tuple[str, ...] = ()
    turned_static: bool = False

    @classmethod
    def of(cls, lines: list[str], *, dynamic: bool = False) -> LoadReport:
        """The report of a load that printed `lines` (and asked for dynamic=True or not)."""
        turned = dynamic and any(STATIC_LOAD_NOTE in line for line in lines)
        return cls(tuple(lines), turned)


class Loader(abc.ABC):
    """A factory that says what MNN printed: `load(**overrides) -> (module, LoadReport)`;
    calling it, `factory(**overrides)`, returns the module alone."""

    __slots__ = ()

    @abc.abstractmethod
    def load(self, **overrides: Any) -> tuple[Any, LoadReport]:
        """A fresh module and what MNN said while loading it."""

    def __call__(self, **overrides: Any) -> Any:
        """A fresh module."""
        return self.load(**overrides)[0]


# ------------------------------------------------------------ fork bookkeeping

_state = threading.Lock()
_loaded_pid: int | None = None
_forked_after_load = False
_runtime_managers: dict[int, Any] = {}


def _after_fork_in_child() -> None:
    global _forked_after_load
    if _loaded_pid is not None:
        _forked_after_load = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def note_load() -> None:
    """Record that this process has loaded MNN modules (a later fork would hang in MNN)."""
    global _loaded_pid
    if _loaded_pid is None:
        _loaded_pid = os.getpid()


def loaded_pid() -> int | None:
    """The process that first loaded an MNN module here (a parent, after a fork); None if none."""
    return _loaded_pid


def check_not_forked() -> None:
    """Raise ForkAfterLoad in a process forked after its parent loaded MNN modules."""
    if _forked_after_load:
        raise ForkAfterLoad(
            f"process {os.getpid()} was forked after its parent (pid {_loaded_pid}) loaded MNN "
            "modules; MNN hangs forever in such a child. Create guarded sessions after the fork, "
            "use the 'spawn' or 'forkserver' start method (multiprocessing.get_context('spawn'), "
            "guard.Pool does), and do not run gunicorn with --preload."
        )


# ------------------------------------------------------------ threads


def check_threads(value: Any, key: str = "threads") -> int:
    """A thread count MNN honours: an int from 1 to MAX_THREADS, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive int, got {value!r}")
    if value > MAX_THREADS:
        raise ConfigError(
            f"{key}={value}: MNN runs at most {MAX_THREADS} threads (it would quietly use "
            f"{MAX_THREADS}); give {key}={MAX_THREADS} or fewer"
        )
    return value


def runtime_manager(threads: int) -> Any:
    """The process's runtime manager for `threads` threads (MNN ignores `thread_num`)."""
    check_threads(threads)
    with _state:
        if threads not in _runtime_managers:
            _runtime_managers[threads] = nn.create_runtime_manager(({"numThread": threads},))
        return _runtime_managers[threads]


# ------------------------------------------------------------ the build

_build_info: dict[str, str] = {}


def build_info() -> dict[str, str]:
    """The installed MNN: version, wheel tags, and each native library's size and sha256."""
    if _build_info:
        return dict(_build_info)
    info = {"version": mnn_version()}
    try:
        dist = importlib.metadata.distribution("MNN")
    except importlib.metadata.PackageNotFoundError:
        return info
    wheel = dist.read_text("WHEEL") or ""
    info["wheel_tags"] = " ".join(line[5:] for line in wheel.splitlines() if line[:5] == "Tag: ")
    for file in dist.files or ():
        if file.name.endswith((".so", ".pyd", ".dylib")):
            located = file.locate()
            with contextlib.suppress(OSError), open(located, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
                info[file.name] = f"{os.path.getsize(located)} bytes, sha256 {digest}"
    _build_info.update(info)  # computed once per process (hashing the libraries takes ~0.1 s)
    return info
