"""The deployment files in deploy/: alert rules under promtool, the Kubernetes manifest against
the policy it must fit, the gunicorn config's settings."""

from __future__ import annotations

import os
import re
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
    """The rules are valid, and their unit tests pass: a fallback or canary failure before the
    first scrape (series that start at 1), a session left on a slower rung, a process serving
    nothing, canary failure ratio, exhausted session, a closed session not paging, targets
    down or absent whatever the job, error budget burn, and a healthy process raising none."""
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


def manifest() -> dict[str, dict[str, Any]]:
    """The manifest's documents by kind (one of each)."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs)
    return kinds


def container() -> dict[str, Any]:
    """The one container of the manifest's Deployment."""
    (spec,) = manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(spec)


def env() -> dict[str, str]:
    """The container's environment."""
    return {e["name"]: e["value"] for e in container()["env"]}


def test_service_sends_traffic_to_the_workers_port_only() -> None:
    """The Service selects the Deployment's pods and targets their http port, never the
    unauthenticated metrics port."""
    kinds = manifest()
    pods = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = kinds["Service"]["spec"]
    assert service["selector"].items() <= pods.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["http"] == int(env()["MNN_GUARD_BIND"].rpartition(":")[2])


def test_disruption_budget_lets_one_pod_go_at_a_time() -> None:
    """The PodDisruptionBudget selects the Deployment's pods and lets a voluntary eviction take
    one at a time, fewer than the replicas."""
    kinds = manifest()
    deployment = kinds["Deployment"]["spec"]
    budget = kinds["PodDisruptionBudget"]["spec"]
    pods = deployment["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= pods.items()
    assert budget["maxUnavailable"] == 1 < deployment["replicas"]


def test_startup_probe_covers_the_worst_init() -> None:
    """The startupProbe's window outlasts the default policy's worst-case init."""
    probe = container()["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert window > worst_init_seconds(guard.Policy())


def test_probes_use_the_routes_and_port_the_code_serves() -> None:
    """Readiness on /readyz and liveness on /healthz, on the port the master serves them on."""
    spec, variables = container(), env()
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ports["metrics"] == int(variables["MNN_GUARD_METRICS_PORT"])
    assert 'rm -rf "$PROMETHEUS_MULTIPROC_DIR"' in spec["args"][0]  # emptied at every start
    mounts = {m["mountPath"] for m in spec["volumeMounts"]}
    assert variables["PROMETHEUS_MULTIPROC_DIR"] in mounts


def gunicorn_settings(monkeypatch: pytest.MonkeyPatch, **environ: str) -> dict[str, Any]:
    """The gunicorn config's settings, read with only these MNN_GUARD_* variables set."""
    for name in os.environ:
        if name.startswith("MNN_GUARD_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))


def test_gunicorn_config_never_preloads_and_its_watchdog_outlasts_init(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gunicorn config forks workers before any load; the master's watchdog lets a worker
    start for longer than the worst-case init, and the manifest passes such a value too;
    gunicorn's heartbeat timeout (a request's bound) outlasts a call's wait for a replacement."""
    settings = gunicorn_settings(monkeypatch)
    policy = guard.Policy()
    assert settings["preload_app"] is False
    assert settings["start_timeout"] > worst_init_seconds(policy)
    assert float(env()["MNN_GUARD_START_TIMEOUT"]) > worst_init_seconds(policy)
    assert settings["timeout"] > policy.wait_timeout
    assert int(env()["MNN_GUARD_WORKER_TIMEOUT"]) > policy.wait_timeout
    assert callable(settings["when_ready"]) and callable(settings["child_exit"])


def test_gunicorn_workers_follow_the_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker per core this process may run on by default; MNN_GUARD_WORKERS overrides it."""
    assert gunicorn_settings(monkeypatch)["workers"] == len(os.sched_getaffinity(0))
    assert gunicorn_settings(monkeypatch, MNN_GUARD_WORKERS="3")["workers"] == 3


def test_gunicorn_watchdog_limits_are_settable(monkeypatch: pytest.MonkeyPatch) -> None:
    """How long a worker may stay STARTING or FAILED before the master replaces it comes from
    MNN_GUARD_START_TIMEOUT and MNN_GUARD_RESTART_AFTER (900 s by default, as /healthz had)."""
    defaults = gunicorn_settings(monkeypatch)
    assert (defaults["start_timeout"], defaults["restart_after"]) == (600.0, 900.0)
    told = gunicorn_settings(
        monkeypatch, MNN_GUARD_START_TIMEOUT="30", MNN_GUARD_RESTART_AFTER="60"
    )
    assert (told["start_timeout"], told["restart_after"]) == (30.0, 60.0)


# ------------------------------------------------------------------ alert rules


def rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_has_a_description_and_its_runbook() -> None:
    """Every alert has a summary, a description and a runbook_url naming its own section of
    docs/runbooks.md; every section there is an alert's."""
    runbooks = (DEPLOY.parent / "docs" / "runbooks.md").read_text()
    sections = re.findall(r"^## (MnnGuard\w+)$", runbooks, re.M)
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 9
    for rule in alerts:
        notes = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(notes), rule["alert"]
        assert notes["runbook_url"] == f"docs/runbooks.md#{rule['alert'].lower()}"
    assert sections == [rule["alert"] for rule in alerts]


def test_no_rule_selects_on_a_job_name() -> None:
    """The rules work whatever the scrape job is named (Kubernetes' annotation discovery names
    its own): no expression matches on `job`."""
    for rule in rules():
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", rule["expr"]), rule["expr"]


def test_gunicorn_metrics_port_listens_on_loopback_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master's unauthenticated metrics port binds 127.0.0.1 by default; the manifest,
    whose probes and scraper come over the pod network, asks for every address."""
    settings = gunicorn_settings(monkeypatch)
    assert settings["metrics_host"] == "127.0.0.1"
    assert env()["MNN_GUARD_METRICS_HOST"] == "0.0.0.0"
