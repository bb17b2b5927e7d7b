"""Dead letters: bad input kept with where it came from and a reason a person can act on."""

from __future__ import annotations

import base64
import time

from schemas import DeadLetter, encode


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
