"""gunicorn settings for a guarded MNN service: `gunicorn -c gunicorn.conf.py app:app`.

Before starting gunicorn, point PROMETHEUS_MULTIPROC_DIR at an empty directory (every process
reads it at import). The master serves every worker's metrics and readiness on
MNN_GUARD_METRICS_HOST:MNN_GUARD_METRICS_PORT; it never loads a model.
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

# The metrics port answers /metrics, /readyz and /healthz without authentication, and its
# /readyz names sessions, rungs and model hashes: by default only this host reaches it. Where
# the scraper and the kubelet's probes come over the network (a pod: deploy/kubernetes.yaml),
# set MNN_GUARD_METRICS_HOST=0.0.0.0 and keep the port out of any public Service.
# (Not gunicorn settings: gunicorn ignores names it does not know.)
metrics_host = os.environ.get("MNN_GUARD_METRICS_HOST", "127.0.0.1")
metrics_port = int(os.environ.get("MNN_GUARD_METRICS_PORT", "9108"))


def when_ready(server):  # type: ignore[no-untyped-def]
    """Serve /metrics, /readyz and /healthz for every worker, from the master."""
    guard.serve(port=metrics_port, host=metrics_host)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Forget a dead worker at once: its readiness entry and its live gauges."""
    guard.health.mark_process_dead(worker.pid)
