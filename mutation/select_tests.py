"""pytest plugin for `make mutate`: a mutant runs only the test files of its own module.

mutmut already runs a mutant against the tests that reached its function; this narrows them
to the files that pin that module (a `run()` mutant need not wait for the pool's workers).
"""

from __future__ import annotations

import os
import re
from typing import Any

SESSION = (
    "tests/test_session.py",
    "tests/test_canary.py",
    "tests/test_state_machine.py",
    "tests/test_promotion.py",
    "tests/test_health.py",
)
PROBES = ("tests/test_probes.py", "tests/test_probe_fuzz.py", "tests/test_judges.py")
POOL = (
    "tests/test_pool.py",
    "tests/test_async_pool.py",
    "tests/test_pool_leading.py",
    "tests/test_pool_interrupts.py",
)
METRICS = ("tests/test_metrics.py", "tests/test_session.py", "tests/test_promotion.py")

SELECTION: dict[str, tuple[str, ...]] = {
    # test_calibration: the session's local reference, disputed goldens and retry margin;
    # test_shadow, test_reference: the shadow the session builds (its process, its timeout)
    "guard.session": (
        *SESSION,
        "tests/test_metrics.py",
        "tests/test_inputs.py",
        "tests/test_calibration.py",
        "tests/test_shadow.py",
        "tests/test_reference.py",
    ),
    "guard.maintenance": (*SESSION, "tests/test_shadow.py", "tests/test_metrics.py"),
    "guard.judgement": ("tests/test_calibration.py", *SESSION),
    "guard.shadow": ("tests/test_shadow.py", "tests/test_reference.py"),
    "guard.reference": ("tests/test_reference.py", "tests/test_shadow.py"),
    "guard.state": (*SESSION, "tests/test_metrics.py", "tests/test_server.py"),
    "guard.canary": (
        "tests/test_canary.py",
        "tests/test_session.py",
        "tests/test_state_machine.py",
        "tests/test_promotion.py",
    ),
    "guard.inputs": ("tests/test_inputs.py", "tests/test_session.py"),
    "guard.metrics": (*METRICS, "tests/test_multiprocess_metrics.py"),
    "guard.families": METRICS,
    "guard.sinks": (*METRICS, "tests/test_replica.py"),
    "guard.health": (
        "tests/test_health.py",
        "tests/test_server.py",
        "tests/test_state_machine.py",
        "tests/test_watchdog.py",
    ),
    "guard.pool.parent": POOL,
    "guard.pool.dispatch": POOL,
    "guard.pool.slot": ("tests/test_slot.py", *POOL),
    "guard.pool.job": ("tests/test_job.py", *POOL),
    "guard.pool.shared": ("tests/test_shared.py", "tests/test_pool.py"),
    "guard.pool.wire": ("tests/test_shared.py", "tests/test_pool.py"),
    "guard.pool.worker": ("tests/test_pool.py",),
    "guard.pool.children": ("tests/test_workers.py", *POOL),
    "probes.judges": ("tests/test_judges.py",),
    "probes.calibration": ("tests/test_calibration.py", "tests/test_probes.py"),
    "probes.probe": PROBES,
    "probes.store": PROBES,
}
"""Module of the mutant -> the test files its mutants may run, in the order they run (with -x,
the file that pins the module most directly goes first); the rest are deselected."""

HEAVY = (
    "tests/test_session.py::test_threads_get_their_own_outputs",
    "tests/test_session.py::test_failed_recheck_under_load_fails_no_call",
    "tests/test_state_machine.py::test_sessions_dropped_without_close_are_collected",
    "tests/test_state_machine.py::test_failing_calls_with_large_inputs_keep_rss_flat",
    "tests/test_state_machine.py::test_status_snapshots_are_never_torn",
    "tests/test_promotion.py::test_calls_during_the_swap_are_all_correct",
    # the pool's: 200 requests (the killed-worker test maps requests too), 100 async calls
    # timed against a ticker, and a forward in a thread that is no pool's
    "tests/test_pool.py::test_map_serves_200_requests_in_order",
    "tests/test_async_pool.py::test_loop_stays_free_while_100_calls_run",
    "tests/test_async_pool.py::test_forward_in_a_thread_stalls_the_loop",
    # a worker loop served from a thread of the test's process: under mutmut's stats run the
    # thread stopped answering (no reply within 60 s), which stopped the whole run
    "tests/test_pool.py::test_a_worker_serves_its_lanes_in_order_and_drops_a_withdrawn_request",
)
"""Load, race and timing tests (seconds each, thousands of calls): no mutant runs them."""

_MODULE = re.compile(r"^(?P<module>[\w.]+?)\.x[_\u01c1]")  # probes.judges.x_snr_db__mutmut_1


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Deselect the tests outside the mutant's module selection (only while a mutant runs);
    in mutmut's clean and stats runs (no mutant), only the tests no mutant runs."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if mutant in ("", "stats"):  # a timing test failing under load must not stop the whole run
        heavy = [item for item in items if item.nodeid.startswith(HEAVY)]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if not item.nodeid.startswith(HEAVY)]
        return
    match = _MODULE.match(mutant)
    files = SELECTION.get(match.group("module")) if match else None
    if files is None:
        return

    def wanted(nodeid: str) -> bool:
        path = nodeid.split("::", maxsplit=1)[0]
        return path in files and not nodeid.startswith(HEAVY)

    order = {name: rank for rank, name in enumerate(files)}
    keep = sorted(
        (item for item in items if wanted(item.nodeid)),
        key=lambda item: order[item.nodeid.split("::", maxsplit=1)[0]],
    )
    dropped = [item for item in items if not wanted(item.nodeid)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
