"""A real Prometheus server on 127.0.0.1 for tests: scraping given targets every second, with
the repository's rules (their `for:` shortened in a copy) and its HTTP API."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
WAIT = 60.0  # seconds for Prometheus to start, scrape and have rates (a slow CI machine)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    """GET a URL on 127.0.0.1 and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def poll(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Call `check` until it returns something truthy (errors count as not yet), within a bound."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


def prometheus_binary() -> str:
    """The Prometheus server from Debian's `prometheus` package; in CI its absence fails."""
    found = shutil.which("prometheus")
    if found is None:
        why = "the `prometheus` binary is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: .ci/run installs it; the real-Prometheus tests cannot run")
        pytest.skip(f"REAL-PROMETHEUS TESTS NOT RUN: {why}")
    return found


def shortened_rules(folder: Path, hold: str) -> Path:
    """A copy of the repository's rules with every `for:` set to `hold` (e.g. "3s")."""
    text, count = re.subn(r"^(\s+for:) \S+$", rf"\1 {hold}", RULES.read_text(), flags=re.M)
    assert count >= 5, "the rules' `for:` lines were not found"
    path = folder / "alerts.yml"
    path.write_text(text)
    return path


@contextmanager
def prometheus(
    folder: Path,
    targets: Sequence[str],
    *,
    job: str = "mnn-guard",
    rules: Path | None = None,
    job_extra: str = "",
) -> Iterator[str]:
    """A Prometheus server scraping `targets` every second (rules evaluated every second;
    `job_extra`: more YAML lines of the scrape job); yields its base URL."""
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files: ['{rules}']\n" if rules is not None else "")
        + f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n"
        + f"      - targets: {json.dumps(list(targets))}\n"
        + job_extra
    )
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "prometheus.log").open("w"),
    )
    try:
        poll("Prometheus ready", lambda: urllib.request.urlopen(f"http://{address}/-/ready"))
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(base: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API (now, or at unix time `at`); the
    vector's samples."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    data = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}")
    assert data["status"] == "success", data
    assert data["data"]["resultType"] == "vector", (promql, data["data"]["resultType"])
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def alerts(base: str) -> list[dict[str, Any]]:
    """Every alert Prometheus holds now, pending or firing."""
    found: list[dict[str, Any]] = get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
    return found
