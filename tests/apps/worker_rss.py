"""A worker's memory: guard one model as a serving worker does, then print as JSON, in MiB, its
RSS before the model (`base`: Python, numpy, MNN, guard), after five calls (`rss`) and at its
peak (`peak`), from /proc/self/status.

    worker_rss.py MODEL PROBE serve     # on the first rung: one clean init, then calls
    worker_rss.py MODEL PROBE fallback  # every first-rung init degraded: on the fallback rung
    worker_rss.py MODEL PROBE promote   # the first init degraded: a fallback, then the first
                                        # rung again (two modules at once)

The call is the probe's first canary; the model's inputs and outputs are the probe's. MODEL
`demo` (any PROBE) is the demo vocoder.
"""

import json
import sys
import time

import guard
import probes
from guard.testing import FaultyFactory
from guard.tools import demo


def status_mb(key: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


base = status_mb("VmRSS")
model, probe_dir, mode = sys.argv[1:4]
if model == "demo":
    model, probe_dir = str(demo.DEMO_MODEL), str(demo.DEMO_PROBE)
probe = probes.load(probe_dir, model=model)
inputs = dict(probe.cases[0].inputs)
if model == str(demo.DEMO_MODEL):
    factory = demo.demo_factory(threads=1)
else:
    factory = guard.mnn_factory(model, list(inputs), list(probe.output_names), threads=1)
policy = guard.Policy(reinit_attempts=0, background=mode == "promote", promote_after=0.5)
if mode == "fallback":
    factory = FaultyFactory(factory, rate=1.0)  # first-rung (static) inits only
elif mode == "promote":
    factory = FaultyFactory(factory, schedule=[True])
session = guard.wrap(factory, probe, name="m", policy=policy)
deadline = time.monotonic() + 120
while mode == "promote" and session.status.rung_index != 0 and time.monotonic() < deadline:
    session.run(inputs)
    time.sleep(0.1)
for _ in range(5):
    session.run(inputs)
rung = session.status.rung_index
print(
    json.dumps({"rung": rung, "base": base, "rss": status_mb("VmRSS"), "peak": status_mb("VmHWM")})
)
