"""Realistic rollouts: A/A and A/B traffic generated as events and judged by the worker's own code.

The rollback guarantee ("a harmless candidate is rolled back in at most alpha of
rollouts, however often we look") is validated in :mod:`safeswap.core.stats.validation`
on idealised streams: one unit a user, a fixed 50/50 split, independent requests.
Real LLM traffic is not like that, and every way it differs can bias a test that
pools the whole rollout:

* users come back, many times (heavy-tailed visit counts: most visit a few times,
  some 30+), and differ from each other (a per-user thumbs-down propensity drawn
  from a Beta distribution, mildly or strongly heterogeneous);
* visits are spread over days with gaps longer than the 30-minute session gap,
  1-4 requests a visit a few seconds to minutes apart, and new users keep arriving
  over the whole rollout on a diurnal curve;
* the baseline moves while the split ramps 5% -> 10% -> 50%: a weekly or diurnal
  cycle of the thumbs-down rate, or a step (3% -> 9%) that coincides with a
  promotion, so early stages (mostly control) and late ones (much candidate) see
  different baselines;
* latency has a per-user random effect (intra-user correlation ~0.5 on the log
  scale), so a user's requests are not independent draws;
* traffic is slower or faster than the plan expected (0.7x, 1.3x).

Each run is a closed loop in event time, like a real rollout: a plan is registered
with :func:`safeswap.core.controller.on_plan`; every request is assigned the way the flag
client assigns it, from the split of the latest decision (:mod:`safeswap.core.assignment`:
sticky buckets, so a ramp only moves control users to the candidate); the requests
and their thumbs-down feedback are built as the wire types (``TraceEvent``,
``FeedbackEvent``) and fed in event-time order to one
:class:`~safeswap.core.outcomes.OutcomeProcessor`; at every look the processor's snapshot
goes to :func:`safeswap.core.controller.on_snapshot`, and every decision goes back to the
processor (``on_decision``: where the split periods begin) and to the flag
assignment. A run ends at a rollback, at ``complete``, at a pause (nothing moves
after one until a person resumes), or when the generated traffic ends.

On the same event streams the *previous method* is computed for comparison: the
whole rollout pooled, each visit (requests of a user not separated by 30 minutes)
an independent unit of a per-arm ``Ratio``, tested at the same looks by a
``GuardrailMonitor``; for latency, the per-request p95 histogram test.

Tolerances: the A/A scenarios guard the thumbs-down rate with tolerance 0 ("any
increase detected rolls back"): a harmless candidate then sits exactly on the
null's boundary, where the alpha guarantee is tight; with the usual +20% it would
sit far inside the null and an understated variance would go unnoticed. The A/B
``ab_thumbs_down_plus_50`` uses the usual +20%. The latency guardrail (p95) has
tolerance 0 too: in ``latency_clustered`` that is the A/A boundary again, and in
``ab_latency_p95_plus_10`` the whole +10% is the margin to detect (a 5% tolerance
would leave a 5% margin, more than a 4-day run at these volumes can resolve).
Every guardrail acts by rolling back, so detection and false alarm both read as
"rolled back".

The weekly cycle starts at its trough (-20%) and rises through the ramp: the
direction in which a pooled comparison blames the candidate (it is served mostly
when the baseline is high). The diurnal cycle is high at night, when traffic is
low.

Run: ``safeswap validate-stats --realistic --runs 200 --jobs 2`` (or
:func:`run_realistic`).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Any, Literal

import msgspec
import numpy as np

from safeswap.core.assignment import bucket
from schemas import Decision, FeedbackEvent, RolloutPlan, TraceEvent

__all__ = [
    "SCENARIOS",
    "EventStream",
    "Scenario",
    "Traffic",
    "build_plan",
    "fixed_split_events",
    "generate_traffic",
    "run_realistic",
    "run_rollout",
]

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
SESSION_GAP_MS = 30 * MINUTE_MS  # what separates two visits (and what the previous method's unit is)

ALPHA = 0.05
ROLLOUT_ID = "realistic"
MODEL = "claude-sonnet-4-5-20250929"
# The plan's watch: canary 1 day, 10% 1 day, 50% 2 days, then everyone. Traffic runs a day
# longer than the planned 4 days, so a slow stage can still finish.
STAGES = (
    {"name": "canary", "percent": 5, "min_duration": "1d"},
    {"name": "ramp", "percent": 10, "min_duration": "1d"},
    {"name": "ramp", "percent": 50, "min_duration": "2d"},
    {"name": "ramp", "percent": 100},
)
PLANNED_MS = 4 * DAY_MS
TRAFFIC_MS = 5 * DAY_MS
# A canary at 5% of the ~550 users active on its day sees ~28 candidate users: the per-arm
# minimum must be reachable about then, or the canary outlasts its day (scenarios with
# fewer, more faithful users state their own).
MIN_USERS_PER_ARM = 25
# Where the confidence sequences are tightest: about the users both arms have by the
# end of the 50% stage at the planned traffic.
N_TUNE = 2000
LOOK_MINUTES = 60
# Users of the segment power scenario: a +50% harm in a tenth of them must show at a
# segment test's alpha (0.025 / 8) within the planned horizon.
SEGMENT_POWER_USERS = 30000

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Scenario:
    """One kind of traffic and candidate; every rate is per request unless it says otherwise."""

    kind: Literal["aa", "ab"]
    description: str
    users: int = 1600  # users drawn for the 5 days at the planned rate (those who send nothing drop out)
    existing_share: float = 0.4  # already users when the rollout starts; the rest arrive during it
    visits_per_day: float = 1.25  # mean return rate over users (before the cap)
    visit_rate_sigma: float = 1.0  # lognormal spread of the users' return rates: the heavy tail
    max_visits_per_day: float = 12.0
    requests_per_visit: tuple[float, ...] = (0.5, 0.3, 0.12, 0.08)  # P(1), P(2), ... requests
    max_requests_per_user: int | None = None
    thumbs_down: float = 0.05  # mean of the users' propensities
    concentration: float = 20.0  # Beta(mean * c, (1 - mean) * c): smaller = users differ more
    baseline: Literal["flat", "weekly", "diurnal", "step"] = "flat"
    amplitude: float = 0.2  # of the weekly / diurnal cycle
    step_factor: float = 3.0  # "step": the baseline multiplies by this ...
    step_at_percent: float = 50.0  # ... when the controller promotes to this split
    latency_median_ms: float = 900.0
    latency_sigma: float = 0.5  # of log latency
    latency_icc: float = 0.5  # share of the log-latency variance that is the user's
    traffic: float = 1.0  # users (and so events) per unit of time, vs the plan's expectation
    thumbs_down_effect: float = 0.0  # candidate vs control, relative
    latency_effect: float = 0.0
    thumbs_down_tolerance: float | None = None  # None = 0: any increase
    latency_guardrail: bool = False
    latency_tolerance: float | None = None
    min_users_per_arm: int = MIN_USERS_PER_ARM  # the plan's, and the canary's
    # Segments: users' shares of the ``locale`` values (() = no segment, no segment guardrails),
    # each value's thumbs-down multiplier (segments differ), and the one segment value the
    # candidate harms (``thumbs_down_effect`` then applies there only).
    segment_shares: tuple[float, ...] = ()
    segment_baseline: tuple[float, ...] = ()
    harmed_segment: int | None = None


_RETURNING = Scenario("aa", "returning users: Beta(1, 19) propensity, heavy-tailed visits, flat baseline")
LOCALES = ("en", "es", "ja", "de", "fr", "pt", "ko", "it")
# Eight locales, ja 10% of users; thumbs-down differs by locale (ja, ko higher).
_LOCALE_SHARES = (0.40, 0.18, 0.10, 0.10, 0.08, 0.06, 0.05, 0.03)
_LOCALE_BASELINE = (1.0, 0.9, 1.4, 0.8, 1.0, 1.1, 1.3, 0.9)
SCENARIOS: dict[str, Scenario] = {
    "returning_users": _RETURNING,
    "returning_users_heavy": replace(
        _RETURNING,
        description="10+ visits a user on average, strongly heterogeneous: Beta(0.1, 1.9) propensity",
        users=700,
        visits_per_day=3.7,
        visit_rate_sigma=1.2,
        concentration=2.0,
        min_users_per_arm=12,  # ~300 users on the canary's day: 5% of them is ~15
    ),
    "ramp_weekly": replace(
        _RETURNING, description="weekly +/-20% baseline, rising from its trough through the ramp", baseline="weekly"
    ),
    "ramp_diurnal": replace(
        _RETURNING, description="diurnal +/-20% baseline, high at night when traffic is low", baseline="diurnal"
    ),
    "ramp_step": replace(
        _RETURNING,
        description="thumbs-down 3% -> 9% when the controller promotes 10% -> 50%",
        thumbs_down=0.03,
        baseline="step",
    ),
    "latency_clustered": replace(
        _RETURNING,
        description="p95 latency guardrail (tolerance 0), intra-user correlation 0.5, 1-20 requests a user",
        max_requests_per_user=20,
        latency_guardrail=True,
    ),
    "traffic_0.7x": replace(_RETURNING, description="returning users at 0.7x the planned traffic", traffic=0.7),
    "traffic_1.3x": replace(_RETURNING, description="returning users at 1.3x the planned traffic", traffic=1.3),
    "segments_aa": replace(
        _RETURNING,
        description="8 locale segments guarded (3-40% of users, baselines 0.8-1.4x): no segment harmed",
        segment_shares=_LOCALE_SHARES,
        segment_baseline=_LOCALE_BASELINE,
    ),
    "ab_segment_plus_50": replace(
        _RETURNING,
        kind="ab",
        description=(
            f"candidate thumbs-down +50% in locale=ja only (10% of {SEGMENT_POWER_USERS:,} users, "
            "8% base rate), tolerance 0: should roll back naming locale=ja"
        ),
        users=SEGMENT_POWER_USERS,
        thumbs_down=0.08,
        min_users_per_arm=300,
        segment_shares=_LOCALE_SHARES,
        segment_baseline=_LOCALE_BASELINE,
        harmed_segment=LOCALES.index("ja"),
        thumbs_down_effect=0.5,
    ),
    "ab_thumbs_down_plus_50": replace(
        _RETURNING,
        kind="ab",
        description="candidate thumbs-down +50% vs a +20% tolerance: should roll back",
        thumbs_down_effect=0.5,
        thumbs_down_tolerance=0.2,
    ),
    "ab_latency_p95_plus_10": replace(
        _RETURNING,
        kind="ab",
        description="candidate latency +10% vs p95 tolerance 0: should roll back",
        max_requests_per_user=20,
        latency_guardrail=True,
        latency_effect=0.10,
        thumbs_down_tolerance=0.2,
    ),
}


# ------------------------------------------------------------------ the plan
def build_plan(scenario: Scenario, salt: str) -> RolloutPlan:
    """A low-stakes plan (no eval gate) with the 5 -> 10 -> 50 -> 100% ramp; every guardrail rolls back."""
    thumbs = {"metric": "thumbs_down_rate", "action": "rollback"}
    if scenario.thumbs_down_tolerance is not None:
        thumbs["max_relative_increase"] = scenario.thumbs_down_tolerance
    guardrails = [thumbs]
    if scenario.latency_guardrail:
        latency = {"metric": "latency_ms_p95", "action": "rollback"}
        if scenario.latency_tolerance is not None:
            latency["max_relative_increase"] = scenario.latency_tolerance
        guardrails.append(latency)
    identical = scenario.kind == "aa"
    segments = {"segments": ["locale"], "max_segment_values": len(scenario.segment_shares)}
    return msgspec.convert(
        {
            "rollout_id": ROLLOUT_ID,
            "salt": salt,
            "stakes": "low",
            "description": scenario.description,
            "control": {"model": MODEL, "prompt_version": "v41"},
            "candidate": {"model": MODEL, "prompt_version": "v41" if identical else "v42"},
            "stages": [
                dict(stage, min_users_per_arm=scenario.min_users_per_arm) if stage["name"] == "canary" else dict(stage)
                for stage in STAGES
            ],
            "alpha": ALPHA,
            "min_users_per_arm": scenario.min_users_per_arm,
            "n_tune": N_TUNE,
            "guardrails": guardrails,
            **(segments if scenario.segment_shares else {}),
        },
        RolloutPlan,
    )


# ------------------------------------------------------------------ traffic
@dataclass
class Traffic:
    """Who sends requests when, and the random draws that decide what happens to them.

    Per user: ``user_ids``, ``buckets`` (the flag buckets, computed once) and the
    thumbs-down ``propensity``. Per request, sorted by event time: ``ts`` (epoch ms),
    ``user``, ``visit`` (global visit index; a visit = requests not separated by the
    30-minute gap), ``visit_no`` (the visit's number for its user), the control
    ``latency`` (ms), ``baseline`` (multiplier of the thumbs-down probability),
    ``u_down`` (the uniform draw that decides a thumbs-down), ``feedback_delay`` (ms)
    and the token counts. Which variant serves a request is decided only when the
    request happens (closed loop), so it is not here.
    """

    user_ids: list[str]
    buckets: np.ndarray
    propensity: np.ndarray
    ts: np.ndarray
    user: np.ndarray
    visit: np.ndarray
    visit_no: np.ndarray
    latency: np.ndarray
    baseline: np.ndarray
    u_down: np.ndarray
    feedback_delay: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    segment: np.ndarray | None = None  # per user: the index of its locale (scenarios with segments)

    @property
    def requests(self) -> int:
        return int(self.ts.size)


def _diurnal(t_ms: np.ndarray) -> np.ndarray:
    """Relative traffic intensity over the day (mean 1): lowest at midnight, highest at noon."""
    return 1.0 - 0.5 * np.cos(2 * np.pi * t_ms / DAY_MS)


def _baseline(scenario: Scenario, t_ms: np.ndarray) -> np.ndarray:
    if scenario.baseline == "weekly":  # the trough at the start, the peak 3.5 days in
        return 1.0 - scenario.amplitude * np.cos(2 * np.pi * t_ms / (7 * DAY_MS))
    if scenario.baseline == "diurnal":  # high at night, when few requests come
        return 1.0 + scenario.amplitude * np.cos(2 * np.pi * t_ms / DAY_MS)
    return np.ones_like(t_ms, dtype=float)  # flat; the step is applied by the closed loop


def generate_traffic(scenario: Scenario, rng: np.random.Generator, salt: str, horizon_ms: int = TRAFFIC_MS) -> Traffic:
    """Draw one run's users and requests (numpy, no events yet)."""
    # Cumulative traffic intensity on a 1-minute grid, in days of mean intensity: arrivals and
    # returns follow the diurnal curve by drawing uniformly in it and mapping back to time.
    grid = np.arange(0, horizon_ms + MINUTE_MS, MINUTE_MS, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(_diurnal(grid[:-1] + MINUTE_MS / 2))]) * (MINUTE_MS / DAY_MS)
    total = cumulative[-1]

    n = round(scenario.users * scenario.traffic)
    existing = rng.random(n) < scenario.existing_share
    # Existing users are already coming back at t=0; new ones arrive (a first visit) on the curve.
    arrival_c = np.where(existing, 0.0, rng.random(n) * total)
    sigma = scenario.visit_rate_sigma
    rate = np.minimum(
        rng.lognormal(math.log(scenario.visits_per_day) - sigma * sigma / 2, sigma, n), scenario.max_visits_per_day
    )
    returns = rng.poisson(rate * (total - arrival_c))
    first = (~existing).astype(np.int64)
    per_user = returns + first
    owner = np.repeat(np.arange(n), per_user)
    # The first visit of a new user is its arrival; the others are uniform in intensity time.
    is_first = np.zeros(owner.size, dtype=bool)
    starts_at = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    is_first[starts_at[first.astype(bool) & (per_user > 0)]] = True
    u = rng.random(owner.size)
    visit_c = np.where(is_first, arrival_c[owner], arrival_c[owner] + u * (total - arrival_c[owner]))
    visit_t = np.interp(visit_c, cumulative, grid)

    # Requests of each visit: 1-4, a few seconds to minutes apart.
    probs = np.asarray(scenario.requests_per_visit, dtype=float)
    n_req = rng.choice(np.arange(1, probs.size + 1), size=owner.size, p=probs / probs.sum())
    order = np.lexsort((visit_t, owner))
    owner, visit_t, n_req = owner[order], visit_t[order], n_req[order]
    req_visit = np.repeat(np.arange(owner.size), n_req)
    gaps = np.clip(rng.lognormal(math.log(45 * SECOND_MS), 1.0, req_visit.size), 3 * SECOND_MS, 10 * MINUTE_MS)
    visit_first_req = np.concatenate([[0], np.cumsum(n_req)[:-1]])
    gaps[visit_first_req] = 0.0
    cum_gaps = np.cumsum(gaps)
    offset = cum_gaps - cum_gaps[visit_first_req][req_visit]
    span = offset[np.cumsum(n_req) - 1]

    # A visit starts at least the session gap (+1 min) after the previous one ended, so the
    # generated visits are exactly what a 30-minute gap separates: t'_i = max(t_i, t'_{i-1} + need_{i-1}),
    # a running maximum of t_i - C_i (C = the needs before i, within the user) plus C_i.
    need = span + SESSION_GAP_MS + MINUTE_MS
    new_user = np.concatenate([[True], owner[1:] != owner[:-1]])
    cum_need = np.cumsum(need) - need
    c_within = cum_need - cum_need[np.maximum.accumulate(np.where(new_user, np.arange(owner.size), 0))]
    lift = float(horizon_ms) * 10 + c_within.max(initial=0.0) * 2 + 1.0  # keeps users apart in the running max
    shifted = np.maximum.accumulate(visit_t - c_within + owner * lift) - owner * lift + c_within
    req_ts = np.floor(shifted[req_visit] + offset).astype(np.int64)
    req_user = owner[req_visit]
    visit_no = np.arange(owner.size) - np.maximum.accumulate(np.where(new_user, np.arange(owner.size), 0))

    keep = req_ts < horizon_ms
    if scenario.max_requests_per_user is not None:
        rank = _rank_within(req_user, req_ts)
        keep &= rank < scenario.max_requests_per_user
    req_ts, req_user, req_visit = req_ts[keep], req_user[keep], req_visit[keep]
    by_time = np.argsort(req_ts, kind="stable")
    req_ts, req_user, req_visit = req_ts[by_time], req_user[by_time], req_visit[by_time]

    # Keep only users who send something, numbered in order of their first request.
    seen, first_index = np.unique(req_user, return_index=True)
    renumber = np.full(n, -1, dtype=np.int64)
    renumber[seen[np.argsort(first_index)]] = np.arange(seen.size)
    req_user = renumber[req_user]
    users = seen.size
    user_ids = [f"user-{i:05d}" for i in range(users)]
    buckets = np.fromiter((bucket(salt, uid) for uid in user_ids), dtype=np.int64, count=users)

    mean, c = scenario.thumbs_down, scenario.concentration
    propensity = rng.beta(mean * c, (1 - mean) * c, users)
    icc, s = scenario.latency_icc, scenario.latency_sigma
    user_effect = rng.normal(0.0, s * math.sqrt(icc), users)
    m = req_ts.size
    latency = scenario.latency_median_ms * np.exp(user_effect[req_user] + rng.normal(0.0, s * math.sqrt(1 - icc), m))
    return Traffic(
        user_ids=user_ids,
        buckets=buckets,
        propensity=propensity,
        ts=req_ts,
        user=req_user,
        visit=req_visit,
        visit_no=visit_no[req_visit],
        latency=latency,
        baseline=_baseline(scenario, req_ts.astype(float)),
        u_down=rng.random(m),
        feedback_delay=np.clip(rng.lognormal(math.log(8 * SECOND_MS), 0.8, m), SECOND_MS, 5 * MINUTE_MS).astype(
            np.int64
        ),
        input_tokens=rng.integers(200, 1500, m),
        output_tokens=rng.integers(50, 800, m),
        # drawn last, so scenarios without segments draw the same traffic as before them
        segment=rng.choice(len(scenario.segment_shares), size=users, p=scenario.segment_shares)
        if scenario.segment_shares
        else None,
    )


def _rank_within(group: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Each element's 0-based rank by time within its group."""
    order = np.lexsort((ts, group))
    g = group[order]
    start = np.concatenate([[True], g[1:] != g[:-1]])
    positions = np.arange(g.size)
    rank_sorted = positions - np.maximum.accumulate(np.where(start, positions, 0))
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


# ------------------------------------------------------------------ events
class EventStream:
    """The requests of a :class:`Traffic` as trace and feedback events, in event-time order.

    The variant of a request is decided when it is materialised, from ``threshold``
    (buckets below it are served the candidate: ``round(percent * 100)``, exactly
    ``safeswap.core.assignment.in_candidate``), which the runner updates from every
    decision; ``step`` multiplies the thumbs-down baseline from the moment it is set.
    ``served`` and ``down`` record, per request, the candidate flag and the thumbs-down.
    """

    def __init__(
        self,
        traffic: Traffic,
        scenario: Scenario,
        rollout_id: str = ROLLOUT_ID,
        prompt_versions: tuple[str, str] = ("v41", "v41"),
    ) -> None:
        self.traffic = traffic
        self.rollout_id = rollout_id
        self.prompt_versions = prompt_versions
        self.i = 0
        self.n = traffic.requests
        self.pending: list[tuple[int, int, FeedbackEvent]] = []  # (ts, request, feedback), a heap
        self.threshold = 0
        self.step = 1.0
        self.down_effect = 1.0 + scenario.thumbs_down_effect
        self.latency_effect = 1.0 + scenario.latency_effect
        self.served = np.zeros(self.n, dtype=bool)
        self.down = np.zeros(self.n, dtype=bool)
        # Python lists: the loop below reads one element at a time, which numpy makes slow.
        self._ts = traffic.ts.tolist()
        self._user = traffic.user.tolist()
        self._visit_no = traffic.visit_no.tolist()
        self._latency = traffic.latency.tolist()
        self._baseline = traffic.baseline.tolist()
        self._u_down = traffic.u_down.tolist()
        self._delay = traffic.feedback_delay.tolist()
        self._input = traffic.input_tokens.tolist()
        self._output = traffic.output_tokens.tolist()
        self._buckets = traffic.buckets.tolist()
        self._propensity = traffic.propensity.tolist()
        segment = traffic.segment
        self._segment = segment.tolist() if segment is not None else None
        self._segment_baseline = scenario.segment_baseline or (1.0,) * len(scenario.segment_shares)
        self._harmed = scenario.harmed_segment

    def set_percent(self, percent: float) -> None:
        self.threshold = round(percent * 100)

    def peek(self) -> int | None:
        """Event time of the next event, or None at the end."""
        t_request = self._ts[self.i] if self.i < self.n else None
        if self.pending and (t_request is None or self.pending[0][0] <= t_request):
            return self.pending[0][0]
        return t_request

    def pop(self) -> TraceEvent | FeedbackEvent:
        i = self.i
        if self.pending and (i >= self.n or self.pending[0][0] <= self._ts[i]):
            return heapq.heappop(self.pending)[2]
        self.i = i + 1
        ts = self._ts[i]
        u = self._user[i]
        candidate = self._buckets[u] < self.threshold
        variant = "candidate" if candidate else "control"
        p = self._propensity[u] * self._baseline[i] * self.step
        segment = None
        if self._segment is not None:
            locale = self._segment[u]
            p *= self._segment_baseline[locale]
            segment = {"locale": LOCALES[locale]}
        latency = self._latency[i]
        if candidate:
            self.served[i] = True
            if self._harmed is None or (self._segment is not None and self._segment[u] == self._harmed):
                p *= self.down_effect
            latency *= self.latency_effect
        user_id = self.traffic.user_ids[u]
        session_id = f"{user_id}/{self._visit_no[i]}"
        trace_id = f"tr-{i}"
        n_in, n_out = self._input[i], self._output[i]
        trace = TraceEvent(
            event_id=f"ev-{i}",
            ts=ts,
            rollout_id=self.rollout_id,
            variant=variant,
            user_id=user_id,
            session_id=session_id,
            trace_id=trace_id,
            prompt_version=self.prompt_versions[candidate],
            model_version=MODEL,
            latency_ms=latency,
            input_tokens=n_in,
            output_tokens=n_out,
            cost_usd=(3 * n_in + 15 * n_out) * 1e-6,
            cache_hit=False,
            segment=segment,
        )
        if self._u_down[i] < p:
            self.down[i] = True
            at = ts + self._delay[i]
            feedback = FeedbackEvent(
                event_id=f"fb-{i}",
                ts=at,
                trace_id=trace_id,
                user_id=user_id,
                session_id=session_id,
                rollout_id=self.rollout_id,
                variant=variant,
                kind="thumbs_down",
            )
            heapq.heappush(self.pending, (at, i, feedback))
        return trace


def fixed_split_events(traffic: Traffic, scenario: Scenario, percent: float) -> list[TraceEvent | FeedbackEvent]:
    """Every event of ``traffic`` at a fixed split (open loop): for looking at the traffic itself."""
    stream = EventStream(traffic, scenario)
    stream.set_percent(percent)
    events = []
    while stream.peek() is not None:
        events.append(stream.pop())
    return events


# ------------------------------------------------------------------ one rollout
def _run_seed(seed: int, name: str, run: int) -> np.random.SeedSequence:
    """A run's seed from the base seed, the scenario's name and the run's number only (not the
    jobs, nor which other scenarios run), so results do not depend on how the work is split."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode()), run])


def _first_words(text: str, words: int = 4) -> str:
    return " ".join(text.split()[:words]).rstrip(":;,")


def run_rollout(
    name: str,
    seed: int = 0,
    run: int = 0,
    look_minutes: float = LOOK_MINUTES,
    sink: Callable[[Any], None] | None = None,
    scenario: Scenario | None = None,
) -> dict[str, Any]:
    """One closed-loop rollout of scenario ``name``; ``sink`` hears every event applied.

    ``scenario`` replaces ``SCENARIOS[name]`` (a variant of it, for experiments); the
    name still seeds the run."""
    from safeswap.core.controller import on_plan, on_snapshot
    from safeswap.core.outcomes import OutcomeProcessor

    started = time.perf_counter()
    scenario = scenario or SCENARIOS[name]
    salt = f"{name}:{seed}:{run}"
    traffic = generate_traffic(scenario, np.random.default_rng(_run_seed(seed, name, run)), salt)
    plan = build_plan(scenario, salt)
    stream = EventStream(
        traffic, scenario, plan.rollout_id, (plan.control.prompt_version or "", plan.candidate.prompt_version or "")
    )
    processor = OutcomeProcessor(partition=0)
    rollouts: dict[str, Any] = {}
    decisions: list[Decision] = []
    step_ts: int | None = None

    def follow(decision: Decision | None) -> None:
        nonlocal step_ts
        if decision is None:
            return
        processor.on_decision(decision)
        decisions.append(decision)
        stream.set_percent(decision.percent)  # what the flag client serves from now on
        if (
            scenario.baseline == "step"
            and step_ts is None
            and decision.action == "promote"
            and decision.percent == scenario.step_at_percent
        ):
            stream.step, step_ts = scenario.step_factor, decision.ts

    follow(on_plan(rollouts, plan, ts=0))
    state = rollouts[plan.rollout_id]
    interval = int(look_minutes * MINUTE_MS)
    looks: list[int] = []
    seq = 0
    next_look = interval
    last_ts = 0

    def look(at: int) -> bool:
        nonlocal seq
        seq += 1
        looks.append(at)
        follow(on_snapshot(state, processor.snapshot(plan.rollout_id, seq)))
        return state.stage in ("rolled_back", "complete", "paused")

    stopped = False
    while not stopped:
        t = stream.peek()
        if t is None:
            break
        while next_look < t:  # a look sees every event up to its time
            stopped = look(next_look)
            next_look += interval
            if stopped:
                break
        if stopped:
            break
        event = stream.pop()
        last_ts = event.ts
        processor.apply(event, event.ts + HOUR_MS)
        if sink is not None:
            sink(event)
    if not stopped:  # the traffic ended: a last look at everything
        look(max(last_ts, looks[-1] if looks else 0))

    last = decisions[-1]
    outcome = {"rolled_back": "rolled_back", "complete": "complete", "paused": "paused"}.get(state.stage, "ended")
    pause = next((d for d in decisions if d.action == "pause"), None)
    rollback = next((d for d in decisions if d.action == "rollback"), None)
    requests = stream.i  # requests are materialised in order, and each one popped was applied
    previous = previous_method(traffic, stream, plan, looks, requests)
    return {
        "outcome": outcome,
        "final_stage": _stage_label(state),
        "stop_ts": last.ts if outcome in ("rolled_back", "complete", "paused") else None,
        "pause_reason": _first_words(pause.reason) if pause else None,
        "pause_checks": sorted({p["check"] for p in pause.health.get("problems", []) if p["action"] == "pause"})
        if pause
        else [],
        "rollback_causes": _causes(rollback) if rollback else [],
        "decisions": [(d.action, d.stage, d.percent, d.ts) for d in decisions],
        "step_ts": step_ts,
        "users": int(np.unique(traffic.user[:requests]).size),
        "events": int(processor.counts["read"]),
        "rejected": int(processor.counts["late"] + processor.counts["invalid"]),
        "looks": len(looks),
        "previous_rollback": previous is not None,
        "previous_stop_ts": previous,
        "seconds": time.perf_counter() - started,
    }


def _stage_label(state) -> str:
    if state.stage in ("canary", "ramp") or (state.stage == "paused" and state.paused_stage):
        return f"{state.stage} {state.percent:g}%"
    return state.stage


def _causes(decision: Decision) -> list[str]:
    breached = [e.metric for e in decision.evidence if e.status == "breach"]
    breached += [f"{e.metric} in {e.segment}" for e in decision.segment_evidence if e.status == "breach"]
    checks = [p["check"] for p in decision.health.get("problems", []) if p["action"] == "rollback"]
    return sorted(set(breached + checks)) or [_first_words(decision.reason)]


# ------------------------------------------------------------------ the previous method
def previous_method(
    traffic: Traffic, stream: EventStream, plan: RolloutPlan, looks: list[int], requests: int
) -> int | None:
    """When (event time) the pooled, per-visit method first breaches at the run's looks; None if never.

    Visits are the units (a returning user's visits are independent), the served
    variant is the arm, and everything since the start is pooled: no cohorts, no
    users. Latency: per-request p95 histograms. Both with ``alpha / guardrails``.
    """
    from safeswap.core.metrics import HIST_EDGES
    from safeswap.core.stats import GuardrailMonitor, LatencyHistogram, Ratio

    if not looks:
        return None
    looks_arr = np.asarray(looks, dtype=np.int64)
    ts = traffic.ts[:requests]
    arm = stream.served[:requests]
    down = stream.down[:requests]
    unit = traffic.visit[:requests].astype(np.int64) * 2 + arm  # a visit split by a ramp is two units
    k = len(plan.guardrails)
    monitors = {}
    for spec in plan.guardrails:
        monitors[spec.metric] = GuardrailMonitor(
            spec.metric,
            max_relative_harm=spec.max_relative_increase,
            alpha=plan.alpha / k,
            min_units_per_arm=plan.min_users_per_arm,
            n_tune=plan.n_tune,
        )

    # Increments in event time: a response (den + 1) at its trace, a thumbs-down (num + 1) at its feedback.
    fb = np.flatnonzero(down)
    t_inc = np.concatenate([ts, ts[fb] + traffic.feedback_delay[:requests][fb]])
    u_inc = np.concatenate([unit, unit[fb]])
    a_inc = np.concatenate([arm, arm[fb]])
    d_num = np.concatenate([np.zeros(ts.size), np.ones(fb.size)])
    d_den = np.concatenate([np.ones(ts.size), np.zeros(fb.size)])
    sums = _ratio_sums_by_look(t_inc, u_inc, a_inc, d_num, d_den, looks_arr)
    hists = None
    if "latency_ms_p95" in monitors:
        latency = traffic.latency[:requests] * np.where(arm, stream.latency_effect, 1.0)
        hists = _histograms_by_look(ts, arm, latency, looks_arr, np.asarray(HIST_EDGES))
    for j, at in enumerate(looks):
        control = Ratio(*sums[0][:, j])
        candidate = Ratio(*sums[1][:, j])
        breach = monitors["thumbs_down_rate"].update(control, candidate).status == "breach"
        if hists is not None:
            verdict = monitors["latency_ms_p95"].update(
                LatencyHistogram(tuple(hists[0][j].tolist())), LatencyHistogram(tuple(hists[1][j].tolist()))
            )
            breach = breach or verdict.status == "breach"
        if breach:
            return at
    return None


def _ratio_sums_by_look(t, unit, arm, d_num, d_den, looks):
    """Per arm, the Ratio sums (n_units, num, num_sq, den, den_sq, num_den) at every look, shape (6, looks).

    Each increment changes its unit's running totals (a, b) to (a + da, b + db); the
    sums of squares and products change by the differences, which add up over time.
    """
    order = np.lexsort((t, unit))
    u, a, b = unit[order], d_num[order], d_den[order]
    start = np.concatenate([[True], u[1:] != u[:-1]])
    positions = np.arange(u.size)
    first = np.maximum.accumulate(np.where(start, positions, 0))
    ca, cb = np.cumsum(a), np.cumsum(b)
    a_after = ca - (ca - a)[first]
    b_after = cb - (cb - b)[first]
    a_before, b_before = a_after - a, b_after - b
    rows = np.stack(
        [
            start.astype(float),  # a unit's first increment is its first response
            a,
            a_after**2 - a_before**2,
            b,
            b_after**2 - b_before**2,
            a_after * b_after - a_before * b_before,
        ]
    )
    look_of = np.searchsorted(looks, t[order], side="left")  # first look at or after the increment
    out = []
    for variant in (False, True):
        mine = arm[order] == variant
        per_look = np.stack(
            [np.bincount(look_of[mine], weights=row[mine], minlength=looks.size + 1)[: looks.size] for row in rows]
        )
        out.append(np.cumsum(per_look, axis=1))
    return out


def _histograms_by_look(ts, arm, latency, looks, edges):
    """Per arm, the cumulative per-request latency histogram at every look, shape (looks, bins)."""
    bins = edges.size + 1
    index = np.searchsorted(edges, latency, side="right")
    look_of = np.searchsorted(looks, ts, side="left")
    out = []
    for variant in (False, True):
        mine = arm == variant
        counts = np.bincount(look_of[mine] * bins + index[mine], minlength=(looks.size + 1) * bins)
        out.append(np.cumsum(counts.reshape(looks.size + 1, bins)[: looks.size], axis=0))
    return out


# ------------------------------------------------------------------ many rollouts
def _wilson(hits: int, runs: int, z: float = 1.959964) -> list[float]:
    from safeswap.core.stats.validation import _wilson as wilson

    return wilson(hits, runs, z)


def _rate(hits: int, runs: int) -> dict[str, Any]:
    rate = hits / runs
    return {"rate": rate, "mc_se": math.sqrt(rate * (1 - rate) / runs), "ci95": _wilson(hits, runs)}


def _median_fraction(stops: list[int | None]) -> tuple[float | None, float | None]:
    """Median stop as a fraction of the planned horizon: over all runs (None when more than half
    never stop) and over the stopping runs."""
    values = np.array([s / PLANNED_MS if s is not None else np.inf for s in stops])
    overall = float(np.quantile(values, 0.5, method="inverted_cdf")) if values.size else math.inf
    stopped = values[np.isfinite(values)]
    return (
        round(overall, 3) if math.isfinite(overall) else None,
        round(float(np.median(stopped)), 3) if stopped.size else None,
    )


def summarise(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    runs = len(results)

    def count(outcome: str) -> int:
        return sum(r["outcome"] == outcome for r in results)

    out: dict[str, Any] = {
        "kind": scenario.kind,
        "description": scenario.description,
        "runs": runs,
        "safeswap": _rate(count("rolled_back"), runs),
        "previous": _rate(sum(r["previous_rollback"] for r in results), runs),
        "pause_rate": count("paused") / runs,
        "complete_rate": count("complete") / runs,
        "ended_rate": count("ended") / runs,
        "final_stages": _tally(r["final_stage"] for r in results),
        "pause_reasons": _tally(r["pause_reason"] for r in results if r["pause_reason"]),
        "pause_checks": _tally(c for r in results for c in r["pause_checks"]),
        "rollback_causes": _tally(c for r in results for c in r["rollback_causes"]),
        "users_per_run": round(float(np.mean([r["users"] for r in results])), 1),
        "events_per_run": round(float(np.mean([r["events"] for r in results])), 1),
        "looks_per_run": round(float(np.mean([r["looks"] for r in results])), 1),
        "rejected_events": int(sum(r["rejected"] for r in results)),
        "seconds_per_run": round(float(np.mean([r["seconds"] for r in results])), 3),
        "plan": _plan_dict(build_plan(scenario, "<per run>")),
    }
    if scenario.harmed_segment is not None:  # found where it is: the rollback names the harmed segment
        harmed = f" in locale={LOCALES[scenario.harmed_segment]}"
        out["segment_named"] = _rate(sum(any(c.endswith(harmed) for c in r["rollback_causes"]) for r in results), runs)
    if scenario.kind == "ab":
        rollbacks = [r["stop_ts"] if r["outcome"] == "rolled_back" else None for r in results]
        out["safeswap"]["median_stop_fraction"], out["safeswap"]["median_stop_fraction_detected"] = _median_fraction(
            rollbacks
        )
        out["previous"]["median_stop_fraction"], out["previous"]["median_stop_fraction_detected"] = _median_fraction(
            [r["previous_stop_ts"] for r in results]
        )
    return out


def _tally(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _plan_dict(plan: RolloutPlan) -> dict[str, Any]:
    data = msgspec.to_builtins(plan)
    for key in ("salt", "description", "eval_gate", "allow_multiple_changes", "skip_shadow"):
        data.pop(key, None)
    return data


def _task(args: tuple[str, int, int, float]) -> dict[str, Any]:
    name, seed, run, look_minutes = args
    return run_rollout(name, seed, run, look_minutes)


def run_realistic(
    scenarios: list[str] | None,
    runs: int,
    seed: int,
    jobs: int = 1,
    progress: Progress | None = None,
    look_minutes: float = LOOK_MINUTES,
) -> dict[str, Any]:
    """Run ``runs`` closed-loop rollouts of each scenario (all by default); a JSON-able dict of figures.

    Each run's seed derives from ``seed``, the scenario's name and the run's number,
    so the figures are the same whatever ``jobs`` (worker processes) is.
    ``progress(scenario, done, total)`` hears every finished run.
    """
    for label, value, low in (("runs", runs, 1), ("seed", seed, 0), ("jobs", jobs, 1)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if not look_minutes > 0:
        raise ValueError(f"look_minutes must be > 0, got {look_minutes!r}")
    names = list(SCENARIOS) if not scenarios else list(dict.fromkeys(scenarios))
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    started = time.perf_counter()
    tasks = [(name, seed, run, look_minutes) for name in names for run in range(runs)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    done = 0

    def collect(result_iter) -> None:
        nonlocal done
        for (name, *_), result in zip(tasks, result_iter):
            results[name].append(result)
            done += 1
            if progress is not None:
                progress(name, done, len(tasks))

    if jobs == 1:
        collect(map(_task, tasks))
    else:
        # spawn: the parent may run threads (a progress bar), which fork must not copy.
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            collect(pool.imap(_task, tasks, chunksize=max(1, min(8, len(tasks) // (jobs * 8)))))
    return {
        "runs": runs,
        "seed": seed,
        "alpha": ALPHA,
        "look_minutes": look_minutes,
        "planned_horizon_days": PLANNED_MS / DAY_MS,
        "traffic_days": TRAFFIC_MS / DAY_MS,
        "plan": _plan_dict(build_plan(_RETURNING, "<per run>")),
        "scenarios": {name: summarise(name, results[name]) for name in names},
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
