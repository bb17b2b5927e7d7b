"""`safeswap replay EVENTS --plan PLAN`: would this rule have caught last week's regression?"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import yaml

from schemas import encode
from tests.safeswap.tools.test_simulate import PLAN
from tests.support.events import T0, feedback, trace

LOCALES = ("en", "es", "ja", "de", "fr")


def recorded_week(
    path, thumbs_down: dict[str, float], users: int = 3000, seed: int = 1, ja_candidate: float | None = None
) -> None:
    """``ja_candidate``: the candidate's thumbs-down rate for users with locale ja (a fifth of them);
    given, every trace carries its user's locale."""
    rng = random.Random(seed)
    lines, n = [], 0
    for u in range(users):
        variant = "candidate" if u % 2 else "control"
        locale = LOCALES[(u // 2) % len(LOCALES)]
        rate = ja_candidate if ja_candidate is not None and variant == "candidate" and locale == "ja" else None
        ts = T0 + u * 60_000  # a user a minute: ~2 days
        for _ in range(rng.randint(1, 3)):
            n += 1
            lines.append(
                dict(
                    json.loads(
                        encode(
                            trace(
                                n,
                                ts,
                                user=f"u{u}",
                                variant=variant,
                                rollout="sim",
                                prompt=f"question {n}",
                                model_version=PLAN[variant]["model"],
                                segment={"locale": locale} if ja_candidate is not None else None,
                            )
                        )
                    ),
                    type="trace",
                )
            )
            if rng.random() < (rate if rate is not None else thumbs_down[variant]):
                lines.append(
                    dict(
                        json.loads(
                            encode(
                                feedback(n, n, ts + 1000, "thumbs_down", user=f"u{u}", variant=variant, rollout="sim")
                            )
                        ),
                        type="feedback",
                    )
                )
            ts += 5 * 60_000
    lines.sort(key=lambda line: line["ts"])  # recorded in event-time order (ISO strings sort as times)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def replay(tmp_path, events, plan_fields: dict | None = None) -> dict:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({**PLAN, **(plan_fields or {})}))
    result = subprocess.run(
        [sys.executable, "-m", "safeswap", "replay", str(events), "--plan", str(plan), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_replay_with_a_plan_lists_the_rollback_it_would_have_taken(tmp_path):
    events = tmp_path / "week.jsonl"
    recorded_week(events, {"control": 0.2, "candidate": 0.4})
    out = replay(tmp_path, events)
    decisions = out["plan"]["decisions"]
    assert [d["action"] for d in decisions] == ["start", "rollback"]
    assert "thumbs_down_rate" in decisions[-1]["reason"] and out["plan"]["final_stage"] == "rolled_back"
    assert out["rollouts"]["sim"]["variants"]["candidate"]["thumbs_down_rate"] > 0.3  # the metrics still come


def test_replay_of_healthy_traffic_takes_no_rollback(tmp_path):
    events = tmp_path / "week.jsonl"
    recorded_week(events, {"control": 0.2, "candidate": 0.2})
    out = replay(tmp_path, events)
    assert "rollback" not in [d["action"] for d in out["plan"]["decisions"]]
    assert out["plan"]["guardrails"]


def test_replay_finds_a_regression_confined_to_one_segment_and_names_it(tmp_path):
    events = tmp_path / "week.jsonl"
    recorded_week(events, {"control": 0.2, "candidate": 0.2}, users=6000, ja_candidate=0.4)
    # ja, a fifth of users, doubles: +20% overall, within the +25% the whole population may move
    plan = {
        "stages": [{"name": "canary", "percent": 50, "min_duration": "40h"}, {"name": "ramp", "percent": 100}],
        "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 0.25, "action": "rollback"}],
    }
    whole = replay(tmp_path, events, plan)
    assert "rollback" not in [d["action"] for d in whole["plan"]["decisions"]]
    out = replay(tmp_path, events, {**plan, "segments": ["locale"]})
    rollback = out["plan"]["decisions"][-1]
    assert rollback["action"] == "rollback" and "in locale=ja" in rollback["reason"], out["plan"]["decisions"]
