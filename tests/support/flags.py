"""Decisions as the controller publishes them, for the flag client tests."""

from __future__ import annotations

from schemas import Decision, encode

STAGE_OF = {
    "start": "canary",
    "promote": "ramp",
    "hold": "ramp",
    "pause": "paused",
    "resume": "ramp",
    "rollback": "rolled_back",
    "complete": "complete",
}


def decision(
    seq: int,
    action: str = "start",
    percent: float = 5.0,
    *,
    rollout_id: str = "r",
    salt: str = "r",
    stage: str | None = None,
    shadow_percent: float = 0.0,
    **extra,
) -> Decision:
    return Decision(
        rollout_id=rollout_id,
        seq=seq,
        ts=1_793_611_000_000 + seq,
        action=action,
        stage=stage or STAGE_OF[action],
        percent=percent,
        salt=salt,
        reason="test",
        shadow_percent=shadow_percent,
        **extra,
    )


def raw(seq: int, action: str = "start", percent: float = 5.0, **kwargs) -> bytes:
    return encode(decision(seq, action, percent, **kwargs))


USERS = [f"user-{i}" for i in range(20_000)]
