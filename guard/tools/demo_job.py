"""`mnn-guard demo`: guard many inits of the demo vocoder with ~10% of inits degraded."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

import probes
from guard import mnn
from guard.errors import RecoveryExhausted
from guard.ladder import Action, Attempt, Policy, Rung
from guard.listeners import Listener
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from guard.wrap import wrap

__all__ = ["DemoTally", "run_demo"]

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


def _progress(done: int, total: int, tally: DemoTally, served: int, bad: int) -> None:
    line = (
        f"\r[{done:>4}/{total}] inits {tally.inits}  degraded caught {tally.caught}  "
        f"outputs served {served}  degraded served {bad}"
    )
    print(line, end="" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when no degraded output was served."""
    if not args.verbose:  # the table says what happened; per-init warnings would bury the progress
        logging.getLogger("mnn_guard").setLevel(logging.ERROR)
    model, probe_dir = demo.ensure_demo()
    probe = probes.load(probe_dir, model=model)
    registry = CollectorRegistry()
    server: Any = None
    if args.port >= 0:
        from guard.server import serve

        server = serve(port=args.port, registry=registry)
        print(f"metrics: {server.url}/metrics  ready: {server.url}/readyz", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    requests = [
        demo.demo_mel(int(f), seed=int(s))
        for f, s in zip(
            rng.integers(40, 160, args.requests),
            rng.integers(0, 1 << 30, args.requests),
            strict=True,
        )
    ]
    reference_module = mnn.adapt(demo.demo_factory()(dynamic=True))
    references = [reference_module.run([x])[0] for x in requests]
    del reference_module
    tally = DemoTally()
    injected = served = bad = exhausted = 0
    policy = Policy(promote_after=None, background=False)
    start = time.perf_counter()
    every = max(1, args.sessions // 20)
    for k in range(args.sessions):
        faulty = FaultyFactory(
            demo.demo_factory(),
            fault=FAULTS[k % len(FAULTS)],
            rate=args.rate,
            seed=args.seed * 100_003 + k,
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
        for x, ref in zip(requests, references, strict=True):
            wav = session.run({"mel": x})["wav"]
            served += 1
            verdict = probes.judge_output("wav", ref, wav, probe.thresholds_for("wav"))
            bad += not verdict.passed
        session.close()
        if (k + 1) % every == 0 or k + 1 == args.sessions:
            _progress(k + 1, args.sessions, tally, served, bad)
    seconds = time.perf_counter() - start
    rows = [
        ("sessions guarded", str(args.sessions)),
        ("inits (factory calls)", str(tally.inits)),
        ("degraded inits injected", str(injected)),
        ("degraded inits caught", str(tally.caught)),
        *(
            (f"recoveries: {a}", str(tally.actions.get(a, 0)))
            for a in ("reinit", "fallback", "promote")
        ),
        *((f"sessions ending on rung {r!r}", str(n)) for r, n in sorted(tally.rungs.items())),
        ("sessions exhausted", str(exhausted)),
        ("outputs served", str(served)),
        ("degraded outputs served", str(bad)),
        ("wall time", f"{seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        "\nmnn-guard demo: demo vocoder, "
        f"{args.rate:.0%} of static inits degraded ({', '.join(f.value for f in FAULTS)})"
    )
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    if server is not None:
        server.close()
    return 0 if bad == 0 and tally.caught == injected else 1
