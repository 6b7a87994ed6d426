"""pytest plugin for `make mutate`: a mutant runs only the test files of its own module.

mutmut already runs a mutant against the tests that reached its function; this narrows them
to the files that pin that module (a `run()` mutant need not wait for the pool's workers).
"""

from __future__ import annotations

import os
import re
from typing import Any

PINNED = "tests/test_pinned.py"
SESSION = (
    PINNED,
    "tests/test_session.py",
    "tests/test_state_machine.py",
    "tests/test_promotion.py",
)
PROBES = ("tests/test_probes.py", "tests/test_probe_fuzz.py", "tests/test_judges.py", PINNED)

SELECTION: dict[str, tuple[str, ...]] = {
    "guard.session": (*SESSION, "tests/test_metrics.py", "tests/test_inputs.py"),
    "guard.state": (*SESSION, "tests/test_metrics.py", "tests/test_server.py"),
    "guard.canary": SESSION,
    "guard.inputs": ("tests/test_inputs.py", PINNED, "tests/test_session.py"),
    "guard.metrics": (PINNED, "tests/test_metrics.py", "tests/test_promotion.py"),
    "guard.health": (PINNED, "tests/test_server.py", "tests/test_state_machine.py"),
    "guard.pool": (PINNED, "tests/test_pool.py"),
    "probes.judges": ("tests/test_judges.py", PINNED),
    "probes.probe": PROBES,
    "probes.store": PROBES,
}
"""Module of the mutant -> the test files its mutants may run, in the order they run (with -x,
the file that pins the module most directly goes first); the rest are deselected."""

POOL_TESTS = (
    # the worker side, run in this process (no worker spawned): fast, so first in the file
    "tests/test_pool.py::test_worker_errors_cross_the_pipe_as_themselves_or_as_stand_ins",
    "tests/test_pool.py::test_a_worker_serves_its_pipe_and_refuses_what_is_no_request",
    "tests/test_pool.py::test_a_worker_stops_serving_when_the_parent_is_gone",
    "tests/test_pool.py::test_a_worker_builds_its_session_serves_and_closes_it_on_stop",
    "tests/test_pool.py::test_a_worker_that_cannot_start_says_why_on_its_pipe",
    "tests/test_pool.py::test_status_lists_each_worker",
    "tests/test_pool.py::test_input_mismatch_reaches_caller_unchanged",
    "tests/test_pool.py::test_close_is_idempotent_and_run_after_close_raises",
    "tests/test_pool.py::test_worker_startup_failure_raises_from_constructor",
    "tests/test_pool.py::test_bad_pool_config_raises_config_error",
    "tests/test_pool.py::test_fallback_worker_shows_its_rung_in_status",
    "tests/test_pool.py::test_worker_that_raises_is_replaced_and_its_error_keeps_its_type",
    "tests/test_pool.py::test_killed_worker_is_replaced_and_no_request_is_lost",
)
"""A pool mutant runs only these: every pool test spawns workers, so the set is kept short."""

HEAVY = (
    "tests/test_session.py::test_threads_get_their_own_outputs",
    "tests/test_session.py::test_failed_recheck_under_load_fails_no_call",
    "tests/test_state_machine.py::test_sessions_dropped_without_close_are_collected",
    "tests/test_state_machine.py::test_failing_calls_with_large_inputs_keep_rss_flat",
    "tests/test_state_machine.py::test_status_snapshots_are_never_torn",
    "tests/test_promotion.py::test_calls_during_the_swap_are_all_correct",
)
"""Load and race tests (seconds each, thousands of calls): no mutant runs them."""

_MODULE = re.compile(r"^(?P<module>[\w.]+?)\.x[_\u01c1]")  # probes.judges.x_snr_db__mutmut_1


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Deselect the tests outside the mutant's module selection (only while a mutant runs)."""
    match = _MODULE.match(os.environ.get("MUTANT_UNDER_TEST", ""))
    files = SELECTION.get(match.group("module")) if match else None
    if files is None:
        return

    def wanted(nodeid: str) -> bool:
        path = nodeid.split("::", maxsplit=1)[0]
        if path not in files or nodeid.startswith(HEAVY):
            return False
        return path != "tests/test_pool.py" or nodeid.startswith(POOL_TESTS)

    order = {name: rank for rank, name in enumerate(files)}
    keep = sorted(
        (item for item in items if wanted(item.nodeid)),
        key=lambda item: order[item.nodeid.split("::", maxsplit=1)[0]],
    )
    dropped = [item for item in items if not wanted(item.nodeid)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
