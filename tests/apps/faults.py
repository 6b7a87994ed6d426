"""The demo vocoder's factory for the test apps, with the fault VOCODER_FAULT names.

all: every init of every worker degraded (each ends FAILED and stays up); fail-first: every
init of the first worker only; fallback-first: its static inits (it serves on the dynamic
rung); hang-first: its first init hangs in a native call that holds the GIL (as a hang inside
MNN does); loud-all: every static init of every worker degraded, but only on forwards with a
loud input (peak magnitude above LOUD: the canary's is below), which only a shadow check sees.
VOCODER_SHADOW=N sets `Policy.shadow_every`. The first worker is the process that creates the
file VOCODER_FIRST names (it writes its pid there).
"""

import os
from typing import Any

import guard
from guard.testing import Fault, FaultyFactory, LouderThan
from guard.tools import demo

LOUD = 10.0  # the demo canary's mels peak below this in magnitude; a mel times 4 above it


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
    elif fault == "loud-all":
        factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0, trigger=LouderThan(LOUD))
    return factory


def vocoder_policy() -> guard.Policy:
    """The test apps' policy: no re-inits; shadow checks every VOCODER_SHADOW calls if set."""
    shadow = os.environ.get("VOCODER_SHADOW")
    return guard.Policy(reinit_attempts=0, shadow_every=int(shadow) if shadow else None)
