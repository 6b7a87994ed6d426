"""A guarded vocoder as a WSGI app, built the way docs/ops.md says (the demo model).

VOCODER_FAULT chooses a fault (tests/apps/faults.py): with `all` every worker ends in FAILED
and stays up.
"""

import json
import os
import urllib.parse

import numpy as np
from faults import vocoder_factory, vocoder_policy

import guard
import probes
from guard.tools import demo

session = guard.wrap(
    vocoder_factory(),
    probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL),
    name="vocoder",
    policy=vocoder_policy(),
    raise_exhausted=False,  # a worker whose model fails stays up, not ready, and retries
)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    """GET /?frames=N&gain=G: synthesise N frames of the demo mel times G; 503 while the session
    cannot."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    frames = int(query.get("frames", ["20"])[0])
    gain = np.float32(query.get("gain", ["1"])[0])
    try:
        wav = session.run({"mel": demo.demo_mel(frames) * gain})["wav"]
    except guard.GuardError as exc:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{type(exc).__name__}\n".encode()]
    body = json.dumps({"pid": os.getpid(), "samples": int(wav.size), "rung": session.status.mode})
    body = body.encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
