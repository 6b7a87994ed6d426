"""Run a test's helper in a fresh spawned process and take its one report."""

from __future__ import annotations

import multiprocessing
from typing import Any


def report_from_spawned(target: Any, *args: Any, seconds: float = 60.0) -> Any:
    """Run `target(*args, conn)` in a spawned process (it may fork children); its one report,
    sent on `conn` within `seconds`. The process is killed if it has not ended 5 s later."""
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, writer))
    process.start()
    writer.close()
    try:
        assert reader.poll(seconds), f"{target.__name__}: no report within {seconds} s"
        return reader.recv()
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
