"""Wire contracts v1: the events apps emit and the records safeswap publishes.

Every event's ``ts`` is its event time. On the wire it is an RFC 3339 string with
an offset (``2026-11-02T09:16:40Z``); decoders also accept integer epoch
milliseconds. After decoding, ``ts`` is always integer epoch milliseconds (UTC),
so windows and joins do plain integer arithmetic.

Decoding validates: a bad event raises :class:`InvalidEvent` whose message names
the field and the reason (``Expected `float` >= 0, got -3 - at `$.latency_ms```).
Unknown fields are ignored, so emitters may send newer fields to older workers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 1

Variant = Literal["control", "candidate"]
VARIANTS: tuple[str, ...] = ("control", "candidate")
ErrorKind = Literal["none", "rate_limit", "tool_failure", "parse_error", "timeout", "refusal", "other"]
ERROR_KINDS: tuple[str, ...] = ("rate_limit", "tool_failure", "parse_error", "timeout", "refusal", "other")
FeedbackKind = Literal["thumbs_up", "thumbs_down", "edit", "retry", "abandon", "follow_up", "copy"]

NonEmpty = Annotated[str, Meta(min_length=1, max_length=512)]
# Segments: a few low-cardinality facts about the user (locale, region, tier) that
# segment guardrails test separately; keys are identifiers, values short labels
# (no "," or "=": a segment is named "key=value" in reasons and snapshots).
SegmentKey = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")]
SegmentValue = Annotated[str, Meta(pattern=r"^[^,=]{1,64}$")]
Segment = Annotated[dict[SegmentKey, SegmentValue], Meta(max_length=8)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
# RFC 3339 with an offset (naive times are refused: they are ambiguous), or epoch ms.
EventTime = Annotated[int, Meta(ge=0)] | Annotated[datetime, Meta(tz=True)]


class InvalidEvent(ValueError):
    """An event that does not decode or validate; the message says where and why."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def to_epoch_ms(ts: int | datetime) -> int:
    if isinstance(ts, datetime):
        return (ts - _EPOCH) // _ONE_MS  # exact: no float rounding
    return ts


def rfc3339(ts_ms: int) -> str:
    """Epoch milliseconds as an RFC 3339 UTC string, the wire form of ``ts``."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Event(msgspec.Struct, kw_only=True):
    event_id: NonEmpty
    ts: EventTime

    def __post_init__(self) -> None:
        self.ts = to_epoch_ms(self.ts)


class TraceEvent(_Event, kw_only=True):
    """One LLM response served to a user, tagged with what produced it."""

    rollout_id: NonEmpty
    variant: Variant
    user_id: NonEmpty
    session_id: NonEmpty
    trace_id: NonEmpty
    prompt_version: NonEmpty
    model_version: NonEmpty
    latency_ms: NonNegative
    ttft_ms: NonNegative | None = None
    input_tokens: Count
    output_tokens: Count
    cost_usd: NonNegative
    cache_hit: bool
    error: ErrorKind = "none"
    prompt_text: str | None = None
    response_text: str | None = None
    # The user's segments ({"locale": "ja", "tier": "enterprise"}): a user is counted in
    # the segment of its first trace in the rollout (docs/rollouts.md "Segment guardrails").
    segment: Segment | None = None


class FeedbackEvent(_Event, kw_only=True):
    """What the user did with a response: thumbs, an edit, a retry, leaving."""

    trace_id: NonEmpty
    user_id: NonEmpty
    session_id: NonEmpty
    rollout_id: NonEmpty
    variant: Variant
    kind: FeedbackKind
    final_text: str | None = None


class GuardrailSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A rule fixed before the start: "thumbs-down +20% vs control: roll back".

    ``max_*_increase`` guards metrics where up is bad (thumbs-down, latency);
    ``max_*_decrease`` those where down is bad (thumbs-up, follow-ups). None of
    them means tolerance 0: any harm detected breaches.
    """

    metric: NonEmpty
    max_relative_increase: Annotated[float, Meta(gt=0)] | None = None
    max_absolute_increase: Annotated[float, Meta(gt=0)] | None = None
    max_relative_decrease: Annotated[float, Meta(gt=0, lt=1)] | None = None
    max_absolute_decrease: Annotated[float, Meta(gt=0)] | None = None
    action: Literal["rollback", "pause"] = "rollback"


class VariantSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a variant is made of; the plan pins each part."""

    model: str | None = None
    prompt_version: str | None = None
    tools_version: str | None = None
    system_prompt_version: str | None = None
    retrieval_version: str | None = None
    # The index a retrieval change reads, pinned like a model (name-20261130, name@v3):
    # part of the retrieval change, not a change of its own.
    retrieval_index: str | None = None


StageName = Literal["shadow", "canary", "ramp"]
Duration = str  # "24h", "7d", "1d12h", "90m", "30s": parsed by safeswap.core.plan.parse_duration


class StageSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One step of the rollout and its watch period (event time)."""

    name: StageName
    percent: Annotated[float, Meta(ge=0, le=100)] | None = None
    shadow_percent: Annotated[float, Meta(gt=0, le=100)] | None = None
    min_duration: Duration | None = None
    min_users_per_arm: Annotated[int, Meta(ge=0)] | None = None
    # Shadow only: promote when the judge does not prefer control by more than
    # this share of judged pairs (default 0.10; safeswap.core.shadow_analysis.stage_rule).
    judge_max_control_preference: Annotated[float, Meta(ge=0, le=1)] | None = None
    # Shadow only: pairs analysed, and pairs judged, before promotion (default: the
    # plan's min_users_per_arm; min_judged_pairs 0 = no judge runs for this rollout).
    min_shadow_pairs: Annotated[int, Meta(ge=2)] | None = None
    min_judged_pairs: Annotated[int, Meta(ge=0)] | None = None


class HealthSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Checks that the data can be trusted; a failure pauses rather than rolls back."""

    srm: Literal["pause", "rollback", "ignore"] = "pause"
    srm_alpha: Annotated[float, Meta(gt=0, lt=1)] = 0.001
    crossover_max: Annotated[float, Meta(ge=0, le=1)] = 0.01
    crossover: Literal["pause", "rollback", "ignore"] = "pause"
    model_drift: Literal["pause", "rollback", "ignore"] = "pause"
    model_drift_max_share: Annotated[float, Meta(ge=0, le=1)] = 0.01
    cache_skew_alpha: Annotated[float, Meta(gt=0, lt=1)] = 0.01


class SequentialSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How the guardrails spend the false-rollback budget over the looks.

    ``design: auto`` (default) spends ``share`` of each guardrail's alpha group-sequentially
    over the plan's watch time when every serving stage below 100% states its
    ``min_duration`` (the horizon), and keeps the rest for an always-valid confidence
    sequence that also watches past it; without a horizon the confidence sequence gets all
    of it. ``group_sequential`` requires the horizon; ``confidence_sequence`` never spends.
    """

    design: Literal["auto", "group_sequential", "confidence_sequence"] = "auto"
    spending: Literal["hsd", "obf", "pocock", "power"] = "hsd"
    param: float | None = None  # hsd: gamma (default -0.5); power: rho (default 3)
    share: Annotated[float, Meta(gt=0, lt=1)] = 0.95
    analyses: Annotated[int, Meta(ge=1, le=1000)] = 50


class RolloutPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A rollout declared before it starts: stages, watch periods, guardrails, health.

    Validated by ``safeswap plan validate`` (safeswap/core/plan.py); hashed when it
    starts, and immutable from then on: a changed plan is a new rollout.
    """

    rollout_id: NonEmpty
    salt: str | None = None
    stakes: Literal["high", "low"] = "high"
    description: str | None = None
    control: VariantSpec = msgspec.field(default_factory=VariantSpec)
    candidate: VariantSpec = msgspec.field(default_factory=VariantSpec)
    stages: list[StageSpec] = []
    alpha: Annotated[float, Meta(gt=0, lt=1)] = 0.05
    # No guardrail gives a verdict before this many users per arm (the CLT needs data).
    min_users_per_arm: Annotated[int, Meta(ge=2)] = 100
    # Total users (both arms) at which the confidence sequences are tightest;
    # about 2x the planned fixed-horizon users per arm (docs/statistics.md).
    n_tune: Annotated[int, Meta(ge=10)] = 5000
    sequential: SequentialSpec = msgspec.field(default_factory=SequentialSpec)
    guardrails: list[GuardrailSpec] = []
    health: HealthSpec = msgspec.field(default_factory=HealthSpec)
    allow_unpinned: bool = False
    allow_multiple_changes: str | None = None
    skip_shadow: str | None = None
    # Segment guardrails: every guardrail is also tested in each value of these trace
    # ``segment`` keys (at most 3), for the first ``max_segment_values`` values of each
    # key, with half the plan's alpha shared among them (docs/rollouts.md).
    segments: Annotated[list[SegmentKey], Meta(max_length=3)] = []
    max_segment_values: Annotated[int, Meta(ge=1, le=16)] = 8
    # The offline eval gate's result (safeswap eval-gate --json), attached by rollout start.
    eval_gate: dict[str, Any] | None = None

    @property
    def effective_salt(self) -> str:
        return self.salt or self.rollout_id


class GuardrailEvidence(msgspec.Struct, kw_only=True):
    """What a guardrail test saw at the moment of a decision."""

    metric: str
    status: str
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    threshold: float | None
    users_control: int
    users_candidate: int
    # Why this status, in words ("0 in both arms so far ...", "need 100 per arm", the interval).
    reason: str = ""
    # Group-sequential mode: the last analysis's z and boundary, and the alpha spent so far.
    gst_z: float | None = None
    gst_bound: float | None = None
    gst_spent: float | None = None
    # A segment guardrail's segment ("locale=ja"); "" = the whole population.
    segment: str = ""


class Decision(msgspec.Struct, kw_only=True):
    """The controller's word on a rollout; the flag client serves what it says.

    Published to the compacted ``safeswap.decisions`` keyed by rollout_id, so the
    last decision per rollout is its current state.
    """

    rollout_id: str
    seq: int
    ts: int
    action: Literal["start", "hold", "promote", "pause", "resume", "rollback", "complete"]
    stage: str
    percent: float
    salt: str
    reason: str
    plan_hash: str = ""
    evidence: list[GuardrailEvidence] = []
    schema_version: int = SCHEMA_VERSION
    # Share of users (0-100) whose requests are also sent to the candidate in the
    # background while they are served control; bucketed with salt + ":shadow".
    shadow_percent: float = 0.0
    # What each variant is, for flag metadata: {"model": ..., "prompt_version": ...}.
    control: dict[str, str] = {}
    candidate: dict[str, str] = {}
    # Data-quality findings at the decision: SRM p-value, crossover share, model
    # drift, responses-per-user check, and the cache-hit skew confounder flag.
    health: dict[str, Any] = {}
    # Event times at which the served split changed (each promotion between serving
    # stages): the exposure cohorts' boundaries, which the outcomes agents follow.
    cohort_starts: list[int] = []
    # The plan's segment keys and the metrics its segment guardrails read: what the
    # outcomes agents keep per segment.
    segments: list[str] = []
    segment_metrics: list[str] = []
    # The segment guardrails at the decision (``evidence`` is the whole population's).
    segment_evidence: list[GuardrailEvidence] = []


class RolloutStatus(msgspec.Struct, kw_only=True):
    """The controller's latest look at a rollout, published to the compacted
    ``safeswap.status`` (at most about once a second per rollout) for
    ``safeswap rollout status`` and the dashboard. Informational: the flag
    client follows decisions, never status."""

    rollout_id: str
    ts: int  # event time of the look
    stage: str
    stage_index: int
    stages: list[str]  # "shadow 10%", "canary 5%", ...
    percent: float
    shadow_percent: float
    stage_started_ts: int
    stage_elapsed_s: float
    stage_min_duration_s: float
    stage_min_users: int
    users: dict[str, int]
    guardrails: list[GuardrailEvidence]
    health: dict[str, Any]
    last_decision: Decision | None
    plan_hash: str
    schema_version: int = SCHEMA_VERSION
    # Event time every partition's statistics have reached (the minimum over
    # partitions): what a closed-loop simulation waits for.
    watermark: int = 0
    # Shadow analysis: judge win/tie/loss with always-valid intervals,
    # tail/cost/latency checks and the promotion verdict (safeswap.core.shadow_analysis).
    shadow: dict[str, Any] = {}
    # Segment guardrails (the plan's ``segments``): one row per (segment value, guardrail);
    # segment values seen beyond the plan's max_segment_values are not tested.
    segment_guardrails: list[GuardrailEvidence] = []
    segments_untested: list[str] = []
    # Live judge scores of canary and ramp responses per variant, with the always-valid
    # interval of candidate - control (safeswap.core.live_scores.summarize): monitored, never a
    # decision input.
    live_judge: dict[str, Any] = {}


class Command(msgspec.Struct, kw_only=True):
    """An operator's word on a rollout (``safeswap rollout pause|resume|abort``)."""

    rollout_id: NonEmpty
    command: Literal["pause", "resume", "abort"]
    reason: str = ""
    ts: int = 0


class OutcomeRecord(msgspec.Struct, kw_only=True):
    """What happened after one response, once it is final (its session closed and
    the feedback join TTL passed). Published by the outcomes agent to
    ``safeswap.outcomes`` keyed by user_id, for the Parquet ``outcomes`` dataset.
    At least once: after a crash a record may repeat; ``event_id`` is stable
    (``outcome-<trace_id>``), so dedup on it."""

    event_id: str
    ts: int  # the response's event time
    rollout_id: str
    trace_id: str
    variant: str
    user_id: str
    session_id: str
    prompt_version: str
    model_version: str
    latency_ms: float
    cost_usd: float
    cache_hit: bool
    error: str
    thumbs_up: bool
    thumbs_down: bool
    edited: bool
    edit_distance: float | None = None
    edit_distance_words: float | None = None
    retried: bool
    follow_up: bool
    session_last: bool  # the last response of its session
    abandoned: bool  # the session was abandoned here (only ever true on a session's last response)
    schema_version: int = SCHEMA_VERSION


class DeadLetter(msgspec.Struct, kw_only=True):
    """An input that could not be used, with where it came from and why."""

    topic: str
    partition: int
    offset: int
    reason: str
    agent: str
    value_b64: str
    key_b64: str | None = None
    ts: int


EVENT_TYPES: dict[str, type[msgspec.Struct]] = {
    "trace": TraceEvent,
    "feedback": FeedbackEvent,
    "decision": Decision,
    "rollout_plan": RolloutPlan,
}

_decoders: dict[type, msgspec.json.Decoder] = {}


def decoder(event_type: type[msgspec.Struct]) -> msgspec.json.Decoder:
    if event_type not in _decoders:
        _decoders[event_type] = msgspec.json.Decoder(event_type)
    return _decoders[event_type]


def decode(event_type: type[msgspec.Struct], raw: bytes | str) -> Any:
    """Decode and validate one JSON event, or raise InvalidEvent naming the field."""
    try:
        return decoder(event_type).decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid {event_type.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"undecodable {event_type.__name__}: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad UTF-8 inside a JSON string
        raise InvalidEvent(f"undecodable {event_type.__name__}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def convert(event_type: type[msgspec.Struct], fields: dict[str, Any]) -> Any:
    """Validate a dict (for example from an app) into an event, like ``decode``."""
    try:
        return msgspec.convert(fields, event_type)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid {event_type.__name__}: {exc}") from None


_encoder = msgspec.json.Encoder()


def encode(event: msgspec.Struct) -> bytes:
    """JSON bytes for an event; ``ts`` goes out in its RFC 3339 wire form."""
    if isinstance(event, _Event):
        fields = msgspec.structs.asdict(event)
        fields["ts"] = rfc3339(event.ts)
        return _encoder.encode(fields)
    return _encoder.encode(event)


# What the decoder accepts as a ``ts`` string: RFC 3339 with seconds and an offset ("Z", "+01:00",
# "+0100"). A regex cannot know month lengths: 2026-02-30 passes it and the worker refuses it.
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])$"
)


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (draft 2020-12) per event type, for emitters written in other languages:
    as strict as the worker's decoder on ``ts`` (an offset is required, a date alone is refused)."""
    out = {}
    for name, event_type in EVENT_TYPES.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:safeswap:schema:v{SCHEMA_VERSION}:{name}",
            **msgspec.json.schema(event_type),
        }
        _pin_date_times(schema)
        out[name] = schema
    return out


def _pin_date_times(node: Any) -> None:
    """Give every ``format: date-time`` string the decoder's pattern (validators skip formats by default)."""
    if isinstance(node, dict):
        if node.get("format") == "date-time" and node.get("type") == "string":
            node["pattern"] = RFC3339_PATTERN
        for value in node.values():
            _pin_date_times(value)
    elif isinstance(node, list):
        for value in node:
            _pin_date_times(value)


class StatsSnapshot(msgspec.Struct, kw_only=True):
    """One partition's accumulated sufficient statistics for one rollout.

    Published to ``safeswap.stats`` keyed by rollout_id. A snapshot replaces the
    previous one from the same source partition (it is cumulative), so replays
    are idempotent and the decide agent simply adds the latest per partition.
    ``metrics[variant][metric]`` is a mergeable statistic's ``to_dict()``.
    """

    rollout_id: str
    partition: int
    seq: int  # increases per (rollout, source partition); older ones are ignored
    ts: int  # latest event time folded in (epoch ms)
    users: dict[str, int]
    metrics: dict[str, dict[str, dict[str, Any]]]
    schema_version: int = SCHEMA_VERSION
    # Served-model drift: model_version -> distinct traces, per variant.
    models: dict[str, dict[str, int]] = {}
    # Plain counts per variant: {"responses": n, "sessions": n}.
    counts: dict[str, dict[str, int]] = {}
    # Health. Users whose first-ever trace in this rollout was
    # in each variant: a never-seen user arriving at split p lands in the candidate
    # with probability p, so stage increments are what the SRM test checks.
    first_exposures: dict[str, int] = {}
    # Users served the candidate and later control while the rollout was live:
    # a ramp only moves users the other way, so these are assignment leaks.
    crossover_users: int = 0
    # Shadow analysis. "" = the outcomes agent; "shadow:<worker incarnation>"
    # = the judge agent's per-partition shadow statistics (safeswap.core.shadow_analysis),
    # which the controller keeps apart from the outcome snapshots, per (source, partition).
    source: str = ""
    shadow: dict[str, Any] = {}
    # Exposure cohorts: the statistics of users first exposed in each split period
    # (cohort "0" before the first of ``cohort_starts``, "i" from its (i-1)-th entry),
    # by the arm that first served them: ``cohorts[cohort][variant][metric]``; what the
    # guardrails compare, cohort by cohort. ``metrics`` holds their sums per arm.
    cohorts: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    cohort_exposures: dict[str, dict[str, int]] = {}
    cohort_starts: list[int] = []
    # Segment guardrails: ``segments["locale=ja"][cohort][variant][metric]``, the cohorts'
    # statistics of the users in each segment value, for the metrics the decision asked for.
    segments: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    # Live judge scores. ``source="live_judge:<worker incarnation>"``: the judge agent's
    # per-partition scores of live responses (safeswap.live_scores), which the controller
    # keeps apart from every other snapshot and never decides on.
    live_judge: dict[str, Any] = {}


EVENT_TYPES["stats_snapshot"] = StatsSnapshot
EVENT_TYPES["rollout_status"] = RolloutStatus
EVENT_TYPES["outcome"] = OutcomeRecord
EVENT_TYPES["command"] = Command


# --- shadow traffic and the LLM judge -----------------------------------------------


class ShadowSide(msgspec.Struct, kw_only=True):
    """What one variant answered to a shadowed request. Refusal and JSON validity
    are derived from these fields (safeswap.core.shadow_analysis), never sent."""

    response_text: str | None = None
    latency_ms: NonNegative
    cost_usd: NonNegative = 0.0
    input_tokens: Count = 0
    output_tokens: Count = 0
    error: ErrorKind = "none"
    model_version: NonEmpty
    prompt_version: NonEmpty
    # Free text about the error (exception type and message), for people.
    error_detail: str | None = None


class ShadowPair(_Event, kw_only=True):
    """One request answered by control (served to the user) and by the candidate
    (in the background, never shown). Published to ``safeswap.shadow`` keyed by user_id."""

    rollout_id: NonEmpty
    user_id: NonEmpty
    request_id: NonEmpty
    prompt_text: str
    expects_json: bool = False
    control: ShadowSide
    candidate: ShadowSide
    session_id: str | None = None


class Judgment(_Event, kw_only=True):
    """The judge's verdict on one shadow pair, both orders combined.

    ``event_id`` is the pair's event_id + ``":judge"`` (one judgment per pair, so a
    redelivered pair's judgment is recognisable). ``winner`` is "candidate",
    "control" or "tie"; the two orders' raw verdicts are kept (A = first shown).
    Published to ``safeswap.judgments`` keyed by rollout_id."""

    rollout_id: NonEmpty
    pair_event_id: NonEmpty
    user_id: str | None = None
    request_id: str | None = None
    judge_model: NonEmpty
    rubric_hash: str = ""
    winner: Literal["candidate", "control", "tie"]
    # Order 1 shows control as A; order 2 shows the candidate as A.
    verdict_control_first: Literal["A", "B", "tie"]
    verdict_candidate_first: Literal["A", "B", "tie"]
    reason_control_first: str = ""
    reason_candidate_first: str = ""
    input_tokens: Count = 0
    output_tokens: Count = 0
    cost_usd: NonNegative = 0.0
    retries: Count = 0


EVENT_TYPES["shadow_pair"] = ShadowPair
EVENT_TYPES["judgment"] = Judgment


# Scores run from LIVE_SCORE_MIN (fails the user) to LIVE_SCORE_MAX (could not be better).
LIVE_SCORE_MIN, LIVE_SCORE_MAX = 1, 10


class LiveScore(_Event, kw_only=True):
    """The judge's absolute score of one live response (canary or ramp) against the
    rollout's rubric, 1 (fails the user) to 10 (could not be better).

    ``event_id`` is the trace's event_id + ``":score"`` (one score per response, so a
    redelivered trace's score is recognisable); ``ts`` is the trace's event time.
    Published to ``safeswap.live_scores`` keyed by rollout_id. Monitored beside the
    guardrails, never a decision input."""

    rollout_id: NonEmpty
    variant: Variant
    trace_id: NonEmpty
    user_id: NonEmpty
    trace_event_id: NonEmpty
    session_id: str | None = None
    stage: str = ""  # the rollout's stage when the response was scored: canary | ramp
    model_version: str = ""  # what served the response
    prompt_version: str = ""
    judge_model: NonEmpty
    rubric_hash: str = ""
    score: Annotated[int, Meta(ge=LIVE_SCORE_MIN, le=LIVE_SCORE_MAX)]
    reason: str = ""
    input_tokens: Count = 0
    output_tokens: Count = 0
    cost_usd: NonNegative = 0.0
    retries: Count = 0


EVENT_TYPES["live_score"] = LiveScore
