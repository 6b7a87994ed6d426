"""One process serving guard's routes (`guard.serve`) with one session of the demo vocoder.

MODE healthy: a clean start; fellback: every static init degraded, so the session falls back
to the dynamic rung while it starts, before anything scrapes it; empty: its only session is
closed, so it serves nothing. Prints its metrics port, then serves until stdin closes.
"""

import sys

import guard
import probes
from guard.testing import Fault, FaultyFactory
from guard.tools import demo

mode = sys.argv[1]
factory = demo.demo_factory(threads=1)
if mode == "fellback":
    factory = FaultyFactory(factory, fault=Fault.NOISE, rate=1.0)  # static inits only
session = guard.wrap(
    factory,
    probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL),
    name="vocoder",
    policy=guard.Policy(reinit_attempts=0),
)
if mode == "empty":
    session.close()
server = guard.serve(port=0)
print(server.port, flush=True)
sys.stdin.read()
server.close()
