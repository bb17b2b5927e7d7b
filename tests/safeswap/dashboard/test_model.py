"""The dashboard's pure parts: merging, coalescing, the replayed looks, escaping, charts, access."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from safeswap.core.metrics import add_published, metric_values, variant_values
from safeswap.core.stats import LatencyHistogram, Ratio, stat_from_dict
from safeswap.dashboard.charts import interval_chart, stage_timeline, trend_chart
from safeswap.dashboard.model import DashboardModel, coalesce
from safeswap.dashboard.page import nav_html, page_html, rollout_html
from safeswap.dashboard.server import DashboardState, build_app, is_loopback
from schemas import Decision, RolloutPlan, StatsSnapshot

EVIL = '"><script>alert(1)</script>'
PLAN = RolloutPlan(
    rollout_id=EVIL,
    stakes="low",
    stages=[{"name": "canary", "percent": 50, "min_duration": "1h"}],
    min_users_per_arm=10,
    guardrails=[{"metric": "thumbs_down_rate", "max_relative_increase": 0.2}],
    candidate={"prompt_version": "<img src=x onerror=alert(2)>"},
)
PLAN = msgspec.convert(msgspec.to_builtins(PLAN), RolloutPlan)


def ratio(n: int, num: float, den: float) -> dict:
    # n users with equal mean shares and some spread between users
    a, b = num / n, den / n
    return Ratio(
        n_units=n, num=num, num_sq=n * a * a * 2.0 + n * 0.05, den=den, den_sq=n * b * b * 1.2, num_den=n * a * b * 1.1
    ).to_dict()


def snapshot(partition: int, seq: int, ts: int, users: int, down: dict[str, float]) -> StatsSnapshot:
    hist = LatencyHistogram.from_values([100.0 + i for i in range(50)]).to_dict()
    metrics = {
        v: {"thumbs_down_rate": ratio(users, down[v] * users * 3, users * 3), "latency_ms_p95": hist}
        for v in ("control", "candidate")
    }
    return StatsSnapshot(
        rollout_id=EVIL,
        partition=partition,
        seq=seq,
        ts=ts,
        users={"control": users, "candidate": users},
        metrics=metrics,
    )


def fed_model() -> DashboardModel:
    model = DashboardModel()
    model.add_snapshot(snapshot(0, 1, 1_000, 20, {"control": 0.1, "candidate": 0.1}))  # before its plan: held
    model.add_plan(PLAN, 500)
    for seq in range(2, 30):
        for partition in (0, 1):
            model.add_snapshot(
                snapshot(partition, seq, 1_000 + seq * 600_000, 20 * seq, {"control": 0.1, "candidate": 0.16})
            )
    model.add_decision(
        Decision(
            rollout_id=EVIL, seq=1, ts=500, action="start", stage="canary", percent=50, salt=EVIL, reason="started <b>"
        )
    )
    return model


def test_summed_snapshots_give_the_estimates_of_statistics_added_one_by_one():
    snaps = [snapshot(p, 1, 1, 10 + p, {"control": 0.1 + p / 10, "candidate": 0.2}) for p in range(3)]
    fast = variant_values(snaps)
    slow: dict = {}
    for snap in snaps:  # one validated statistic per partition, added: what the sums must equal
        for variant, metrics in snap.metrics.items():
            into = slow.setdefault(variant, {})
            for metric, data in metrics.items():
                stat = stat_from_dict(data)
                into[metric] = into[metric] + stat if metric in into else stat
    for variant in ("control", "candidate"):
        expected = metric_values(slow[variant])
        assert fast[variant]["thumbs_down_rate"] == pytest.approx(expected["thumbs_down_rate"])
        assert fast[variant]["latency_ms_p95"] == pytest.approx(expected["latency_ms_p95"])
        assert fast[variant]["latency_ms_p50"] < fast[variant]["latency_ms_p95"]
    assert add_published(snaps)["control"]["latency_ms_p95"]["counts"]  # histogram bins added up


def test_coalesce_keeps_the_newest_per_partition_in_order():
    snaps = [snapshot(p, seq, seq, 10, {"control": 0.1, "candidate": 0.1}) for seq in range(1, 7) for p in (0, 1)]
    kept = coalesce(snaps, 4)
    assert [(s.partition, s.seq) for s in kept] == [(0, 2), (1, 2), (0, 4), (1, 4), (0, 6), (1, 6)]
    assert coalesce(snaps, 1) == snaps


def test_replayed_looks_draw_the_interval_and_its_threshold():
    model = fed_model()
    view = model.view(EVIL)
    [guardrail] = view["guardrails"]
    assert guardrail["metric"] == "thumbs_down_rate" and guardrail["threshold"] == pytest.approx(0.2)
    assert len(guardrail["points"]) > 5, guardrail["points"]
    lows = [p["ci_low"] for p in guardrail["points"] if p["ci_low"] is not None]
    assert lows == sorted(lows)  # always-valid: the interval only shrinks
    assert guardrail["status"] in ("ok", "breach")
    assert view["variant_rows"][0]["values"]["control"] is not None  # latency p50
    assert view["trends"]["thumbs_down_rate"]["candidate"]
    json.dumps(view, allow_nan=False)  # the API's JSON is strict


def test_everything_from_events_is_escaped():
    model = fed_model()
    view = model.view(EVIL)
    html = page_html(
        nav_html(model.rollouts(), EVIL),
        rollout_html(view),
        selected=EVIL,
        source="test",
        live=True,
        version=model.version,
    )
    assert "<script>alert" not in html and "<img src=x" not in html and "started <b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 1  # only our own static script
    assert "%22%3E%3Cscript%3E" in html  # the link's rollout parameter is URL-encoded


def test_charts_are_svg_with_a_band_and_a_threshold_line():
    view = fed_model().view(EVIL)
    chart = interval_chart(view["guardrails"][0], view["decisions"])
    assert chart.startswith("<svg") and 'class="band"' in chart and 'class="threshold"' in chart
    empty = interval_chart({**view["guardrails"][0], "points": []}, [])
    assert "no interval yet" in empty
    assert "<path" in trend_chart("thumbs_down_rate", "thumbs-down", "rate", view["trends"]["thumbs_down_rate"], [])
    assert "<rect" in stage_timeline(view["decisions"], view["time_range"])


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def _with_client(state: DashboardState, check) -> None:
    async def run() -> None:
        async with TestClient(TestServer(build_app(state), host="127.0.0.1")) as client:
            await check(client)

    asyncio.run(run())


def test_token_is_required_when_set_and_sets_a_cookie():
    state = DashboardState(fed_model(), live=False, token="s3cret")

    async def check(client: TestClient) -> None:
        assert (await client.get("/api/rollouts")).status == 401
        assert (await client.get("/api/rollouts", headers={"Authorization": "Bearer wrong"})).status == 401
        ok = await client.get("/api/rollouts", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200 and (await ok.json())["rollouts"][0]["rollout_id"] == EVIL
        first = await client.get("/?token=s3cret")
        assert first.status == 200 and "HttpOnly" in first.headers.get("Set-Cookie", "")
        again = await client.get("/static/dashboard.js")  # the cookie is enough now
        assert again.status == 200

    _with_client(state, check)


def test_headers_forbid_foreign_scripts_and_api_answers():
    state = DashboardState(fed_model(), live=False)

    async def check(client: TestClient) -> None:
        page = await client.get("/")
        assert page.status == 200
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        view = await client.get("/api/rollouts/" + EVIL.replace('"', "%22").replace("<", "%3C").replace(">", "%3E"))
        assert view.status == 200 and (await view.json())["guardrails"][0]["metric"] == "thumbs_down_rate"
        assert (await client.get("/api/rollouts/nope")).status == 404
        fragment = await (await client.get("/fragment")).json()
        assert fragment["version"] == state.model.version and "<svg" in fragment["main"]
        for path, kind in (("/static/dashboard.css", "text/css"), ("/static/dashboard.js", "application/javascript")):
            response = await client.get(path)
            assert response.status == 200 and response.content_type == kind

    _with_client(state, check)


def test_a_gate_attached_to_a_registered_plan_is_replayed_like_the_controller_does():
    """rollout start may republish a high-stakes plan waiting in registered with its gate:
    the page must follow it out of registered, not keep the first, gateless plan."""
    from safeswap.core.evalgate import result_hash

    high = msgspec.structs.replace(PLAN, stakes="high")
    gate = {"passed": True, "stakes": "high", "lost_count": 0, "lost": []}
    gate["hash"] = result_hash(gate)
    model = DashboardModel()
    model.add_plan(high, 500)
    assert model.tracks[EVIL].replay.stage == "registered"
    model.add_plan(msgspec.structs.replace(high, eval_gate=gate), 600)
    track = model.tracks[EVIL]
    assert track.replay.stage == "canary" and track.plan.eval_gate == gate and track.plan_ts == 500


def test_without_a_live_status_the_cards_show_the_evidence_of_the_decision_that_was_made():
    # Recorded mode: the replay's coalesced looks may not clear the limit where the worker did;
    # the card must say what the worker saw when it decided, not the replay's last look.
    from schemas import GuardrailEvidence

    model = fed_model()
    evidence = GuardrailEvidence(
        metric="thumbs_down_rate",
        status="breach",
        estimate=0.9,
        ci_low=0.25,
        ci_high=1.5,
        p_value=0.001,
        threshold=0.2,
        users_control=800,
        users_candidate=400,
        reason="thumbs_down_rate +90.0% vs control exceeds the +20.0% limit",
    )
    model.add_decision(
        Decision(
            rollout_id=EVIL,
            seq=2,
            ts=20_000_000,
            action="rollback",
            stage="rolled_back",
            percent=0,
            salt=EVIL,
            reason="rolled back",
            evidence=[evidence],
        )
    )
    card = next(g for g in model.view(EVIL)["guardrails"] if g["metric"] == "thumbs_down_rate")
    assert (card["status"], card["ci_low"], card["ci_high"]) == ("breach", 0.25, 1.5)
    assert card["points"]  # the replayed interval over time is still drawn


def test_segment_guardrails_show_the_breached_segment_first_and_what_was_too_small():
    from schemas import GuardrailEvidence

    segmented = msgspec.convert({**msgspec.to_builtins(PLAN), "segments": ["locale"]}, RolloutPlan)
    model = DashboardModel()
    model.add_plan(segmented, 500)

    def row(segment: str, status: str, reason: str) -> GuardrailEvidence:
        return GuardrailEvidence(
            metric="thumbs_down_rate",
            status=status,
            estimate=0.6 if status == "breach" else None,
            ci_low=0.3 if status == "breach" else None,
            ci_high=0.9 if status == "breach" else None,
            p_value=None,
            threshold=0.2,
            users_control=900,
            users_candidate=300,
            reason=reason,
            segment=segment,
        )

    model.add_decision(
        Decision(
            rollout_id=EVIL,
            seq=2,
            ts=20_000_000,
            action="rollback",
            stage="rolled_back",
            percent=0,
            salt=EVIL,
            reason="thumbs_down_rate +60.0% vs control in locale=ja exceeds the +20.0% limit",
            segment_evidence=[
                row("locale=fr", "insufficient_data", "thumbs_down_rate in locale=fr: 20 control / 8 candidate users"),
                row("locale=ja", "breach", "thumbs_down_rate +60.0% vs control in locale=ja exceeds the +20.0% limit"),
            ],
        )
    )
    view = model.view(EVIL)
    segments = view["segment_guardrails"]
    assert segments["keys"] == ["locale"]
    assert [(r["segment"], r["status"]) for r in segments["rows"]] == [
        ("locale=ja", "breach"),
        ("locale=fr", "insufficient_data"),
    ]
    html = rollout_html(view)
    assert "Segment guardrails" in html and "locale=ja" in html and "8 candidate users" in html
    # a plan without segments shows no such section
    assert "Segment guardrails" not in rollout_html(fed_model().view(EVIL))


def live_judge_snapshot(seq: int, control: list[int], candidate: list[int], ts: int = 20_000_000) -> StatsSnapshot:
    from safeswap.core.live_scores import LiveScoreAccumulator

    accumulator = LiveScoreAccumulator()
    for variant, scores in (("control", control), ("candidate", candidate)):
        for user, score in enumerate(scores):
            accumulator.add_trace(variant, ts)
            accumulator.add_result(variant, "scored", f"{variant}{user}", score, 0.003)
    accumulator.add_trace("candidate", ts)
    accumulator.add_result("candidate", "budget")
    return StatsSnapshot(
        rollout_id=EVIL,
        partition=0,
        seq=seq,
        ts=ts,
        users={},
        metrics={},
        source="live_judge:w1",
        live_judge=accumulator.to_dict(),
    )


def test_the_judge_score_by_variant_section_shows_means_users_and_the_interval_as_monitored():
    model = fed_model()
    before = model.view(EVIL)
    assert before["live_judge"] == {}
    assert "No live judge scores" in rollout_html(before)
    looks = len(model.tracks[EVIL].looks)
    decisions = model.tracks[EVIL].replay.seq
    model.add_snapshot(live_judge_snapshot(1, [8, 9, 7] * 5, [2, 3] * 8))
    view = model.view(EVIL)
    live = view["live_judge"]
    assert live["variants"]["control"]["mean"] == pytest.approx(8.0) and live["variants"]["control"]["users"] == 15
    assert live["variants"]["candidate"]["mean"] == pytest.approx(2.5) and live["variants"]["candidate"]["scored"] == 16
    assert live["difference"]["ci_high"] < 0 and live["budget_skipped"] == 1
    # Shown, not decided on: no look, no decision of the replayed controller.
    assert len(model.tracks[EVIL].looks) == looks and model.tracks[EVIL].replay.seq == decisions
    html = rollout_html(view)
    assert "Judge score by variant (monitored, not a decision input)" in html
    assert "<td>8.00</td>" in html and "<td>2.50</td>" in html and "judge budget reached: 1 sampled" in html
    assert "never decide on it" in html
    json.dumps(view, allow_nan=False)


def test_recorded_stats_rows_carry_the_live_judge_scores_to_the_page(tmp_path):
    from safeswap.dashboard.sources import load_recorded
    from sinks.datasets import DATASETS
    from sinks.writer import Layout, write_rows

    stats, plans = DATASETS["stats"], DATASETS["plans"]
    write_rows(Layout(tmp_path), plans, 0, [plans.row(msgspec.json.encode(PLAN)) + (500,)])
    rows = [stats.row(msgspec.json.encode(snapshot(0, 2, 600_000, 40, {"control": 0.1, "candidate": 0.1})))]
    rows.append(stats.row(msgspec.json.encode(live_judge_snapshot(1, [6, 7, 8], [5, 6, 7]))))
    write_rows(Layout(tmp_path), stats, 0, rows)
    live = load_recorded(tmp_path).view(EVIL)["live_judge"]
    assert live["variants"]["control"]["mean"] == pytest.approx(7.0) and live["variants"]["candidate"]["users"] == 3
