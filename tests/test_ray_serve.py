"""guard.ray_serve on a real local Ray cluster (one per test run of this module, on 127.0.0.1).

Two replicas of the demo vocoder where the replica whose factory claims number 0 degrades
every init: Serve's first health check fails it, Ray replaces it, and callers (by handle and
over HTTP) only ever get exact outputs; the `mnn_guard_*` metrics reach Ray's Prometheus
endpoint. A config-file deploy whose `user_config` changes swaps the model on the live
replica (same Ray worker) through `reconfigure`, and one naming a missing model keeps the old
one serving. Hostile deployments (a missing model, every init degraded) fail with their
reason; every static init degraded serves on the dynamic rung. A replica deployed first is
watched for a minute: its health gauge never leaves Ray's export. Waits poll a condition
against a bound.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polling
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

import guard
import probes
from guard import mnn
from guard.ray_serve import GuardedDeployment, application
from guard.testing import FaultyFactory, LouderThan
from guard.tools import demo
from guard.tools.models import build_vocoder
from probes import store

pytestmark = pytest.mark.slow
Array = np.ndarray[Any, Any]
T = TypeVar("T")
BOUND = 180.0  # seconds any one condition may take: a Serve application starts in about 25 s
ROOT = Path(__file__).resolve().parent.parent
REPLICA = {"num_cpus": 0.5}  # two replicas per application on a 2-CPU cluster, room for more
SMALL = {"num_cpus": 0.1}  # a replica beside those


def until(what: str, check: Callable[[], T | None], bound: float = BOUND) -> T:
    """Poll `check` until it returns something, within `bound` seconds (every 0.2 s)."""
    return polling.until(what, check, bound, every=0.2)


def claim(folder: str) -> int:
    """The lowest number no process has claimed in `folder` yet; the claim file holds our pid."""
    for number in itertools.count():
        try:
            fd = os.open(
                os.path.join(folder, f"replica-{number}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY
            )
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return number
    raise AssertionError("unreachable")


class FirstReplicaDegraded:
    """A factory whose first process (claim 0 in `folder`) degrades every init; others are clean."""

    def __init__(self, factory: mnn.MNNFactory, folder: str) -> None:
        self.factory = factory
        self.faulty = FaultyFactory(factory, rate=1.0, affects="all")
        self.folder = folder
        self.number: int | None = None
        self.path, self.inputs, self.outputs = factory.path, factory.inputs, factory.outputs

    def __call__(self, **overrides: Any) -> Any:
        if self.number is None:
            self.number = claim(self.folder)
        return (self.faulty if self.number == 0 else self.factory)(**overrides)


@dataclass
class Cluster:
    """A running local cluster: its metrics endpoint, Serve's HTTP port, start seconds."""

    metrics_url: str
    http_port: int
    started: float


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """ray.init(num_cpus=2) on 127.0.0.1 with a 1 s metrics report interval, and Serve."""
    from test_recipes import free_port

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import tests
    start = time.monotonic()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic() - start
    node = ray.nodes()[0]
    print(f"ray.init + serve.start: {started:.1f} s")
    try:
        yield Cluster(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", port, started)
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Watch:
    """What a thread saw of the steady application's health gauge, scrape by scrape."""

    seen: list[tuple[float, float | None]]  # (seconds since it was ready, the value or None)
    stop: threading.Event


@pytest.fixture(scope="module", autouse=True)
def steady(cluster: Cluster, demo_probe: probes.Probe) -> Iterator[Watch]:
    """An application deployed before the module's tests and scraped every second from then on
    by a thread, so that the minute it is watched for runs beside the other tests."""
    app = application(
        demo.demo_factory(threads=1), demo_probe, name="steady", ray_actor_options=SMALL
    )
    serve.run(app, name="steady", route_prefix="/steady")
    ready = time.monotonic()
    watch = Watch([], threading.Event())

    def look() -> None:
        while not watch.stop.wait(1.0):
            try:
                samples = scrape(cluster.metrics_url)
            except OSError:
                continue
            value = next(
                (
                    v
                    for name, s, v in samples
                    if name == "ray_mnn_guard_healthy" and s.get("application") == "steady"
                ),
                None,
            )
            watch.seen.append((time.monotonic() - ready, value))

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    yield watch
    watch.stop.set()
    thread.join(30)
    serve.delete("steady")


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every mnn_guard sample of one scrape of Ray's metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (s.name, s.labels, s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "mnn_guard" in s.name
    ]


def reference(x: Array, path: Path = demo.DEMO_MODEL) -> Array:
    """The clean output of a fresh dynamic module of `path`, in this process."""
    factory = guard.mnn_factory(path, ["mel"], ["wav"], threads=1)
    return mnn.adapt(factory(dynamic=True)).run([x])[0]


def post_json(url: str, doc: object) -> tuple[int, Any]:
    """(status, JSON body) of a POST."""
    request = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_degraded_replica_is_replaced_and_serves_nothing(
    cluster: Cluster, demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """Two replicas; the first one's every init is degraded: it never serves, Ray replaces it
    (a third replica starts, the first process ends), every output callers get is exact, and
    Ray's metrics endpoint carries both live replicas' health and served calls, and the
    degraded replica's failed canaries (one per rung)."""
    app = application(
        FirstReplicaDegraded(demo.demo_factory(threads=1), str(tmp_path)),
        demo_probe,
        name="vocoder",
        policy=guard.Policy(reinit_attempts=0),
        num_replicas=2,
        health_check_period_s=1,
        ray_actor_options=REPLICA,
    )
    mels = [demo.demo_mel(60 + 20 * k, seed=k) for k in range(4)]
    expected = [reference(x) for x in mels]
    outputs: list[tuple[int, Array]] = []
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deploying = pool.submit(serve.run, app, name="vocoder", route_prefix="/vocoder")
        # callers while the deployment starts: requests wait for a running replica
        handle = until("the application's handle", lambda: _handle("vocoder"))
        for k in itertools.count():
            outputs.append(
                (k % 4, handle.remote({"mel": mels[k % 4]}).result(timeout_s=BOUND)["wav"])
            )
            if deploying.done():
                break
        handle = deploying.result(timeout=BOUND)
    ready = time.monotonic() - start
    claims = {int(p.name.split("-")[1]): int(p.read_text()) for p in tmp_path.glob("replica-*")}
    made = {n: (tmp_path / f"replica-{n}").stat().st_mtime for n in claims}
    print(
        f"application running after {ready:.1f} s; claims {sorted(claims)}; the replacement "
        f"started {made[2] - made[0]:.1f} s after the degraded replica's first init"
    )
    assert {0, 1, 2} <= set(claims)
    until("the degraded replica's process to end", lambda: not _alive(claims[0]) or None)

    for k in range(20):
        outputs.append((k % 4, handle.remote({"mel": mels[k % 4]}).result(timeout_s=60)["wav"]))
    for k, wav in outputs:
        np.testing.assert_allclose(wav, expected[k], rtol=0, atol=1e-5)
    print(f"{len(outputs)} outputs served, all exact")

    url = f"http://127.0.0.1:{cluster.http_port}/vocoder"
    status, body = post_json(url, {"mel": mels[0].tolist()})
    assert status == 200
    np.testing.assert_allclose(np.asarray(body["wav"], np.float32), expected[0], atol=1e-5)
    status, body = post_json(url, {"mel": mels[0][:, :40].tolist()})
    assert status == 422 and "mel" in body["error"]

    def live_replicas() -> set[str] | None:
        samples = scrape(cluster.metrics_url)
        healthy = {
            s["replica"]
            for name, s, v in samples
            if name == "ray_mnn_guard_healthy" and s.get("session") == "vocoder" and v == 1
        }
        served = sum(
            v
            for name, s, v in samples
            if name == "ray_mnn_guard_runs_total" and s.get("result") == "ok"
        )
        failed = sum(
            v
            for name, s, v in samples
            if name == "ray_mnn_guard_canary_checks_total" and s.get("result") == "fail"
        )
        ok = len(healthy) == 2 and served >= len(outputs) and failed >= 2
        return healthy if ok else None

    replicas = until("both live replicas' metrics", live_replicas, 60)
    print(f"metrics of replicas {sorted(replicas)} at {cluster.metrics_url}")
    check_relabelled(cluster, replicas, tmp_path)
    serve.delete("vocoder")


RELABEL = """    metric_relabel_configs:
      - {source_labels: [__name__], regex: "ray_(mnn_guard_.*)", target_label: __name__}
"""  # as docs/deployment.md says


def check_relabelled(cluster: Cluster, replicas: set[str], folder: Path) -> None:
    """A real Prometheus scraping Ray's endpoint with the relabelling of docs/deployment.md and
    the alert rules: the guard's own names carry both replicas' health, and every rule
    evaluates."""
    from prometheus_server import RULES, get_json, poll, prometheus, query

    if shutil.which("prometheus") is None:
        assert os.environ.get("CI") != "true", "the prometheus binary is missing (.ci/run)"
        print("RELABELLING NOT CHECKED: the `prometheus` binary is not installed")
        return
    target = cluster.metrics_url.removeprefix("http://").removesuffix("/metrics")
    with prometheus(folder, [target], rules=RULES, job_extra=RELABEL) as base:
        healthy = 'mnn_guard_healthy{session="vocoder"} == 1'

        def both() -> bool:
            return {s["metric"]["replica"] for s in query(base, healthy)} == replicas

        poll("both replicas under the guard's own names", both)

        def evaluated() -> bool:
            groups = get_json(f"{base}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) >= 8 and all(r["health"] == "ok" for r in rules)

        poll("every alert and recording rule evaluated", evaluated)


def _handle(app: str) -> Any:
    """The app's handle once Serve knows the application, else None."""
    try:
        return serve.get_app_handle(app)
    except Exception:
        return None


def _alive(pid: int) -> bool:
    """True while a process (not a zombie) has this pid."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def config_deploy(app: str, args: dict[str, str], user: dict[str, str] | None) -> Any:
    """A Serve config deploying guard.ray_serve:build_app as `app`, one small replica."""
    deployment: dict[str, Any] = {
        "name": "vocoder",
        "num_replicas": 1,
        "health_check_period_s": 1,
        "ray_actor_options": REPLICA,
    }
    if user is not None:
        deployment["user_config"] = user
    return ServeDeploySchema.model_validate(
        {
            "applications": [
                {
                    "name": app,
                    "route_prefix": f"/{app}",
                    "import_path": "guard.ray_serve:build_app",
                    "args": args,
                    "deployments": [deployment],
                }
            ]
        }
    )


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model, probe dir) of a second vocoder (other weights), with its own recorded probe."""
    folder = tmp_path_factory.mktemp("other")
    model = folder / "other.mnn"
    build_vocoder(model, seed=1)
    factory = guard.mnn_factory(model, ["mel"], ["wav"], threads=1)
    probes.record(
        factory, {"mel": demo.demo_mel()}, reference={"dynamic": True},
        dynamic={"mel": {2: (1, 4000)}},
    ).save(folder / "other.probe")  # fmt: skip
    return model, folder / "other.probe"


def test_reconfigure_swaps_the_model_on_the_live_replica(
    cluster: Cluster, demo_paths: tuple[Path, Path], other: tuple[Path, Path]
) -> None:
    """A config-file deploy (import_path guard.ray_serve:build_app); changing only user_config
    swaps in another model and probe on the same replica and Ray worker: outputs follow it."""
    first = {"model": str(demo_paths[0]), "probe": str(demo_paths[1])}
    second = {"model": str(other[0]), "probe": str(other[1])}
    mel = demo.demo_mel(80, seed=9)
    before, after = reference(mel), reference(mel, other[0])
    assert not np.allclose(before, after, atol=1e-3)

    client = serve_start()
    client.deploy_apps(config_deploy("swap", first, first), _blocking=True)
    handle = serve.get_app_handle("swap")
    np.testing.assert_allclose(handle.remote({"mel": mel}).result()["wav"], before, atol=1e-5)
    workers = until("the replica's info metric", lambda: _info(cluster, "swap", demo_paths[0]))

    start = time.monotonic()
    client.deploy_apps(config_deploy("swap", first, second))

    def swapped() -> bool | None:
        wav = handle.remote({"mel": mel}).result(timeout_s=60)["wav"]
        return True if np.allclose(wav, after, atol=1e-5) else None

    until("outputs of the new model", swapped)
    print(f"model swapped by reconfigure in {time.monotonic() - start:.1f} s")
    assert until("the new model's info metric", lambda: _info(cluster, "swap", other[0])) == workers
    serve.delete("swap")


@pytest.mark.hostile
def test_bad_reconfigure_keeps_the_model_serving_and_logs_why(
    cluster: Cluster, demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A user_config naming a model file that is not there: the replica stays healthy on the
    same worker, its outputs and info metric stay the old model's, and its log says why."""
    first = {"model": str(demo_paths[0]), "probe": str(demo_paths[1])}
    missing = {"model": str(tmp_path / "nowhere.mnn"), "probe": str(demo_paths[1])}
    mel = demo.demo_mel(60, seed=10)
    client = serve_start()
    client.deploy_apps(config_deploy("keep", first, first), _blocking=True)
    handle = serve.get_app_handle("keep")
    workers = until("the replica's info metric", lambda: _info(cluster, "keep", demo_paths[0]))

    client.deploy_apps(config_deploy("keep", first, missing))
    line = until("the refusal in the replica's log", lambda: _logged("nowhere.mnn"))
    assert "reconfigure refused" in line and "no such file" in line, line

    def running() -> bool | None:
        status = serve.status().applications["keep"]
        return (status.status, status.deployments["vocoder"].status) == (
            "RUNNING",
            "HEALTHY",
        ) or None

    until("the update to finish with the deployment healthy", running)
    np.testing.assert_allclose(handle.remote({"mel": mel}).result()["wav"], reference(mel),
                               atol=1e-5)  # fmt: skip
    assert _info(cluster, "keep", demo_paths[0]) == workers
    serve.delete("keep")


def _logged(text: str) -> str | None:
    """The first line of this cluster's logs that contains `text`, if any."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in sorted(logs.rglob("*")):
        if path.is_file() and path.suffix in (".log", ".err", ".out"):
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
    return None


def failed_deployment(app: str, deployment: str) -> tuple[str, set[str]]:
    """Poll Serve until `deployment` of `app` is DEPLOY_FAILED with no replica left: (its
    message, every replica state seen meanwhile)."""
    seen: set[str] = set()

    def failed() -> str | None:
        found = serve.status().applications.get(app)
        entry = found.deployments.get(deployment) if found is not None else None
        if entry is None:
            return None
        seen.update(str(state) for state in entry.replica_states)
        done = entry.status == "DEPLOY_FAILED" and not entry.replica_states
        return entry.message if done else None

    message = until(f"{app} to fail with no replica left", failed)
    return message, seen


@pytest.mark.hostile
def test_missing_model_fails_the_deployment_with_the_reason(
    cluster: Cluster, demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A config naming a model file that is not there: Serve tries a bounded number of
    replicas, none runs, and the deployment fails with the file and 'no such file' as its
    message."""
    missing = {"model": str(tmp_path / "nowhere.mnn"), "probe": str(demo_paths[1])}
    serve_start().deploy_apps(config_deploy("missing", missing, None))
    message, seen = failed_deployment("missing", "vocoder")
    assert "nowhere.mnn" in message and "no such file" in message, message
    assert "RUNNING" not in seen
    serve.delete("missing")


@pytest.mark.hostile
def test_every_init_degraded_fails_the_deployment_with_the_canarys_reason(
    cluster: Cluster, demo_probe: probes.Probe
) -> None:
    """Every init of every replica degraded: no replica ever runs (so no degraded output is
    served), and the deployment fails with the exhausted session's canary verdict."""
    app = application(
        FaultyFactory(demo.demo_factory(threads=1), rate=1.0, affects="all"),
        demo_probe,
        name="degraded",
        policy=guard.Policy(reinit_attempts=0),
        ray_actor_options=SMALL,
    )
    serve._run(app, name="degraded", route_prefix="/degraded", _blocking=False)
    message, seen = failed_deployment("degraded", "degraded")
    assert "exhausted" in message and "snr_db" in message, message
    assert "RUNNING" not in seen
    serve.delete("degraded")


@pytest.mark.hostile
def test_every_static_init_degraded_serves_on_the_dynamic_rung(
    cluster: Cluster, demo_probe: probes.Probe
) -> None:
    """Every static init degraded: the replica falls back to the dynamic rung and serves
    exact outputs; Ray's metrics say so (rung dynamic, one fallback)."""
    app = application(
        FaultyFactory(demo.demo_factory(threads=1), rate=1.0),
        demo_probe,
        name="fallback",
        policy=guard.Policy(reinit_attempts=0),
        ray_actor_options=SMALL,
    )
    handle = serve.run(app, name="fallback", route_prefix="/fallback")
    mel = demo.demo_mel(70, seed=11)
    np.testing.assert_allclose(handle.remote({"mel": mel}).result()["wav"], reference(mel),
                               atol=1e-5)  # fmt: skip

    def on_dynamic() -> bool | None:
        samples = scrape(cluster.metrics_url)
        rung = {
            s["rung"]
            for name, s, v in samples
            if name == "ray_mnn_guard_rung" and s.get("session") == "fallback" and v == 1
        }
        fallbacks = sum(
            v
            for name, s, v in samples
            if name == "ray_mnn_guard_recoveries_total"
            and (s.get("session"), s.get("action")) == ("fallback", "fallback")
        )
        return True if rung == {"dynamic"} and fallbacks == 1 else None

    until("metrics of the dynamic rung", on_dynamic, 60)
    serve.delete("fallback")


def test_a_replica_shadows_live_calls_and_leaves_a_module_only_loud_inputs_degrade(
    cluster: Cluster, demo_probe: probes.Probe
) -> None:
    """Every static init is degraded on loud inputs only (the canary passes it): with a shadow
    check on every call, the replica leaves the static rung after the first loud call, serves
    exact outputs after it, and Ray's metrics count the failed shadow check."""
    faulty = FaultyFactory(demo.demo_factory(threads=1), rate=1.0, trigger=LouderThan(10.0))
    app = application(
        faulty, demo_probe, name="shadowed",
        policy=guard.Policy(reinit_attempts=0, shadow_every=1), ray_actor_options=SMALL,
    )  # fmt: skip
    handle = serve.run(app, name="shadowed", route_prefix="/shadowed")
    loud = demo.demo_mel(50, seed=12) * np.float32(4.0)
    handle.remote({"mel": loud}).result()  # served by the degraded module: the shadow sees it

    def exact() -> bool | None:
        wav = handle.remote({"mel": loud}).result()["wav"]
        return True if np.allclose(wav, reference(loud), rtol=0, atol=1e-5) else None

    until("exact outputs for loud inputs", exact, 60)

    def counted() -> bool | None:
        samples = scrape(cluster.metrics_url)
        fails = sum(
            v
            for name, s, v in samples
            if name == "ray_mnn_guard_shadow_checks_total"
            and (s.get("session"), s.get("result")) == ("shadowed", "fail")
        )
        rung = {
            s["rung"]
            for name, s, v in samples
            if name == "ray_mnn_guard_rung" and s.get("session") == "shadowed" and v == 1
        }
        return True if fails >= 1 and rung == {"dynamic"} else None

    until("the failed shadow check on Ray's metrics", counted, 60)
    serve.delete("shadowed")


def _info(cluster: Cluster, app: str, model: Path) -> set[str] | None:
    """The Ray workers of `app` exporting session_info = 1 for `model` (its sha256), if any."""
    sha = store.file_sha256(model)
    workers = {
        s["WorkerId"]
        for name, s, v in scrape(cluster.metrics_url)
        if name == "ray_mnn_guard_session_info"
        and (s.get("application"), s.get("model_sha256"), v) == (app, sha, 1)
    }
    return workers or None


def test_check_health_follows_the_session(demo_probe: probes.Probe, cluster: Cluster) -> None:
    """In-process: check_health passes while serving, raises RecoveryExhausted for a session
    whose every init is degraded and SessionClosed-like Unavailable once closed."""
    good = GuardedDeployment(demo.demo_factory(threads=1), demo_probe, name="good")
    good.check_health()
    assert good.run({"mel": demo.demo_mel(30)})["wav"].size == 30 * demo.HOP
    bad = GuardedDeployment(
        FaultyFactory(demo.demo_factory(threads=1), rate=1.0, affects="all"),
        demo_probe,
        name="bad",
        policy=guard.Policy(reinit_attempts=0, background=False),
    )
    with pytest.raises(guard.RecoveryExhausted, match="exhausted"):
        bad.check_health()
    assert good.session is not None
    good.session.close()
    with pytest.raises(guard.Unavailable, match="not serving"):
        good.check_health()
    with pytest.raises(guard.ConfigError, match="model"):
        GuardedDeployment(config={"model": "x.mnn"})


def test_health_gauge_is_exported_for_the_replicas_whole_life(steady: Watch) -> None:
    """Ray drops a gauge that is not set again (the guard's were gone about 20 s after a
    replica started): the steady replica's mnn_guard_healthy is 1 in every scrape from its
    first report until more than 60 s after the replica started."""
    until(
        "65 s of the steady replica's life",
        lambda: (steady.seen[-1:] or [(0, 0)])[0][0] > 65 or None,
    )
    first = next(i for i, (_, value) in enumerate(steady.seen) if value is not None)
    after = [value for _, value in steady.seen[first:]]
    print(
        f"health gauge first exported {steady.seen[first][0]:.0f} s after start, then in "
        f"{after.count(1.0)} of {len(after)} scrapes until {steady.seen[-1][0]:.0f} s"
    )
    assert steady.seen[first][0] < 30, steady.seen
    assert after == [1.0] * len(after), steady.seen
