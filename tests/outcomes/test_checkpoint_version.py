"""A checkpoint written by another safeswap version is not loaded into this one's code."""

from agents.outcomes import restore_processor
from safeswap.outcomes import OutcomeConfig, OutcomeProcessor
from streams.checkpoint import encode_state


def test_a_checkpoint_of_this_version_is_restored_with_the_running_config():
    processor = OutcomeProcessor(3)
    processor.counts["read"] = 7
    config = OutcomeConfig()
    restored = restore_processor(encode_state(processor), config)
    assert restored is not None and restored.counts["read"] == 7
    assert restored.config is config and restored.collect_outcomes


def test_a_checkpoint_of_another_state_version_is_refused():
    old = OutcomeProcessor(3)
    del old.state_version  # as pickled before state versions existed (version 1)
    assert restore_processor(encode_state(old), OutcomeConfig()) is None
    newer = OutcomeProcessor(3)
    newer.state_version = OutcomeProcessor.STATE_VERSION + 1
    assert restore_processor(encode_state(newer), OutcomeConfig()) is None


def test_a_checkpoint_whose_classes_no_longer_load_is_refused():
    import pickle
    import zlib

    payload = zlib.compress(pickle.dumps(OutcomeProcessor(3)).replace(b"OutcomeProcessor", b"OutcomeProcessoX"), 1)
    assert restore_processor(payload, OutcomeConfig()) is None
