"""A FastAPI service on guarded worker processes: a vocoder behind `guard.Pool`, the guard's routes.

    export PROMETHEUS_MULTIPROC_DIR=/run/mnn-guard-metrics   # every process writes here
    rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    uvicorn --app-dir examples fastapi_app:app --host 0.0.0.0 --port 8000

`POST /synthesize` takes a float32 mel [80, frames] as the raw body (application/octet-stream)
and answers the float32 waveform the same way (JSON would cost the event loop milliseconds per
request to parse). `/metrics`, `/healthz` and `/readyz` are the guard's own ASGI routes,
answering for this process and its pool's workers. The pool is a `Replica` of the guard's
replica core (docs/integrations.md), started in the background at startup, so `/readyz` says
503 until every worker serves; a pool that cannot start is retried. Errors map to HTTP as in
every integration: 422 for inputs that do not fit the probe, 503 while no healthy worker
answers. VOCODER_MODEL and VOCODER_PROBE choose another model (input `mel`, output `wav`;
default: the demo vocoder shipped in the `guard` package's data); VOCODER_PROCESSES the number
of pool workers.

Each uvicorn worker runs a pool of its own: `uvicorn --workers W` (as UVICORN_WORKERS=W, which
this app reads) with pools of P processes runs W x P MNN processes. The pool's default size
shares the cores among the uvicorn workers, and more MNN processes than cores are logged as a
warning (docs/ops.md, "Sizing").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from importlib import resources

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response

import guard
import probes
from guard.integrations import Endpoints, PoolBuild, Replica, http_error

DATA = resources.files("guard") / "data"  # the demo vocoder and its probe ship there
MODEL = os.environ.get("VOCODER_MODEL", str(DATA / "demo_vocoder.mnn"))
PROBE = os.environ.get("VOCODER_PROBE", str(DATA / "demo_vocoder.probe"))
RETRY_SECONDS = 30.0  # how long to wait before starting a pool that failed to start again
log = logging.getLogger("vocoder")
CORES = len(os.sched_getaffinity(0))
SERVERS = int(os.environ.get("UVICORN_WORKERS", "1"))  # uvicorn's --workers, one pool each
PROCESSES = int(os.environ.get("VOCODER_PROCESSES") or max(1, CORES // SERVERS))
if SERVERS * PROCESSES > CORES:
    log.warning(
        "%d uvicorn workers x %d pool processes = %d MNN processes on %d cores: they take "
        "turns on the cores (set VOCODER_PROCESSES or fewer --workers)",
        SERVERS, PROCESSES, SERVERS * PROCESSES, CORES,
    )  # fmt: skip


async def start_pool(replica: Replica) -> None:
    """Start the pool off the event loop; retry while it cannot start (not ready meanwhile)."""
    while True:
        try:
            await asyncio.to_thread(replica.configure, {"model": MODEL, "probe": PROBE})
            return
        except (guard.GuardError, probes.ProbeError):
            log.exception("the vocoder pool could not start; retrying in %g s", RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the pool in the background; close it at shutdown."""
    app.state.replica = replica = Replica(name="vocoder", build=PoolBuild(processes=PROCESSES))
    starting = asyncio.create_task(start_pool(replica))
    yield
    starting.cancel()
    await asyncio.to_thread(replica.close)


app = FastAPI(lifespan=lifespan)


@app.post("/synthesize")
async def synthesize(request: Request) -> Response:
    """A float32 mel [80, frames] in, the float32 waveform out."""
    replica: Replica = request.app.state.replica
    body = await request.body()
    if not body or len(body) % (80 * 4):
        raise HTTPException(422, "send a float32 mel [80, frames] as the raw body")
    mel = np.frombuffer(body, dtype="<f4").reshape(1, 80, -1)
    try:
        wav = (await replica.arun({"mel": mel}))["wav"]
    except guard.GuardError as exc:  # never a degraded output: 422 or 503 with the reason
        status, message = http_error(exc)
        raise HTTPException(status, message) from exc
    return Response(wav.astype("<f4").tobytes(), media_type="application/octet-stream")


# last, so that the routes above come first: /metrics, /healthz, /readyz (404 for the rest)
app.mount("/", guard.asgi_app(Endpoints(expect=["vocoder"], workers=SERVERS)))
