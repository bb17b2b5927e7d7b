"""The OpenFeature provider, exercised through the real OpenFeature API."""

from __future__ import annotations

import asyncio
import threading

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from safeswap.core.assignment import assign
from safeswap.flags import FlagClient
from safeswap.openfeature import SafeswapProvider
from streams.settings import Settings
from tests.support.flags import USERS, raw
from tests.support.kafka import produce

CONTROL = {"model": "claude-sonnet-4", "prompt_version": "v7"}
CANDIDATE = {"model": "claude-sonnet-4-5", "prompt_version": "v8"}


@pytest.fixture
def openfeature_api():
    yield api
    api.clear_providers()


def ctx(user_id: str | None) -> EvaluationContext:
    return EvaluationContext(targeting_key=user_id)


def test_resolves_rollout_id_to_variant_with_reason_and_metadata(openfeature_api):
    flags = FlagClient(settings=Settings(broker="unused:1"))
    flags.apply(raw(3, "promote", 30, control=CONTROL, candidate=CANDIDATE))
    openfeature_api.set_provider_and_wait(SafeswapProvider(flags))
    client = openfeature_api.get_client()
    cand = next(u for u in USERS if assign("r", u, 30) == "candidate")
    ctrl = next(u for u in USERS if assign("r", u, 30) == "control")

    details = client.get_string_details("r", "control", ctx(cand))
    assert (details.value, details.variant, details.reason) == ("candidate", "candidate", Reason.SPLIT)
    assert details.error_code is None
    meta = details.flag_metadata
    assert (meta["model"], meta["prompt_version"]) == ("claude-sonnet-4-5", "v8")
    assert (meta["stage"], meta["percent"], meta["seq"], meta["action"]) == ("ramp", 30.0, 3, "promote")

    details = client.get_string_details("r", "control", ctx(ctrl))
    assert (details.value, details.reason, details.flag_metadata["model"]) == (
        "control",
        Reason.SPLIT,
        "claude-sonnet-4",
    )
    # Every user's OpenFeature answer is the FlagClient's.
    assert all(client.get_string_value("r", "control", ctx(u)) == flags.variant("r", u) for u in USERS[:500])
    assert client.get_boolean_value("r", False, ctx(cand)) is True
    assert client.get_object_value("r", {}, ctx(cand)) == {**CANDIDATE, "variant": "candidate"}


def test_unknown_rollout_missing_user_rollback_and_type_mismatch(openfeature_api):
    flags = FlagClient(settings=Settings(broker="unused:1"))
    openfeature_api.set_provider_and_wait(SafeswapProvider(flags))
    client = openfeature_api.get_client()

    unknown = client.get_string_details("nope", "control", ctx("u1"))
    assert (unknown.value, unknown.reason, unknown.error_code) == ("control", Reason.DEFAULT, None)

    flags.apply(raw(1, "promote", 50))
    missing = client.get_string_details("r", "control", ctx(None))
    assert (missing.value, missing.reason, missing.error_code) == (
        "control",
        Reason.ERROR,
        ErrorCode.TARGETING_KEY_MISSING,
    )

    flags.apply(raw(2, "rollback", 0, control=CONTROL, candidate=CANDIDATE))
    after = [client.get_string_details("r", "control", ctx(u)) for u in USERS[:300]]
    assert {d.value for d in after} == {"control"} and {d.reason for d in after} == {Reason.STATIC}
    assert after[0].flag_metadata["stage"] == "rolled_back" and after[0].flag_metadata["model"] == "claude-sonnet-4"

    flags.apply(raw(3, "complete", 100))
    assert client.get_string_details("r", "control", ctx("u1")).value == "candidate"

    wrong = client.get_integer_details("r", 7, ctx("u1"))
    assert (wrong.value, wrong.error_code) == (7, ErrorCode.TYPE_MISMATCH)


@pytest.mark.parametrize("policy,expected", [("hold", "candidate"), ("control", "control")])
def test_stale_state_is_reported_with_reason_stale(openfeature_api, policy, expected):
    now = [100.0]
    flags = FlagClient(
        settings=Settings(broker="unused:1"), stale_policy=policy, max_staleness_s=10, clock=lambda: now[0]
    )
    flags.apply(raw(1, "complete", 100))
    flags.mark_fresh()
    openfeature_api.set_provider_and_wait(SafeswapProvider(flags))
    client = openfeature_api.get_client()
    assert client.get_string_details("r", "control", ctx("u1")).reason == Reason.STATIC
    now[0] += 11
    details = client.get_string_details("r", "control", ctx("u1"))
    assert (details.value, details.reason) == (expected, Reason.STALE)


def test_provider_owning_a_client_on_the_broker_announces_changes(openfeature_api, settings):
    topic = settings.topic("decisions")
    asyncio.run(produce(settings.broker, topic, [(b"r", raw(1, "promote", 50, candidate=CANDIDATE))]))
    provider = SafeswapProvider(settings=settings)
    openfeature_api.set_provider_and_wait(provider)  # starts its FlagClient on a background thread
    client = openfeature_api.get_client()
    changed = threading.Event()
    flags_changed: list[list[str]] = []

    def on_changed(details):
        flags_changed.append(details.flags_changed)
        changed.set()

    client.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, on_changed)
    try:
        cand = next(u for u in USERS if assign("r", u, 50) == "candidate")
        assert client.get_string_value("r", "control", ctx(cand)) == "candidate"
        asyncio.run(produce(settings.broker, topic, [(b"r", raw(2, "rollback", 0))]))
        assert changed.wait(10)
        assert client.get_string_details("r", "control", ctx(cand)).value == "control"
        assert flags_changed[-1] == ["r"]
    finally:
        client.remove_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, on_changed)
        openfeature_api.clear_providers()  # shuts the provider and its client down
    assert provider.flags._thread is None
