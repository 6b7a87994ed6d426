"""Real worker processes that each recorded one session in a health directory, as a server's
workers do (`guard.health.HealthTable`), then wait to be killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guard.state import State

# a worker: records one session in `state`, entered `age` seconds ago, then waits
WORKER = """
import sys, time
from guard.health import Entry, HealthTable
from guard.state import State
folder, state, age = sys.argv[1], State(sys.argv[2]), float(sys.argv[3])
entry = Entry(name="vocoder", state=state, rung="static", rung_index=0,
              healthy=state is State.SERVING, since=time.time() - age)
HealthTable(folder).record(object(), entry)
print("recorded", flush=True)
time.sleep(120)
"""


class Workers:
    """Worker processes writing to the health directory `folder`; `close()` kills what is left."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen[str]] = []

    def start(self, state: State, age: float = 0.0) -> subprocess.Popen[str]:
        """A worker whose session has been in `state` for `age` seconds, once its file is there."""
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(self.folder), state.value, str(age)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "recorded\n"
        return process

    def close(self) -> None:
        """Kill and reap every worker."""
        for process in self.started:
            process.kill()
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
