"""The deployment files in deploy/: alert rules under promtool, the Kubernetes manifest against
the policy it must fit, the gunicorn config's settings."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import guard

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def worst_init_seconds(policy: guard.Policy) -> float:
    """The longest a session can take to start: every init of every rung times out."""
    assert policy.init_timeout is not None
    return len(policy.ladder) * (1 + policy.reinit_attempts) * policy.init_timeout


def promtool() -> str:
    """promtool's path; in CI its absence fails, elsewhere the test says loudly it did not run."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("NOT RUN: promtool is missing (apt-get install prometheus); CI runs it")
    return found


@pytest.mark.parametrize(
    "command", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]]
)
def test_alert_rules_pass_promtool(command: list[str]) -> None:
    """The rules are valid, and their unit tests pass: first fallback, canary failure ratio,
    exhausted session, a closed session not paging, targets down or absent, error budget burn."""
    done = subprocess.run(
        [promtool(), *command],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def container() -> dict[str, Any]:
    """The one container of the manifest's Deployment."""
    (doc,) = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    (spec,) = doc["spec"]["template"]["spec"]["containers"]
    return dict(spec)


def test_startup_probe_covers_the_worst_init() -> None:
    """The startupProbe's window outlasts the default policy's worst-case init."""
    probe = container()["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert window > worst_init_seconds(guard.Policy())


def test_probes_use_the_routes_and_port_the_code_serves() -> None:
    """Readiness on /readyz and liveness on /healthz, on the port the master serves them on."""
    spec = container()
    env = {e["name"]: e["value"] for e in spec["env"]}
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ports["metrics"] == int(env["MNN_GUARD_METRICS_PORT"])
    assert 'rm -rf "$PROMETHEUS_MULTIPROC_DIR"' in spec["args"][0]  # emptied at every start
    mounts = {m["mountPath"] for m in spec["volumeMounts"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts


def test_gunicorn_config_never_preloads_and_outlasts_init() -> None:
    """The gunicorn config forks workers before any load, and its worker timeout (which also
    bounds a worker's boot) outlasts the worst-case init; the manifest passes the same value."""
    settings = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    timeout = int({e["name"]: e["value"] for e in container()["env"]}["MNN_GUARD_WORKER_TIMEOUT"])
    assert settings["preload_app"] is False
    assert settings["timeout"] > worst_init_seconds(guard.Policy())
    assert timeout > worst_init_seconds(guard.Policy())
    assert callable(settings["when_ready"]) and callable(settings["child_exit"])


def test_gunicorn_metrics_port_listens_on_loopback_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master's unauthenticated metrics port binds 127.0.0.1 by default; the manifest,
    whose probes and scraper come over the pod network, asks for every address."""
    monkeypatch.delenv("MNN_GUARD_METRICS_HOST", raising=False)
    settings = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    env = {e["name"]: e["value"] for e in container()["env"]}
    assert settings["metrics_host"] == "127.0.0.1"
    assert env["MNN_GUARD_METRICS_HOST"] == "0.0.0.0"
