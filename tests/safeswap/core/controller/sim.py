"""A tiny traffic model for controller tests: cumulative per-partition snapshots.

Users arrive over event time; each is assigned by the real bucketing at the
current split; per-user responses, thumbs-down and errors are drawn from the
variant's rates. Faults (skewed assignment, crossover, model drift, lost events,
cache skew) are switches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from safeswap.core.assignment import assign
from safeswap.core.stats import Ratio
from safeswap.core.stats.quantiles import LatencyHistogram
from schemas import StatsSnapshot

HOUR_MS = 3_600_000
PINNED = {"control": "m-20250101", "candidate": "m-20260101"}


@dataclass
class Behaviour:
    thumbs_down: float = 0.05
    error: float = 0.01
    cache_hit: float = 0.3
    responses: tuple[int, int] = (1, 3)
    model: str | None = None  # None: the model the plan pins for the variant
    drop_share: float = 0.0  # responses lost on the way (event loss)
    latency_hit_ms: float = 200.0  # median latency of a cache hit
    latency_miss_ms: float = 1500.0  # median latency of a cache miss


@dataclass
class Sim:
    rollout_id: str
    salt: str
    behaviour: dict[str, Behaviour] = field(default_factory=lambda: {"control": Behaviour(), "candidate": Behaviour()})
    partitions: int = 4
    seed: int = 0
    extra_candidate_share: float = 0.0  # SRM fault: this share of control users is served the candidate
    crossover_share: float = 0.0  # users served the candidate then control

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.units = [{"control": {}, "candidate": {}} for _ in range(self.partitions)]
        self.exposures = [{"control": 0, "candidate": 0} for _ in range(self.partitions)]
        self.models = [{"control": {}, "candidate": {}} for _ in range(self.partitions)]
        self.crossovers = [0] * self.partitions
        self.latencies = [
            {v: {"hit": [], "miss": []} for v in ("control", "candidate")} for _ in range(self.partitions)
        ]
        self.seq = [0] * self.partitions
        self.next_user = 0
        self.ts = 1_800_000_000_000

    def step(self, users: int, percent: float, hours: float = 1.0) -> list[StatsSnapshot]:
        """``users`` new users over ``hours`` of event time at split ``percent``."""
        for _ in range(users):
            user = f"u{self.next_user}"
            self.next_user += 1
            variant = assign(self.salt, user, percent)
            if variant == "control" and self.rng.random() < self.extra_candidate_share:
                variant = "candidate"
            partition = self.next_user % self.partitions
            behaviour = self.behaviour[variant]
            responses = self.rng.randint(*behaviour.responses)
            kept = sum(self.rng.random() >= behaviour.drop_share for _ in range(responses))
            if kept == 0:
                continue
            down = sum(self.rng.random() < behaviour.thumbs_down for _ in range(kept))
            errors = sum(self.rng.random() < behaviour.error for _ in range(kept))
            hits = 0
            for _ in range(kept):
                hit = self.rng.random() < behaviour.cache_hit
                hits += hit
                median = behaviour.latency_hit_ms if hit else behaviour.latency_miss_ms
                self.latencies[partition][variant]["hit" if hit else "miss"].append(
                    self.rng.lognormvariate(0, 0.5) * median
                )
            self.units[partition][variant][user] = (down, errors, hits, kept)
            self.exposures[partition][variant] += 1
            seen = self.models[partition][variant]
            model = behaviour.model or PINNED[variant]
            seen[model] = seen.get(model, 0) + kept
            if variant == "candidate" and self.rng.random() < self.crossover_share:
                self.crossovers[partition] += 1
        self.ts += int(hours * HOUR_MS)
        return [self.snapshot(p) for p in range(self.partitions)]

    def snapshot(self, partition: int) -> StatsSnapshot:
        self.seq[partition] += 1
        metrics, users = {}, {}
        for variant, units in self.units[partition].items():
            if not units:
                continue
            rows = list(units.values())
            den = [r[3] for r in rows]
            metrics[variant] = {
                "thumbs_down_rate": Ratio.from_units([r[0] for r in rows], den).to_dict(),
                "error_rate": Ratio.from_units([r[1] for r in rows], den).to_dict(),
                "cache_hit_rate": Ratio.from_units([r[2] for r in rows], den).to_dict(),
                "responses_per_user": Ratio.from_units(den, [1.0] * len(den)).to_dict(),
            }
            strata = self.latencies[partition][variant]
            if strata["hit"] and strata["miss"]:
                metrics[variant]["latency_ms_p95"] = LatencyHistogram.from_values(
                    strata["hit"] + strata["miss"]
                ).to_dict()
                metrics[variant]["latency_ms_p95_cache_hit"] = LatencyHistogram.from_values(strata["hit"]).to_dict()
                metrics[variant]["latency_ms_p95_cache_miss"] = LatencyHistogram.from_values(strata["miss"]).to_dict()
            users[variant] = len(units)
        return StatsSnapshot(
            rollout_id=self.rollout_id,
            partition=partition,
            seq=self.seq[partition],
            ts=self.ts,
            users=users,
            metrics=metrics,
            models={v: dict(m) for v, m in self.models[partition].items() if m},
            first_exposures=dict(self.exposures[partition]),
            crossover_users=self.crossovers[partition],
        )
