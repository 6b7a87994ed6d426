"""The demo vocoder's factory for the test apps, with the fault VOCODER_FAULT names.

all: every init of every worker degraded (each ends FAILED and stays up); fail-first: every
init of the first worker only; fallback-first: its static inits (it serves on the dynamic
rung); hang-first: its first init hangs in a native call that holds the GIL (as a hang inside
MNN does). The first worker is the process that creates the file VOCODER_FIRST names (it
writes its pid there).
"""

import os
from typing import Any

from guard.testing import Fault, FaultyFactory
from guard.tools import demo


def first_worker() -> bool:
    """True in the one process that creates the file VOCODER_FIRST first (it writes its pid)."""
    try:
        fd = os.open(os.environ["VOCODER_FIRST"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except (KeyError, FileExistsError):
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def vocoder_factory() -> Any:
    """The demo vocoder's factory (one MNN thread), with this process's fault if any."""
    factory: Any = demo.demo_factory(threads=1)
    fault = os.environ.get("VOCODER_FAULT", "")
    if fault == "all" or (fault == "fail-first" and first_worker()):
        factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0, affects="all")
    elif fault == "fallback-first" and first_worker():
        factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0)  # static inits only
    elif fault == "hang-first" and first_worker():
        factory = FaultyFactory(factory, fault=Fault.HANG_NATIVE, schedule=[True])
    return factory
