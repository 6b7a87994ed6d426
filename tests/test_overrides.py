"""The one vocabulary of rung overrides (`guard.mnn.options`): the same keys for the Module
API and the Session API, MNN's own spellings as aliases, which API a Session-API factory's
overrides ask for, and the values MNN would quietly not honour."""

from __future__ import annotations

from typing import Any

import pytest
from test_session_api import make_demo_session as make_session

import guard
from guard import mnn
from guard.tools import demo

F = mnn.F


def sessions(**config: Any) -> mnn.MNNSessionFactory:
    """A one-thread Session-API factory of the demo vocoder."""
    return guard.mnn_session_factory(demo.DEMO_MODEL, {"numThread": 1, **config})


# ---------------------------------------------------------------- one vocabulary, two APIs


@pytest.mark.parametrize(
    ("options", "module", "session"),
    [
        ({"precision": "low"}, {"precision_mode": F.PrecisionMode.Low}, {"precision": 2}),
        ({"precision": "LOW_BF16"}, {"precision_mode": F.PrecisionMode.Low_BF16}, {"precision": 3}),
        ({"memory": "low"}, {"memory_mode": F.MemoryMode.Low}, {"memory": 2}),
        ({"power": "high"}, {"power_mode": F.PowerMode.High}, {"power": 1}),
        ({"precision": 1}, {"precision_mode": F.PrecisionMode.High}, {"precision": 1}),
        ({"backend": "cpu"}, {"backend": F.Backend.CPU}, {"backend": "CPU"}),
    ],
    ids=["precision", "low_bf16", "memory", "power", "a number", "backend"],
)
def test_one_key_means_one_thing_in_both_apis(
    options: dict[str, Any], module: dict[str, Any], session: dict[str, Any]
) -> None:
    """A key becomes MNN's Module API keyword and its createSession entry for the same value."""
    assert mnn.check_load_options(options) == module
    assert mnn.session_config(options) == session


@pytest.mark.parametrize(
    ("alias", "key"),
    [("precision_mode", "precision"), ("memory_mode", "memory"), ("power_mode", "power")],
)
def test_mnn_module_spellings_are_aliases(alias: str, key: str) -> None:
    """MNN's Module API spellings mean the vocabulary's keys, in both APIs."""
    assert mnn.check_load_options({alias: "low"}) == mnn.check_load_options({key: "low"})
    assert mnn.session_config({alias: "low"}) == mnn.session_config({key: "low"})


def test_threads_and_num_thread_are_one_option() -> None:
    """`threads` and createSession's `numThread` set the same count; both at once is refused."""
    assert mnn.session_config({"threads": 2}) == mnn.session_config({"numThread": 2})
    assert mnn.check_load_options({"numThread": 1}) == mnn.check_load_options({"threads": 1})
    with pytest.raises(guard.ConfigError, match=r"numThread and threads are one option"):
        mnn.session_config({"numThread": 2, "threads": 2})


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"saveTensors": ["hidden"]}, "saveTensors is a Session API option"),
        ({"api": "session"}, "guard.mnn_session_factory builds sessions"),
        ({"backend": "AUTO"}, "Session API backend only"),
        ({"dynamic": "yes"}, "dynamic='yes': expected true, false or an integer"),
        ({"precisoin": "low"}, r"unknown MNN load option\(s\) \['precisoin'\]"),
    ],
    ids=["saveTensors", "api=session", "AUTO", "dynamic=yes", "typo"],
)
def test_the_module_api_refuses_what_it_cannot_do(options: dict[str, Any], match: str) -> None:
    """Options the Module API has no use for are ConfigErrors when the factory is built."""
    with pytest.raises(guard.ConfigError, match=match):
        guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], **options)


def test_api_module_is_accepted_by_a_module_factory(demo_factory: mnn.MNNFactory) -> None:
    """`api="module"`, the Session ladder's fallback key, loads as usual on a Module factory."""
    assert callable(getattr(demo_factory(api="module", dynamic=True), "forward", None))


# ---------------------------------------------------------------- which API a rung asks for


def test_precision_mode_on_a_session_factory_stays_a_session() -> None:
    """MNN's Module API spelling of precision sets the session's precision: no quiet move to
    the Module API."""
    assert isinstance(sessions()(precision_mode="low"), mnn.SessionModule)


def test_dynamic_true_on_a_session_factory_is_the_module_api() -> None:
    """dynamic=True (SESSION_LADDER's fallback rung) loads the file through the Module API;
    dynamic=False is a session (a session is a static load)."""
    assert callable(getattr(sessions()(dynamic=True), "forward", None))
    assert isinstance(sessions()(dynamic=False), mnn.SessionModule)


@pytest.mark.hostile
@pytest.mark.parametrize(
    "overrides",
    [{"shape_mutable": True}, {"rearrange": True}, {"runtime_manager": None}],
    ids=["shape_mutable", "rearrange", "runtime_manager"],
)
def test_other_module_only_keys_need_api_module(overrides: dict[str, Any]) -> None:
    """Any other Module-API-only key on a session factory is a ConfigError saying to add
    api="module"; with it, the same key loads through the Module API."""
    if "runtime_manager" in overrides:
        overrides = {"runtime_manager": mnn.runtime_manager(1)}
    factory = sessions()
    with pytest.raises(guard.ConfigError, match=r"add api='module'"):
        factory(**overrides)
    assert callable(getattr(factory(api="module", **overrides), "forward", None))


def test_a_users_session_factory_gets_the_vocabulary_in_mnns_spelling() -> None:
    """Your own factory gets `threads` as numThread, mode names as MNN's numbers, and keys of
    its own as given."""
    seen: list[dict[str, Any]] = []

    def make(**config: Any) -> tuple[Any, Any]:
        seen.append(config)
        own = {k: v for k, v in config.items() if k != "label"}
        return make_session(**own)

    factory = guard.session_factory(make, path=demo.DEMO_MODEL)
    assert isinstance(factory(threads=1, precision="low", label="x"), mnn.SessionModule)
    assert seen == [{"label": "x", "numThread": 1, "precision": 2}]


def test_the_session_ladder_is_unchanged() -> None:
    """guard.SESSION_LADDER still ends with the Module API's dynamic rung."""
    assert [r.name for r in guard.SESSION_LADDER] == ["session", "dynamic"]
    assert dict(guard.SESSION_LADDER[-1].overrides) == {"api": "module", "dynamic": True}
    assert guard.session_ladder({"precision_mode": "low"})[0].name == "session:precision_mode=low"


# ---------------------------------------------------------------- what MNN would not honour


@pytest.mark.hostile
@pytest.mark.parametrize(
    "build",
    [
        lambda: guard.mnn_session_factory(demo.DEMO_MODEL, {"numThread": 10**9}),
        lambda: guard.mnn_session_factory(demo.DEMO_MODEL, {"threads": 33}),
        lambda: guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], threads=33),
        lambda: sessions()(threads=10**9),
        lambda: guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"])(numThread=64),
    ],
    ids=["numThread", "session threads", "module threads", "session rung", "module rung"],
)
def test_thread_counts_above_what_mnn_runs_are_refused(build: Any) -> None:
    """MNN runs at most 32 threads and quietly caps a larger count: a ConfigError names 32."""
    with pytest.raises(guard.ConfigError, match=r"at most 32 threads"):
        build()


def test_thirty_two_threads_are_accepted() -> None:
    """The limit itself is a valid thread count for both APIs' factories."""
    assert guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], threads=mnn.MAX_THREADS)
    assert guard.mnn_session_factory(demo.DEMO_MODEL, {"numThread": mnn.MAX_THREADS})


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("build", "overrides"),
    [
        (lambda: sessions(backend="CUDA"), {}),
        (sessions, {"backend": "CUDA"}),
        (lambda: guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], backend="CUDA"), {}),
        (lambda: guard.session_factory(make_session, path=demo.DEMO_MODEL), {"backend": "CUDA"}),
    ],
    ids=["session config", "session rung", "module", "your session factory"],
)
def test_a_backend_mnn_falls_back_from_is_refused(build: Any, overrides: dict[str, Any]) -> None:
    """MNN only prints that it has no CUDA backend and runs on the CPU: a ConfigError."""
    with pytest.raises(guard.ConfigError, match=r"backend='CUDA'.*no such backend"):
        build()(**overrides)


def test_guarding_a_missing_backend_falls_back_down_the_ladder(demo_probe: Any) -> None:
    """A session rung on a backend MNN lacks fails loudly; the Module API's dynamic rung serves."""
    policy = guard.Policy(ladder=guard.SESSION_LADDER, background=False, promote_after=None)
    factory = sessions(backend="CUDA")
    with guard.wrap(factory, demo_probe, policy=policy, metrics=False) as session:
        status = session.status
    assert status.mode == "dynamic"
    errors = [a.error for a in status.history if a.rung.name == "session"]
    assert errors and all(isinstance(e, guard.ConfigError) for e in errors)
