"""Deterministic user bucketing: the same user gets the same variant everywhere.

    bucket = int.from_bytes(SHA-256(salt + ":" + user_id)[:8], "big") % 10_000
    candidate  iff  bucket < round(percent * 100)

Any language can reproduce it (SHA-256, first 8 bytes as a big-endian unsigned
64-bit integer, modulo 10,000). Never Python's ``hash()``: it changes per
process. Buckets are fixed per (salt, user), so raising the percentage only adds
users to the candidate: the ramp is monotone and sticky.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def bucket(salt: str, user_id: str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_candidate(salt: str, user_id: str, percent: float) -> bool:
    """True when this user sees the candidate at ``percent`` (0-100, steps of 0.01)."""
    return bucket(salt, user_id) < round(percent * 100)


def assign(salt: str, user_id: str, percent: float) -> str:
    return "candidate" if in_candidate(salt, user_id, percent) else "control"
