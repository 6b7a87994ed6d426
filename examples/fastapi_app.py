"""A FastAPI service on guarded worker processes: a vocoder behind `guard.Pool`, the guard's routes.

    export PROMETHEUS_MULTIPROC_DIR=/run/mnn-guard-metrics   # every process writes here
    rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    uvicorn --app-dir examples fastapi_app:app --host 0.0.0.0 --port 8000

`POST /synthesize` takes a float32 mel [80, frames] as the raw body (application/octet-stream)
and answers the float32 waveform the same way (JSON would cost the event loop milliseconds per
request to parse). `/metrics`, `/healthz` and `/readyz` are the guard's own ASGI routes,
answering for this process and its pool's workers. The pool starts in the background at
startup, so `/readyz` says 503 until every worker serves; a pool that cannot start is retried.
VOCODER_MODEL and VOCODER_PROBE choose another model (input `mel`, output `wav`);
VOCODER_PROCESSES the number of workers (default 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response

import guard
import probes
from guard.server import Endpoints
from guard.tools import demo

MODEL = os.environ.get("VOCODER_MODEL", str(demo.DEMO_MODEL))
PROBE = os.environ.get("VOCODER_PROBE", str(demo.DEMO_PROBE))
PROCESSES = int(os.environ.get("VOCODER_PROCESSES", "2"))
RETRY_SECONDS = 30.0  # how long to wait before starting a pool that failed to start again
log = logging.getLogger("vocoder")


async def start_pool(app: FastAPI) -> None:
    """Start the pool off the event loop; retry while it cannot start (not ready meanwhile)."""
    factory = guard.mnn_factory(MODEL, ["mel"], ["wav"], threads=1)
    probe = probes.load(PROBE, model=MODEL)
    while True:
        try:
            app.state.pool = await asyncio.to_thread(
                guard.Pool, factory, probe, processes=PROCESSES, name="vocoder"
            )
            return
        except guard.GuardError:
            log.exception("the vocoder pool could not start; retrying in %g s", RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the pool in the background; close it at shutdown."""
    app.state.pool = None
    starting = asyncio.create_task(start_pool(app))
    yield
    starting.cancel()
    if app.state.pool is not None:
        await asyncio.to_thread(app.state.pool.close)


app = FastAPI(lifespan=lifespan)


@app.post("/synthesize")
async def synthesize(request: Request) -> Response:
    """A float32 mel [80, frames] in, the float32 waveform out."""
    pool: guard.Pool | None = request.app.state.pool
    if pool is None:
        raise HTTPException(503, "the vocoder is starting")
    body = await request.body()
    if not body or len(body) % (80 * 4):
        raise HTTPException(422, "send a float32 mel [80, frames] as the raw body")
    mel = np.frombuffer(body, dtype="<f4").reshape(1, 80, -1)
    try:
        wav = (await pool.arun({"mel": mel}))["wav"]
    except guard.InputMismatch as exc:
        raise HTTPException(422, str(exc)) from exc
    except guard.GuardError as exc:  # no healthy worker in time: never a degraded output
        raise HTTPException(503, f"{type(exc).__name__}: {exc}") from exc
    return Response(wav.astype("<f4").tobytes(), media_type="application/octet-stream")


# last, so that the routes above come first: /metrics, /healthz, /readyz (404 for the rest)
app.mount("/", guard.asgi_app(Endpoints(expect=["vocoder"])))
