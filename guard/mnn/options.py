"""The one vocabulary of rung overrides, for MNN's Module API and its Session API alike.

`api` ("module" or "session"), `dynamic`, `threads`, `precision` (normal, high, low,
low_bf16), `memory` and `power` (normal, high, low), `backend`, `shape_mutable`, `rearrange`.
MNN's own spellings are aliases: `precision_mode`, `memory_mode`, `power_mode` and
`runtime_manager` (a runtime manager in place of a thread count) from the Module API,
`numThread` from `createSession`; `saveTensors` is the Session API's own. MNN silently ignores
keys and values it does not know; here each is a ConfigError.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from guard.errors import ConfigError
from guard.mnn.native import F, check_threads, nn, runtime_manager

__all__ = [
    "ALIASES",
    "APIS",
    "KEYS",
    "MODES",
    "MODULE_BACKENDS",
    "MODULE_ONLY",
    "SESSION_BACKENDS",
    "SESSION_KEYS",
    "canonical",
    "check_load_options",
    "check_module",
    "merge",
    "module_kwargs",
    "refuse_fallback",
    "session_config",
    "session_kwargs",
    "split_api",
]

APIS = ("module", "session")
KEYS = (
    "api",
    "dynamic",
    "threads",
    "precision",
    "memory",
    "power",
    "backend",
    "shape_mutable",
    "rearrange",
    "saveTensors",
)
ALIASES = {  # MNN's own spellings -> the vocabulary's
    "precision_mode": "precision",
    "memory_mode": "memory",
    "power_mode": "power",
    "runtime_manager": "threads",
    "numThread": "threads",
}
MODULE_ONLY = ("dynamic", "shape_mutable", "rearrange", "runtime_manager")
SESSION_KEYS = frozenset({"backend", "numThread", "precision", "memory", "power", "saveTensors"})
"""The `createSession` config keys the guard passes on (MNN silently ignores any other key)."""
MODES = {  # names in the order of MNN's numbers (BackendConfig's enums)
    "precision": ("normal", "high", "low", "low_bf16"),
    "memory": ("normal", "high", "low"),
    "power": ("normal", "high", "low"),
}
_MODULE_MODES = {  # each mode name's member of the Module API's enum
    key: {n.lower(): getattr(enum, n) for n in dir(enum) if n[0].isupper()}
    for key, enum in (
        ("precision", F.PrecisionMode),
        ("memory", F.MemoryMode),
        ("power", F.PowerMode),
    )
}
SESSION_BACKENDS = ("CPU", "OPENCL", "OPENGL", "VULKAN", "METAL", "TRT", "CUDA", "HIAI", "AUTO")
MODULE_BACKENDS = tuple(b for b in SESSION_BACKENDS if hasattr(F.Backend, b))
_FELL_BACK = re.compile(r"Can't Find type=\d+ backend, use \d+ instead")


def _api(key: str, value: Any) -> str:
    if value not in APIS:
        raise ConfigError(f"{key}={value!r}; expected one of {list(APIS)}")
    return str(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, int):  # MNN takes an int as a bool, and nothing else
        raise ConfigError(f"{key}={value!r}: expected true, false or an integer")
    return bool(value)


def _threads(key: str, value: Any) -> Any:
    if isinstance(value, nn.RuntimeManager):
        return value
    if key == "runtime_manager":
        raise ConfigError(
            f"runtime_manager={value!r}; expected one made by "
            "MNN.nn.create_runtime_manager, or threads=N"
        )
    return check_threads(value, key)


def _mode(key: str, value: Any) -> str:
    names = MODES[ALIASES.get(key, key)]
    if isinstance(value, str) and value.lower() in names:
        return value.lower()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    raise ConfigError(f"{key}={value!r}; expected one of {list(names)} (or its number)")


def _backend(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in SESSION_BACKENDS:
        raise ConfigError(f"{key}={value!r}; expected one of {list(SESSION_BACKENDS)}")
    return value.upper()


def _tensor_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(n, str) for n in value):
        raise ConfigError(f"{key} must be a list of tensor names, got {value!r}")
    return tuple(value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "api": _api,
    "dynamic": _flag,
    "threads": _threads,
    "precision": _mode,
    "memory": _mode,
    "power": _mode,
    "backend": _backend,
    "shape_mutable": _flag,
    "rearrange": _flag,
    "saveTensors": _tensor_list,
}


def canonical(options: Mapping[str, Any], what: str = "option") -> dict[str, Any]:
    """Each option under its one name (aliases resolved), its value checked: mode names
    lower-cased (MNN's numbers turned into names), backends upper-cased, thread counts in range.

    `what` names the options in the error for a key nobody knows ("session option").
    """
    unknown = sorted(k for k in options if ALIASES.get(k, k) not in _CHECKS)
    if unknown:
        known = sorted({*KEYS, *ALIASES})
        raise ConfigError(
            f"unknown {what}(s) {unknown}; expected some of {known} (MNN would silently "
            "ignore them)"
        )
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ConfigError(f"{spelled[name]} and {key} are one option ({name}); give one")
        out[name] = _CHECKS[name](key, value)
        spelled[name] = key
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical options `base` updated by canonical `overrides`."""
    return {**base, **overrides}


def _module_only(checked: Mapping[str, Any]) -> list[str]:
    """The options in `checked` that only the Module API takes (dynamic=False is no such one:
    a session is a static load)."""
    found = [k for k in ("shape_mutable", "rearrange") if k in checked]
    if checked.get("dynamic"):
        found.insert(0, "dynamic")
    if isinstance(checked.get("threads"), nn.RuntimeManager):
        found.append("runtime_manager")
    return found


def check_module(checked: Mapping[str, Any]) -> None:
    """Refuse canonical options the Module API cannot take (before anything is created)."""
    if checked.get("api", "module") != "module":
        raise ConfigError(
            "api='session': this factory loads through the Module API (guard.mnn_factory); "
            "guard.mnn_session_factory builds sessions"
        )
    if "saveTensors" in checked:
        raise ConfigError(
            "saveTensors is a Session API option; the Module API takes any tensor of the "
            "model as an output by name"
        )
    backend = checked.get("backend")
    if backend is not None and backend not in MODULE_BACKENDS:
        raise ConfigError(
            f"backend={backend!r} is a Session API backend only; the Module API takes one of "
            f"{list(MODULE_BACKENDS)}"
        )


def module_kwargs(checked: Mapping[str, Any]) -> dict[str, Any]:
    """`load_module_from_file` keywords for canonical options (threads: a runtime manager)."""
    check_module(checked)
    out: dict[str, Any] = {}
    for name, value in checked.items():
        if name == "threads":
            out["runtime_manager"] = runtime_manager(value) if isinstance(value, int) else value
        elif name in MODES:
            out[f"{name}_mode"] = _MODULE_MODES[name][value]
        elif name == "backend":
            out["backend"] = getattr(F.Backend, value)
        elif name != "api":
            out[name] = value
    return out


def check_load_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check Module API load options; the `load_module_from_file` keywords they make (mode
    and backend names become MNN's enums, `threads=n` a runtime manager)."""
    return module_kwargs(canonical(options, "MNN load option"))


def session_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a session config (the vocabulary, or `createSession`'s own keys); the dict
    `createSession` takes: `numThread`, mode numbers, backend names, `saveTensors`.

    MNN takes unknown keys, mode names it does not know (it reads only numbers, and "low"
    for precision) and `numThread=0` without a word; here each is a ConfigError.
    """
    checked = canonical(config, "session option")
    if checked.get("api", "session") != "session":
        raise ConfigError("api='module' is a rung's choice of API, not a session option")
    module = _module_only(checked)
    if module:
        raise ConfigError(
            f"{module} are Module API load options; a session takes some of "
            f"{sorted(SESSION_KEYS)}; add api='module' to load the model through the Module API"
        )
    out: dict[str, Any] = {}
    for name, value in checked.items():
        if name == "threads":
            out["numThread"] = value
        elif name in MODES:
            out[name] = MODES[name].index(value)
        elif name in ("backend", "saveTensors"):
            out[name] = value
    return out


def session_kwargs(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides for a user's own session factory: the vocabulary's keys checked and in
    `createSession`'s spelling (`threads` -> `numThread`), the factory's own keys as given."""
    ours = {k: v for k, v in overrides.items() if ALIASES.get(k, k) in _CHECKS}
    theirs = {k: v for k, v in overrides.items() if k not in ours}
    return {**theirs, **session_config(ours)}


def split_api(overrides: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Which API a Session-API factory's overrides ask for, and the other overrides.

    `api=` decides when given; without it `dynamic=True` means the Module API (the fallback
    rung of `guard.SESSION_LADDER`) and anything else a session. Any other Module-API-only
    option (`shape_mutable`, `rearrange`, `runtime_manager`) for a session is a ConfigError.
    """
    rest = dict(overrides)
    api = rest.pop("api", None)
    dynamic = _flag("dynamic", rest["dynamic"]) if "dynamic" in rest else False
    if api is not None:
        _api("api", api)
    else:
        api = "module" if dynamic else "session"
    module = [k for k in MODULE_ONLY if k in rest and (k != "dynamic" or dynamic)]
    if api == "session" and module:
        raise ConfigError(
            f"{module} are Module API load options; add api='module' to load the model through "
            f"the Module API (a session takes some of {sorted(SESSION_KEYS)})"
        )
    return api, rest


def refuse_fallback(lines: list[str], backend: str | None, path: str) -> None:
    """ConfigError when MNN said that it runs on another backend than the one asked for."""
    said = next((line for line in lines if _FELL_BACK.search(line)), None)
    if said is not None:
        raise ConfigError(
            f"backend={backend!r} for {path!r}: this MNN build has no such backend (MNN says "
            f"{said!r}) and would quietly run on the CPU; use backend='CPU' or an MNN built "
            "with that backend"
        )


def loaded_outputs(
    overrides: Mapping[str, Any], own: Sequence[str]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The overrides without `outputs`, and the outputs to load: the factory's own, or those
    `outputs` names (the guard loads a probe's sentinels, intermediate tensors, after them)."""
    rest = dict(overrides)
    outputs = rest.pop("outputs", None)
    if outputs is None:
        return rest, tuple(own)
    if isinstance(outputs, str) or not all(isinstance(n, str) and n for n in outputs):
        raise ConfigError(f"outputs must be a list of tensor names, got {outputs!r}")
    return rest, tuple(outputs)
