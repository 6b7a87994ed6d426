"""gunicorn settings for a guarded MNN service: `gunicorn -c gunicorn.conf.py app:app`.

Before starting gunicorn, point PROMETHEUS_MULTIPROC_DIR at an empty directory (every process
reads it at import). The master serves every worker's metrics and readiness on
MNN_GUARD_METRICS_PORT; it never loads a model.
"""

import os

import guard

bind = os.environ.get("MNN_GUARD_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("MNN_GUARD_WORKERS", "4"))
preload_app = False  # never True with MNN: a worker forked after a load hangs in its first call
# A worker hung inside MNN holds the GIL and stops sending heartbeats: gunicorn kills it after
# `timeout` seconds. The same limit applies while a worker builds its session at import, so it
# must exceed the ladder's worst case: rungs x (1 + reinit_attempts) x init_timeout.
timeout = int(os.environ.get("MNN_GUARD_WORKER_TIMEOUT", "600"))


def when_ready(server):  # type: ignore[no-untyped-def]
    """Serve /metrics, /readyz and /healthz for every worker, from the master."""
    port = int(os.environ.get("MNN_GUARD_METRICS_PORT", "9108"))
    guard.serve(port=port, host=os.environ.get("MNN_GUARD_METRICS_HOST", "0.0.0.0"))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Forget a dead worker at once: its readiness entry and its live gauges."""
    guard.mark_process_dead(worker.pid)
