"""Dead letters: bad input kept with where it came from and a reason a person can act on."""

from __future__ import annotations

import base64
import time

from schemas import DeadLetter, encode

# Reason kinds of dead letters: the outcomes agent's reason keys (``reason_key`` in
# safeswap/outcomes.py, the prefix of the reason it sends, also kept per partition in
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


def original_value(record: DeadLetter) -> bytes:
    return base64.b64decode(record.value_b64)
