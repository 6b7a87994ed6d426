"""A guarded vocoder as a WSGI app, built the way docs/ops.md says (the demo model).

VOCODER_FAULT=all degrades every init, so every worker ends in FAILED and stays up.
VOCODER_FAULT=fail-first degrades every init of the first worker only, fallback-first its
static inits (it serves on the dynamic rung), hang-first hangs its first init in a native call
that holds the GIL (as a hang inside MNN does); the first worker is the one that creates the
file VOCODER_FIRST names.
"""

import json
import os

import guard
import probes
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


factory = demo.demo_factory(threads=1)
fault = os.environ.get("VOCODER_FAULT", "")
if fault == "all" or (fault == "fail-first" and first_worker()):
    factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0, affects="all")
elif fault == "fallback-first" and first_worker():
    factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0)  # static inits only
elif fault == "hang-first" and first_worker():
    factory = FaultyFactory(factory, fault=Fault.HANG_NATIVE, schedule=[True])
session = guard.wrap(
    factory,
    probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL),
    name="vocoder",
    policy=guard.Policy(reinit_attempts=0),
    raise_exhausted=False,  # a worker whose model fails stays up, not ready, and retries
)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    """GET /?frames=N: synthesise N frames of the demo mel; 503 while the session cannot."""
    frames = int(environ.get("QUERY_STRING", "").partition("=")[2] or 20)
    try:
        wav = session.run({"mel": demo.demo_mel(frames)})["wav"]
    except guard.GuardError as exc:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{type(exc).__name__}\n".encode()]
    body = json.dumps({"pid": os.getpid(), "samples": int(wav.size)}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
