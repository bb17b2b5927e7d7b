"""Wire contracts: events, plans, decisions. No Faust or Kafka imports here."""

from schemas.events import (
    DeadLetter,
    Decision,
    FeedbackEvent,
    GuardrailEvidence,
    GuardrailSpec,
    InvalidEvent,
    RolloutPlan,
    StatsSnapshot,
    TraceEvent,
    convert,
    decode,
    encode,
    json_schemas,
)

__all__ = [
    "DeadLetter",
    "Decision",
    "FeedbackEvent",
    "GuardrailEvidence",
    "GuardrailSpec",
    "InvalidEvent",
    "RolloutPlan",
    "StatsSnapshot",
    "TraceEvent",
    "convert",
    "decode",
    "encode",
    "json_schemas",
]
