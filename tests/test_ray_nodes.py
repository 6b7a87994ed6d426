"""The two-node Ray Serve recipe of docs/ops.md, run as written on one machine: a head and a
worker node (`ray start --block`, each with its own ports and temp dir, token authentication
on), `serve deploy` of the vocoder config with one replica per node, a request over HTTP, each
node's metrics port, and the cluster stopped by signalling its own `ray start` processes
(never `ray stop`, which ends every Ray process of the machine's user)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import polling
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

from test_recipes import free_port

from guard.tools import demo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BOUND = 180.0  # seconds one step may take on a loaded 2-core machine (a node starts in ~20 s)
T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], bound: float = BOUND) -> T:
    """Poll `check` until it returns something, within `bound` seconds (every 0.5 s)."""
    return polling.until(what, check, bound, every=0.5)


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += children.get(current, [])
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (zombies count as ended)."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


@dataclass
class Nodes:
    """A two-node cluster on this machine: its environment, addresses and `ray start` processes."""

    env: dict[str, str]
    gcs: str
    dashboard: str
    http_port: int
    metrics_ports: tuple[int, int]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `ray` or `serve` command with the cluster's environment (token authentication)."""
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def node_count(self) -> int:
        """Active nodes as `ray status` counts them."""
        done = self.ray("ray", "status", f"--address={self.gcs}")
        return done.stdout.count(" node_") if done.returncode == 0 else 0


def start_node(nodes: Nodes, folder: Path, metrics_port: int, *head: str) -> None:
    """`ray start --block` for one node with its own ports and temp dir (`head`: the head's
    own options, else it joins the head)."""
    ports = {
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": metrics_port,
    }
    command = [
        *(str(BIN / "ray"), "start", "--block", *(head or (f"--address={nodes.gcs}",))),
        *(f"--{name}={port}" for name, port in ports.items()),
        *(f"--temp-dir={folder}", "--num-cpus=1", "--node-ip-address=127.0.0.1"),
        "--disable-usage-stats",
    ]
    log = (folder.parent / f"{folder.name}.log").open("wb")
    nodes.started.append(
        subprocess.Popen(command, env=nodes.env, stdout=log, stderr=subprocess.STDOUT)
    )


@pytest.fixture()
def nodes() -> Iterator[Nodes]:
    """A head and a worker node started as the recipe says; both stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
    }
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = Nodes(
        env=env,
        gcs=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        http_port=free_port(),
        metrics_ports=(free_port(), free_port()),
    )
    try:
        head = (
            "--head",
            f"--port={gcs_port}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        start_node(cluster, folder / "head", cluster.metrics_ports[0], *head)
        until("the head node", lambda: cluster.node_count() == 1 or None)
        start_node(cluster, folder / "worker", cluster.metrics_ports[1])
        until("two nodes", lambda: cluster.node_count() == 2 or None)
        yield cluster
    finally:
        for process in reversed(cluster.started):
            if process.poll() is None:
                tree = descendants(process.pid)
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(60)
                for pid in alive(tree):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def config(nodes: Nodes, folder: Path) -> Path:
    """The recipe's Serve config, with the demo model, one replica per node, Serve's proxy on
    the head only (two nodes of one machine cannot both take its port)."""
    path = folder / "vocoder.yaml"
    path.write_text(
        json.dumps(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": nodes.http_port},
                "applications": [
                    {
                        "name": "vocoder",
                        "route_prefix": "/vocoder",
                        "import_path": "guard.ray_serve:build_app",
                        "args": {"model": str(demo.DEMO_MODEL), "probe": str(demo.DEMO_PROBE)},
                        "deployments": [
                            {
                                "name": "vocoder",
                                "num_replicas": 2,
                                "max_replicas_per_node": 1,
                                "ray_actor_options": {"num_cpus": 0.5},
                                "health_check_period_s": 2,
                            }
                        ],
                    }
                ],
            }
        )
    )
    return path


def healthy_replicas(port: int) -> set[str]:
    """The replicas whose ray_mnn_guard_healthy is 1 on one node's metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return set()
    return {
        s.labels["replica"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "ray_mnn_guard_healthy" and s.value == 1.0
    }


def test_two_nodes_serve_the_recipe_and_stop_by_their_own_processes(
    nodes: Nodes, tmp_path: Path
) -> None:
    """With RAY_AUTH_MODE=token and the head's token, both nodes join, `serve deploy` runs one
    replica per node, the route answers, each node's metrics port exports its own replica's
    health; SIGTERM to the worker node's `ray start --block` ends every process of that node
    and leaves the head serving alone; then the head's own ends the rest."""
    started = time.monotonic()
    deployed = nodes.ray(
        "serve", "deploy", str(config(nodes, tmp_path)), "--address", nodes.dashboard
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    def running() -> bool | None:
        status = nodes.ray("serve", "status", "--address", nodes.dashboard)
        return ("RUNNING: 2" in status.stdout and "status: RUNNING" in status.stdout) or None

    until("the application running with two replicas", running)
    deploy_seconds = time.monotonic() - started
    mel = demo.demo_mel(20)
    request = urllib.request.Request(
        f"http://127.0.0.1:{nodes.http_port}/vocoder",
        data=json.dumps({"mel": mel.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        wav = json.loads(answer.read())["wav"]
    assert len(wav[0][0]) == 20 * demo.HOP
    per_node = [until("a node's replica gauge", lambda p=p: healthy_replicas(p) or None) for p in
                nodes.metrics_ports]  # fmt: skip
    assert len(per_node[0] | per_node[1]) == 2 and not per_node[0] & per_node[1]

    head, worker = nodes.started
    tree = descendants(worker.pid)
    stopping = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(BOUND)
    until("the worker node's processes gone", lambda: not alive(tree) or None, 60)
    worker_seconds = time.monotonic() - stopping
    assert head.poll() is None
    until("the head alone", lambda: nodes.node_count() == 1 or None)

    tree = descendants(head.pid)
    stopping = time.monotonic()
    head.send_signal(signal.SIGTERM)
    head.wait(BOUND)
    until("the head node's processes gone", lambda: not alive(tree) or None, 60)
    print(
        f"two nodes up, deployed in {deploy_seconds:.0f} s; worker node stopped in "
        f"{worker_seconds:.0f} s, head in {time.monotonic() - stopping:.0f} s"
    )
