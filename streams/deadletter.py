"""Dead letters: bad input kept with where it came from and a reason a person can act on."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from schemas import DeadLetter, encode
from streams.settings import Settings

log = logging.getLogger(__name__)
VALUE_LIMIT = 256 * 1024  # larger originals are cut in the DLQ record (the producer's max is ~1 MB)

# Reason kinds of dead letters: the outcomes agent's reason keys (``reason_key`` in
# safeswap/core/outcomes.py, the prefix of the reason it sends, also kept per partition in
# ``processor.reasons``), plus the kinds other agents' reasons start with. A fixed set:
# free-text reasons must not become label values.
DLQ_REASON_KINDS: frozenset[str] = frozenset(
    {
        "invalid",
        "too_large",
        "future_timestamp",
        "late_event",
        "feedback_unjoined",
        "internal_error",
    }
)


def reason_kind(reason: str) -> str:
    """The label value for a dead letter's reason: its kind, or ``other``."""
    head = reason.split(":", 1)[0].strip()
    if head in DLQ_REASON_KINDS:
        return head
    if head.startswith(("invalid ", "undecodable ")):  # "invalid RolloutPlan: ...", "undecodable TraceEvent: ..."
        return "invalid"
    if head == "internal error":
        return "internal_error"
    return "other"


def dead_letter(
    *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str, agent: str
) -> bytes:
    """The DLQ record for one input message, as JSON bytes (original bytes in base64)."""
    record = DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        reason=reason,
        agent=agent,
        value_b64=base64.b64encode(value or b"").decode(),
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        ts=int(time.time() * 1000),
    )
    return encode(record)


class DeadLetters:
    """The one way an agent sends bad input to the dead-letter topic: the original bytes
    (cut to ``VALUE_LIMIT``, the reason says so), where they came from, the agent and a
    reason a person can act on; each one logged and counted."""

    def __init__(self, app: Any, settings: Settings, agent: str) -> None:
        from streams.app import raw_topic  # the Faust runtime: only agents send dead letters

        self.topic = raw_topic(app, settings, "dlq")
        self.agent = agent
        self.count = 0

    async def send(self, message: Any, reason: str) -> None:
        """Dead-letter a Faust message or an aiokafka record (both say topic, partition,
        offset, key and value)."""
        await self.send_record(message.topic, message.partition, message.offset, message.key, message.value, reason)

    async def send_record(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
    ) -> None:
        value = value or b""
        if len(value) > VALUE_LIMIT:
            reason += f" (original of {len(value):,} bytes cut to its first {VALUE_LIMIT:,} in this record)"
            value = value[:VALUE_LIMIT]
        self.count += 1
        log.warning("%s: dead letter from %s[%s]@%s: %s", self.agent, topic, partition, offset, reason[:300])
        record = dead_letter(
            topic=topic, partition=partition, offset=offset, key=key, value=value, reason=reason, agent=self.agent
        )
        await self.topic.send(key=key, value=record)
