"""Checks before any work: what a command's arguments name, each refused as a UsageError.

A model file, load options, a probe (and whether it was recorded for the model), an output path
and a --diagnose folder are checked here, before a command starts anything that takes time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.tools.arguments import HASH_HELP
from guard.tools.errors import UsageError

if TYPE_CHECKING:
    import argparse

    from guard.diagnosis import DiagnosisListener
    from guard.mnn import MNNFactory, MNNSessionFactory
    from probes import Probe

__all__ = [
    "checked_model",
    "diagnosis_folder",
    "diagnosis_listener",
    "load_options",
    "load_probe",
    "model_factory",
    "model_file",
    "overrides",
    "writable",
]


def load_options(flag: str, pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Load options checked by the code `guard.mnn_factory` uses; a name left over is refused."""
    from guard.errors import ConfigError
    from guard.mnn import check_load_options

    options = dict(pairs)
    try:
        loaded = check_load_options(options)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    for key, value in loaded.items():
        if isinstance(value, str):  # names were turned into MNN enums: this key takes none
            raise UsageError(f"{flag} {key}={value!r}: expected true, false or an integer")
    return options


def model_file(path: str) -> str:
    """Refuse a model path that is not a non-empty file."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"model {path!r} does not exist or is not a file")
    if file.stat().st_size == 0:
        raise UsageError(f"model {path!r} is empty; expected an .mnn file")
    return path


def model_factory(
    path: str, inputs: Sequence[str], outputs: Sequence[str], threads: int, api: str = "module"
) -> MNNFactory | MNNSessionFactory:
    """A factory for the model (`api`: MNN's Module or Session API), once its names are
    checked and MNN has loaded it.

    A name the model lacks (ConfigError) or a file MNN refuses (FactoryError) is a user error.
    """
    from guard.mnn import mnn_factory, mnn_session_factory

    factory: MNNFactory | MNNSessionFactory
    if api == "session":
        factory = mnn_session_factory(model_file(path), {"numThread": threads}, inputs, outputs)
    else:
        factory = mnn_factory(model_file(path), inputs, outputs, threads=threads)
    factory()
    return factory


def overrides(flag: str, pairs: Sequence[tuple[str, Any]], api: str) -> dict[str, Any]:
    """--override options for `api`: load options (Module API) or session config keys
    (Session API, where dynamic=true or api=module means the Module API on the same file)."""
    if api != "session":
        return load_options(flag, pairs)
    from guard.errors import ConfigError
    from guard.mnn import session_config, split_api

    options = dict(pairs)
    try:
        chosen, rest = split_api(options)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if chosen == "module":
        return {"api": "module", **load_options(flag, list(rest.items()))}
    try:
        session_config(rest)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return options


def load_probe(path: str, model: str | None, *, ignorable: bool = False) -> Probe:
    """Load a probe folder, refused if recorded for other model bytes than `model`'s (every way
    it can be unreadable or stale is a ProbeError: a user error).

    `ignorable`: the command takes --ignore-model-hash, and a stale probe's error says so.
    """
    import probes
    from probes.store import check_model

    probe = probes.load(path)
    try:
        check_model(probe, model)
    except probes.ProbeError as exc:
        if not ignorable:
            raise
        raise probes.ProbeError(f"{exc}, or pass --ignore-model-hash to {HASH_HELP}") from exc
    return probe


def writable(flag: str, path: str, *, folder: bool) -> Path:
    """Refuse an output path that cannot be written, before any work starts."""
    target = Path(path).absolute()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path!r} is an existing file; expected a folder for the probe")
    if not folder and target.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; expected a file to write")
    if not folder and not target.parent.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(target.parent)!r} does not exist")
    place = target if target.is_dir() else target.parent
    existing = next(p for p in [place, *place.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path!r} cannot be written: no write access in {str(existing)!r} "
            f"({exc.strerror})"
        ) from None
    return target


def diagnosis_listener(
    folder: str | None, probe: Probe, factory: MNNFactory | MNNSessionFactory
) -> DiagnosisListener | None:
    """The bundle writer for --diagnose DIR (None with --no-diagnose); a bad folder is refused."""
    if folder is None:
        return None
    from guard.diagnosis import DiagnosisListener
    from guard.errors import ConfigError

    try:
        return DiagnosisListener(folder, probe, factory=factory)
    except ConfigError as exc:
        raise UsageError(f"--diagnose: {exc}") from None


def diagnosis_folder(folder: str) -> None:
    """Refuse a --diagnose folder that cannot be created or written, before any work starts."""
    from guard.diagnosis import writer_for
    from guard.errors import ConfigError

    try:
        writer_for(folder)
    except ConfigError as exc:
        raise UsageError(f"--diagnose: {exc}") from None


def checked_model(
    args: argparse.Namespace,
) -> tuple[Probe, MNNFactory | MNNSessionFactory, DiagnosisListener | None, int]:
    """The probe, the model's factory checked against it, and the --diagnose bundle writer
    with its count so far: what `check` and `doctor` start from."""
    model = None if args.ignore_model_hash else model_file(args.model)
    probe = load_probe(args.probe, model, ignorable=True)
    names = probe.input_names, probe.output_names
    factory = model_factory(args.model, *names, args.threads, args.api)

    from guard.wrapping import check_probe

    check_probe(factory, probe, model_hash=not args.ignore_model_hash)
    listener = diagnosis_listener(args.diagnose, probe, factory)
    return probe, factory, listener, listener.writer.total if listener is not None else 0
