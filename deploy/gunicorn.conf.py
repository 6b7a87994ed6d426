"""gunicorn settings for a guarded MNN service: `gunicorn -c gunicorn.conf.py app:app`.

Before starting gunicorn, point PROMETHEUS_MULTIPROC_DIR at an empty directory (every process
reads it at import). The master serves every worker's metrics and readiness on
MNN_GUARD_METRICS_HOST:MNN_GUARD_METRICS_PORT and watches the workers' sessions; it never
loads a model. docs/ops.md ("gunicorn") says what each setting is for.
"""

import os

import guard
from guard.integrations.watchdog import Deadlines, Watchdog


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers' cpusets set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


bind = os.environ.get("MNN_GUARD_BIND", "0.0.0.0:8000")
# one worker per core, each building its modules with one MNN thread (docs/ops.md, "Sizing");
# where a CPU limit (a quota) is below the cores the process sees, set MNN_GUARD_WORKERS to it
workers = int(os.environ.get("MNN_GUARD_WORKERS") or _cores())
preload_app = False  # never True with MNN: a worker forked after a load hangs in its first call
# gunicorn's heartbeat timeout: a worker that sends none for this long is killed. It starts
# with the worker's first heartbeat, after the app was imported, so it bounds a request (a
# forward hung inside MNN holds the GIL), not the start; the watchdog below bounds the start.
timeout = int(os.environ.get("MNN_GUARD_WORKER_TIMEOUT", "120"))

# (Not gunicorn settings below: gunicorn ignores names it does not know.)
# The master kills a worker whose session has been STARTING this long (a start hung inside
# MNN): more than the ladder's worst case, rungs x (1 + reinit_attempts) x init_timeout
# (2 x 4 x 60 s = 480 s with the default Policy). gunicorn starts a new worker in its place.
start_timeout = float(os.environ.get("MNN_GUARD_START_TIMEOUT", "600"))
# ... and one whose session has been FAILED this long (every rung failing, retries included):
# that worker alone is replaced by a fresh process (a new draw); the others keep serving.
restart_after = float(os.environ.get("MNN_GUARD_RESTART_AFTER", "900"))

# The metrics port answers /metrics, /readyz and /healthz without authentication, and its
# /readyz names sessions, rungs and model hashes: by default only this host reaches it. Where
# the scraper and the kubelet's probes come over the network (a pod: deploy/kubernetes.yaml),
# set MNN_GUARD_METRICS_HOST=0.0.0.0 and keep the port out of any public Service.
metrics_host = os.environ.get("MNN_GUARD_METRICS_HOST", "127.0.0.1")
metrics_port = int(os.environ.get("MNN_GUARD_METRICS_PORT", "9108"))


def when_ready(server):  # type: ignore[no-untyped-def]
    """Serve /metrics, /readyz and /healthz for every worker, and watch them, from the master.

    /readyz waits for every worker gunicorn runs (`workers`, or `-w`); /healthz stays 200 while
    the master runs (the watchdog replaces a failed worker itself, so a restart of the whole
    pod would add nothing).
    """
    expected = server.num_workers
    guard.serve(port=metrics_port, host=metrics_host, workers=expected, restart_after=None)
    deadlines = Deadlines(start=start_timeout, failed=restart_after)
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    Watchdog(directory, deadlines, workers=lambda: set(server.WORKERS)).start()


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Forget a dead worker at once: its readiness entry and its live gauges."""
    guard.health.mark_process_dead(worker.pid)
