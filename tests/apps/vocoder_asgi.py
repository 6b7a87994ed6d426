"""A guarded vocoder as an ASGI app for uvicorn, with guard's routes mounted (the demo model).

/metrics, /healthz and /readyz answer for every worker (PROMETHEUS_MULTIPROC_DIR), and /readyz
waits for as many workers as uvicorn runs (UVICORN_WORKERS, which uvicorn reads as --workers);
any other path synthesises. VOCODER_FAULT chooses a fault (tests/apps/faults.py). `forward`
holds the GIL, so it runs in a thread to keep the loop serving.
"""

import asyncio
import json
import os

from faults import vocoder_factory

import guard
import probes
from guard.integrations.endpoints import Endpoints
from guard.tools import demo

session = guard.wrap(
    vocoder_factory(),
    probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL),
    name="vocoder",
    raise_exhausted=False,
)
routes = guard.asgi_app(Endpoints(workers=int(os.environ.get("UVICORN_WORKERS", "1"))))


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    """guard's routes, else one synthesis of 20 frames."""
    if scope["type"] != "http" or scope["path"] in ("/metrics", "/healthz", "/readyz"):
        await routes(scope, receive, send)
        return
    try:
        out = await asyncio.to_thread(session.run, {"mel": demo.demo_mel(20)})
        code, body = 200, json.dumps({"pid": os.getpid(), "samples": int(out["wav"].size)})
    except guard.GuardError as exc:
        code, body = 503, type(exc).__name__
    await send({"type": "http.response.start", "status": code, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})
