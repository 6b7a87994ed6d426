"""The `mnn-guard` command line: inspect, record, check, assess, demo, doctor, bench, diagnose,
report.

`guard.tools.arguments` parses; each command runs from the module of its concept, imported
(with its tool and MNN) only when it runs, so that `mnn-guard --help` stays fast. A user error
(a bad argument, a model or probe that cannot be read, an output path that cannot be written)
is one line on stderr and exit 2; exit 1 means "degraded"; a bug in mnn-guard itself keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from guard.tools.arguments import parser
from guard.tools.errors import EXIT_DEGRADED, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["EXIT_DEGRADED", "EXIT_OK", "EXIT_USAGE", "UsageError", "main"]

COMMANDS = {  # subcommand -> the module holding its `cmd_<subcommand>`
    "inspect": "guard.tools.probe_commands",
    "record": "guard.tools.probe_commands",
    "check": "guard.tools.probe_commands",
    "assess": "guard.tools.probe_commands",
    "demo": "guard.tools.measure_commands",
    "doctor": "guard.tools.measure_commands",
    "bench": "guard.tools.measure_commands",
    "diagnose": "guard.tools.diagnosis_commands",
    "report": "guard.tools.diagnosis_commands",
}


def command(name: str) -> Callable[..., int]:
    """The function that runs subcommand `name` (its module imported now)."""
    run: Callable[..., int] = getattr(importlib.import_module(COMMANDS[name]), f"cmd_{name}")
    return run


def _refuse(name: str, message: str) -> int:
    """A user error: one line on stderr, exit 2."""
    print(f"mnn-guard {name}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mnn-guard` console script; returns the exit code."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from guard.errors import GuardError, RecoveryExhausted
    from guard.tools.output import native_stdout_to_stderr
    from probes.errors import ProbeError

    clean = getattr(args, "json", None) is True  # the --json flag, not bench's --json PATH
    try:
        with native_stdout_to_stderr() if clean else contextlib.nullcontext():
            code: int = command(args.command)(args)
    except UsageError as exc:
        return _refuse(args.command, str(exc))
    except RecoveryExhausted as exc:  # every rung of the model failed its canary
        print(f"mnn-guard {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_DEGRADED
    except (GuardError, ProbeError) as exc:
        return _refuse(args.command, f"{type(exc).__name__}: {exc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
