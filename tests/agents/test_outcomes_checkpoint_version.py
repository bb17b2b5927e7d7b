"""A checkpoint of another state version, or one that does not decode, is not loaded: the
agent rebuilds the partition and says why."""

import logging
import pickle
import zlib

import msgspec

from agents.outcomes import restore_processor
from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor
from streams.checkpoint import encode_state
from tests.support.events import NOW, simulated_events


def _processor() -> OutcomeProcessor:
    processor = OutcomeProcessor(3)
    for event in simulated_events(seed=5, users=20):
        processor.apply(event, NOW)
    return processor


def test_a_checkpoint_of_this_version_is_restored_with_the_running_config():
    processor = _processor()
    config = OutcomeConfig(lateness_ms=7_000)
    restored = restore_processor(encode_state(processor.to_state()), config)
    assert restored is not None and restored.counts == processor.counts and restored.partition == 3
    assert restored.config is config and restored.collect_outcomes
    assert restored.marks.lateness_ms == 7_000  # the watermarks follow the running config too


def test_a_checkpoint_of_another_state_version_is_refused_and_logged(caplog):
    state = _processor().to_state()
    for version in (OutcomeProcessor.STATE_VERSION - 1, OutcomeProcessor.STATE_VERSION + 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agents.outcomes"):
            payload = encode_state(msgspec.structs.replace(state, version=version))
            assert restore_processor(payload, OutcomeConfig()) is None
        assert f"state version {version}, this safeswap reads version {OutcomeProcessor.STATE_VERSION}" in caplog.text


def test_an_older_version_of_another_shape_is_refused_by_its_version_not_its_shape(caplog):
    older = {"version": 4, "users": "shaped otherwise"}  # the version field alone is read first
    with caplog.at_level(logging.WARNING, logger="agents.outcomes"):
        assert restore_processor(zlib.compress(msgspec.msgpack.encode(older)), OutcomeConfig()) is None
    assert "state version 4" in caplog.text


def test_a_pickle_checkpoint_from_before_version_5_is_refused_and_logged(caplog):
    payload = zlib.compress(pickle.dumps(_processor(), protocol=pickle.HIGHEST_PROTOCOL), 1)  # the old format
    with caplog.at_level(logging.WARNING, logger="agents.outcomes"):
        assert restore_processor(payload, OutcomeConfig()) is None
    assert "checkpoint not loaded" in caplog.text and "not a state payload" in caplog.text


def test_a_payload_that_is_not_zlib_or_whose_references_do_not_resolve_is_refused(caplog):
    state = _processor().to_state()
    user = next(u for u in state.users if u.responses)
    user.responses[0].cell = ["no-such-rollout", "control", 0]
    with caplog.at_level(logging.WARNING, logger="agents.outcomes"):
        assert restore_processor(b"not zlib at all", OutcomeConfig()) is None
        assert restore_processor(encode_state(state), OutcomeConfig()) is None
    assert "not a state payload" in caplog.text and "no-such-rollout" in caplog.text
