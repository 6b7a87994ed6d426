"""`mnn-guard demo`: guard many inits of the demo vocoder with ~10% of inits degraded.

`run_demo` measures (returns a `DemoReport`); `format_demo` renders it as text, `demo_json` as
JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

import probes
from guard import mnn
from guard.diagnosis import writer_for
from guard.errors import RecoveryExhausted
from guard.ladder import Action, Attempt, Policy, Rung
from guard.listeners import Listener
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from guard.tools.output import quiet_log, text_table
from guard.wrapping import wrap
from probes.judges import judge_output

__all__ = ["DemoReport", "DemoTally", "demo_json", "format_demo", "run_demo"]

FAULTS = (Fault.NOISE, Fault.STALE, Fault.ZEROS, Fault.NAN)


@dataclass
class DemoTally(Listener):
    """Counts what the guard saw and did across every session of the demo."""

    inits: int = 0
    caught: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    rungs: Counter[str] = field(default_factory=Counter)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self.inits += 1
        self.caught += not attempt.passed

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.actions[action.value] += 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    """What the demo injected, what the guard caught, and what it served."""

    sessions: int
    rate: float
    tally: DemoTally
    injected: int
    exhausted: int
    served: int
    bad: int
    seconds: float
    bundles: tuple[Path, ...] = ()  # diagnosis bundles left by failed canaries (--diagnose)

    @property
    def degraded(self) -> bool:
        """True when a degraded output was served or an injected fault went uncaught."""
        return self.bad > 0 or self.tally.caught != self.injected


def _status(done: int, total: int, tally: DemoTally, served: int, bad: int) -> str:
    return (
        f"[{done:>4}/{total}] inits {tally.inits}  degraded caught {tally.caught}  "
        f"outputs served {served}  degraded served {bad}"
    )


def run_demo(
    *,
    sessions: int = 60,
    requests: int = 4,
    rate: float = 0.1,
    seed: int = 2026,
    port: int | None = None,
    quiet: bool = True,
    progress: Callable[[str], None] | None = None,
    diagnose: str | os.PathLike[str] | None = None,
) -> DemoReport:
    """Build `sessions` guarded sessions over a faulty demo factory; serve and judge `requests`.

    `port` serves the metrics while the demo runs (0 picks a free port). With `quiet` the
    guard's per-init warnings are silenced for the run (the report says what happened). With
    `diagnose`, every failed canary leaves a bundle in that folder (`Policy.diagnose`).
    """
    say = progress or (lambda _: None)
    with quiet_log() if quiet else contextlib.nullcontext():
        model, probe_dir = demo.ensure_demo()
        probe = probes.load(probe_dir, model=model)
        registry = CollectorRegistry()
        with contextlib.ExitStack() as stack:
            if port is not None:
                from guard.server import serve

                server = serve(port=port, registry=registry)
                stack.callback(server.close)
                say(f"metrics: {server.url}/metrics  ready: {server.url}/readyz")
            policy = Policy(promote_after=None, background=False, diagnose=diagnose)
            writer = None if diagnose is None else writer_for(diagnose)
            mark = 0 if writer is None else writer.total
            report = _serve_sessions(probe, registry, policy, sessions, requests, rate, seed, say)
        if writer is None:
            return report
        writer.flush()
        return dataclasses.replace(report, bundles=tuple(writer.since(mark)))


def _serve_sessions(
    probe: probes.Probe,
    registry: CollectorRegistry,
    policy: Policy,
    sessions: int,
    requests: int,
    rate: float,
    seed: int,
    say: Callable[[str], None],
) -> DemoReport:
    """The demo's loop: wrap a faulty factory, serve every request, judge every output."""
    rng = np.random.default_rng(seed)
    mels = [
        demo.demo_mel(int(f), seed=int(s))
        for f, s in zip(
            rng.integers(40, 160, requests), rng.integers(0, 1 << 30, requests), strict=True
        )
    ]
    reference_module = mnn.adapt(demo.demo_factory()(dynamic=True))
    references = [reference_module.run([x])[0] for x in mels]
    del reference_module
    tally = DemoTally()
    injected = served = bad = exhausted = 0
    start = time.perf_counter()
    every = max(1, sessions // 20)
    for k in range(sessions):
        faulty = FaultyFactory(
            demo.demo_factory(), fault=FAULTS[k % len(FAULTS)], rate=rate, seed=seed * 100_003 + k
        )
        try:
            session = wrap(
                faulty, probe, policy=policy, name="vocoder", registry=registry, listeners=[tally]
            )
        except RecoveryExhausted:
            exhausted += 1
            injected += faulty.degraded_inits
            continue
        injected += faulty.degraded_inits
        tally.rungs[session.status.mode] += 1
        with session:
            for x, ref in zip(mels, references, strict=True):
                wav = session.run({demo.DEMO_INPUT: x})[demo.DEMO_OUTPUT]
                served += 1
                verdict = judge_output("wav", ref, wav, probe.thresholds_for("wav"))
                bad += not verdict.passed
        if (k + 1) % every == 0 or k + 1 == sessions:
            say(_status(k + 1, sessions, tally, served, bad))
    return DemoReport(
        sessions=sessions,
        rate=rate,
        tally=tally,
        injected=injected,
        exhausted=exhausted,
        served=served,
        bad=bad,
        seconds=time.perf_counter() - start,
    )


def format_demo(report: DemoReport) -> str:
    """The demo's summary: one labelled count per line."""
    tally = report.tally
    rows = [
        ("sessions guarded", str(report.sessions)),
        ("inits (factory calls)", str(tally.inits)),
        ("degraded inits injected", str(report.injected)),
        ("degraded inits caught", str(tally.caught)),
        *(
            (f"recoveries: {a}", str(tally.actions.get(a, 0)))
            for a in ("reinit", "fallback", "promote")
        ),
        *((f"sessions ending on rung {r!r}", str(n)) for r, n in sorted(tally.rungs.items())),
        ("sessions exhausted", str(report.exhausted)),
        ("outputs served", str(report.served)),
        ("degraded outputs served", str(report.bad)),
        ("wall time", f"{report.seconds:.1f} s"),
        *((("diagnosis bundles kept", str(len(report.bundles))),) if report.bundles else ()),
    ]
    faults = ", ".join(f.value for f in FAULTS)
    title = f"mnn-guard demo: demo vocoder, {report.rate:.0%} of static inits degraded ({faults})"
    table = text_table(("what happened", "count"), rows)
    return "\n".join([title, *("  " + line for line in table.splitlines())])


def demo_json(report: DemoReport) -> str:
    """The demo's counts as a JSON document."""
    tally = report.tally
    data = {
        "sessions": report.sessions,
        "rate": report.rate,
        "inits": tally.inits,
        "injected": report.injected,
        "caught": tally.caught,
        "recoveries": {a: tally.actions.get(a, 0) for a in ("reinit", "fallback", "promote")},
        "final_rungs": dict(sorted(tally.rungs.items())),
        "exhausted": report.exhausted,
        "served": report.served,
        "degraded_served": report.bad,
        "degraded": report.degraded,
        "seconds": report.seconds,
    }
    return json.dumps(data, indent=2)
