"""Measure, on the installed PyMNN, the MNN facts mnn-guard relies on (docs/compatibility.md).

    python compat/facts.py [--json FILE] [--tests JUNIT]

Each fact is measured by running MNN, never read from its version: the facts that leave a
process in a state of their own (a fork after a load, MNN's thread pool) run in a fresh
interpreter each. Prints one line per fact; `--json` also writes them to FILE, with the
counts of a pytest JUnit report given as `--tests`. Exits 1 when the demo served a degraded
output or the demo's probe misjudged a clean init (`compat/report.py` renders the results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FORK_WAIT = 10.0  # seconds a forked child gets for one load and forward (it takes < 1 s)
SPIN_SECONDS = 2.0  # how long a one-thread module forwards while MNN's pool may spin

Fact = dict[str, Any]


def _fresh(code: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; its last stdout line is a JSON object."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def views_overwritten() -> Fact:
    """Var.read() is a view of MNN's memory: reading each of three forwards' outputs without
    keeping the Var gives three copies of the last one."""
    import numpy as np

    from guard.mnn import runtime_manager
    from guard.mnn.native import F, nn
    from guard.tools import demo

    module = nn.load_module_from_file(
        str(demo.DEMO_MODEL), ["mel"], ["wav"], runtime_manager=runtime_manager(1)
    )
    mels = [demo.demo_mel(100, seed=k) for k in range(3)]
    read = [module.forward([F.const(m, list(m.shape), F.NCHW)])[0].read() for m in mels]
    same = all(np.array_equal(read[0], r) for r in read[1:])
    return {"value": same, "detail": f"3 outputs read without their Vars: all equal {same}"}


def fork_hang() -> Fact:
    """A child forked after its parent loaded and ran a module (MNN's default threads) and
    then loading and running one itself: does it finish?"""
    model = _demo_model()
    found = _fresh(
        f"""
        import json, os, signal, time
        from guard.mnn.native import F, nn
        def run():
            m = nn.load_module_from_file({model!r}, ["mel"], ["wav"])
            x = F.placeholder([1, 80, 20], F.NCHW)
            x.write([0.1] * 1600)
            m.forward([x])[0].read()
        run()
        pid = os.fork()
        if pid == 0:
            run()
            os._exit(0)
        start = time.monotonic()
        while time.monotonic() - start < {FORK_WAIT}:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(json.dumps({{"hung": False, "status": status}}))
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(json.dumps({{"hung": True, "status": None}}))
        """
    )
    hung = bool(found["hung"])
    said = f"still running after {FORK_WAIT:g} s (killed)" if hung else "finished"
    return {"value": hung, "detail": f"forked child's load and forward: {said}"}


def dynamic_on_control_flow() -> Fact:
    """A model with an ONNX `If` loaded with dynamic=True: does MNN load it statically?"""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import onnx_models  # type: ignore[import-not-found]  # tests/, put on sys.path above

    from guard.mnn import STATIC_LOAD_NOTE, captured_output, runtime_manager
    from guard.mnn.native import nn

    with tempfile.TemporaryDirectory() as folder:
        path = onnx_models.convert(onnx_models.control_flow(), Path(folder) / "cf.mnn")
        with captured_output(echo=False) as lines:
            nn.load_module_from_file(
                str(path), ["x", "flag"], ["y"], dynamic=True, runtime_manager=runtime_manager(1)
            )
    static = any(STATIC_LOAD_NOTE in line for line in lines)
    said = next((line for line in lines if STATIC_LOAD_NOTE in line), "nothing")
    return {"value": static, "detail": f"MNN said: {said}"}


def thread_pool_spin() -> Fact:
    """A one-thread module forwarding for a while, in a fresh process and in one where a
    module of MNN's default 4 threads ran once: the CPU MNN's other threads burn meanwhile."""
    code = """
        import json, os, time
        import guard
        from guard import mnn
        from guard.tools import demo
        x = demo.demo_mel(100)
        if {warm}:
            mnn.adapt(guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"])()).run([x])
        one = mnn.adapt(guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], threads=1)())
        def others():
            ticks = 0
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != os.getpid():
                    with open(f"/proc/self/task/{{tid}}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                    ticks += int(fields[11]) + int(fields[12])
            return ticks / os.sysconf("SC_CLK_TCK")
        calls, before, start = 0, others(), time.monotonic()
        while time.monotonic() - start < {seconds}:
            one.run([x])
            calls += 1
        wall = time.monotonic() - start
        print(json.dumps({{"calls": calls, "wall": wall, "others": others() - before}}))
    """
    clean = _fresh(code.format(warm=False, seconds=SPIN_SECONDS))
    after = _fresh(code.format(warm=True, seconds=SPIN_SECONDS))
    spin = after["others"] > 0.25 * after["wall"] and clean["others"] < 0.1 * clean["wall"]
    return {
        "value": spin,
        "detail": (
            f"MNN's other threads' CPU over {after['wall']:.1f} s of one-thread forwards: "
            f"{clean['others']:.2f} s in a fresh process ({clean['calls']} calls), "
            f"{after['others']:.2f} s after a default (4-thread) module ran "
            f"({after['calls']} calls)"
        ),
    }


def zero_size_read() -> Fact:
    """Var.read() of a computed [1, 0] tensor: does MNN raise?"""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import onnx_models

    from guard.mnn import runtime_manager
    from guard.mnn.native import F, nn

    with tempfile.TemporaryDirectory() as folder:
        path = onnx_models.convert(onnx_models.empty_tensors(), Path(folder) / "empty.mnn")
        module = nn.load_module_from_file(
            str(path), ["x"], ["empty"], runtime_manager=runtime_manager(1)
        )
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    (empty,) = module.forward([F.const(x, [1, 4], F.NCHW)])
    shape = tuple(int(d) for d in empty.shape)
    try:
        empty.read()
    except SystemError as exc:
        return {"value": True, "detail": f"shape {list(shape)}: SystemError ({exc})"[:200]}
    return {"value": False, "detail": f"shape {list(shape)}: read() returned"}


def get_info_expression_built() -> Fact:
    """A model built with MNN.expr (placeholder -> relu) and saved with MNN's defaults: does
    `get_info` name its input? (No when MNN evaluated the graph eagerly and saved constants.)"""
    from guard.mnn import placeholders_fold, runtime_manager
    from guard.mnn.native import F, nn

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "relu.mnn")
        x = F.placeholder([1, 4], F.NCHW)
        x.name = "x"
        y = F.relu(x)
        y.name = "y"
        F.save([y], path)
        info = nn.load_module_from_file(path, [], [], runtime_manager=runtime_manager(1))
        names = [str(n) for n in info.get_info().get("inputNames", [])]
    named = names == ["x"]
    eager = "placeholders fold (eager evaluation)" if placeholders_fold() else "graph kept"
    return {"value": named, "detail": f"get_info inputNames {names}; {eager}"}


def demo_canary() -> Fact:
    """The shipped demo probe's canary on a clean static init here: SNR to its goldens, the
    calibrated limit, and what `guard.wrap` judged it against."""
    import warnings

    import guard
    import probes
    from guard import mnn
    from guard.tools import demo
    from probes.measures import snr_db

    model, folder = demo.ensure_demo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe was recorded with another MNN
        probe = probes.load(folder, model=model)
        factory = demo.demo_factory(threads=1)
        runner = mnn.adapt(factory(), probe.input_names, probe.output_names)
        worst = math.inf
        for case in probe.cases:
            outs = runner.run([case.inputs[n] for n in probe.input_names])
            worst = min(
                worst,
                *(
                    snr_db(case.outputs[n], o)
                    for n, o in zip(probe.output_names, outs, strict=True)
                ),
            )
        session = guard.wrap(factory, probe, name="compat", metrics=False)
        basis = session.status.basis.value
        session.close()
    limit = probe.limits_for("wav")["snr_db"]
    shown = "bit-exact" if math.isinf(worst) else f"{worst:.1f} dB"
    return {
        "value": basis,
        "snr_db": None if math.isinf(worst) else worst,
        "limit_db": limit,
        "detail": f"wav {shown} against the goldens (tight limit {limit:.1f} dB); basis {basis}",
    }


def demo() -> Fact:
    """`mnn-guard demo` (60 guarded sessions, ~10% of inits degraded): degraded outputs served."""
    script = Path(sys.executable).with_name("mnn-guard")
    done = subprocess.run(
        [str(script), "demo", "--json"], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"mnn-guard demo exited {done.returncode}: {done.stderr[-300:]}")
    found = json.loads(done.stdout)
    served, bad = found["served"], found["degraded_served"]
    return {
        "value": bad,
        "detail": (
            f"{found['inits']} inits, {found['injected']} degraded injected, {found['caught']} "
            f"caught; {served} outputs served, {bad} degraded"
        ),
    }


def _demo_model() -> str:
    from guard.tools import demo

    return str(demo.DEMO_MODEL)


FACTS: dict[str, Callable[[], Fact]] = {
    "views_overwritten": views_overwritten,
    "fork_hang": fork_hang,
    "dynamic_on_control_flow": dynamic_on_control_flow,
    "thread_pool_spin": thread_pool_spin,
    "zero_size_read": zero_size_read,
    "get_info_expression_built": get_info_expression_built,
    "demo_canary": demo_canary,
    "demo": demo,
}
BASES = ("golden", "local")  # what a clean init of the demo may be judged against


def measure() -> dict[str, Any]:
    """Every fact on the installed MNN, with the release and when."""
    from guard.mnn import mnn_version

    found: dict[str, Any] = {
        "mnn": mnn_version(),
        "python": sys.version.split()[0],
        "measured": time.strftime("%Y-%m-%d"),
        "facts": {},
    }
    for name, fact in FACTS.items():
        try:
            found["facts"][name] = fact()
        except Exception as exc:  # a fact that cannot be measured here says why
            found["facts"][name] = {"value": None, "detail": f"not measured: {exc!r}"[:300]}
    return found


def tests(junit: str) -> dict[str, Any]:
    """The counts of a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "seconds": round(float(suite.get("time", "0")), 1)}


def healthy(found: dict[str, Any]) -> bool:
    """The demo served no degraded output and its probe judged a clean init as it should."""
    facts = found["facts"]
    return facts["demo"]["value"] == 0 and facts["demo_canary"]["value"] in BASES


def main(argv: list[str] | None = None) -> int:
    """Measure and print every fact; write them as JSON when asked. Exit 1 when the demo
    served a degraded output or its probe misjudged a clean init."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the facts to FILE")
    parser.add_argument("--tests", metavar="JUNIT", help="a pytest JUnit report to include")
    args = parser.parse_args(argv)
    found = measure()
    if args.tests:
        found["tests"] = tests(args.tests)
    print(f"MNN {found['mnn']}")
    for name, fact in found["facts"].items():
        print(f"  {name}: {fact['value']}  ({fact['detail']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0 if healthy(found) else 1


if __name__ == "__main__":
    sys.exit(main())
