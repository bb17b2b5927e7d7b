"""Against a real worker after a simulated rollout: the live and the recorded dashboard
show the same rollout, the worker's /metrics speaks Prometheus, and a headless Chromium
renders the page from 127.0.0.1 alone and sees it change without a reload."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from safeswap.tools.rollouts import command_rollout
from streams.kafka import client_options
from tests.safeswap.dashboard.browser import save, visit_page

# one simulated rollout (the module fixture) serves every test here, in one xdist process
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("dashboard_live")]


def get_json(url: str, token: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout_s: float = 30.0, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


def quoted(rollout_id: str) -> str:
    return urllib.parse.quote(rollout_id, safe="")


def test_live_and_recorded_show_the_same_rollout(simulated, dashboard_factory):
    settings, plan, result = simulated["settings"], simulated["plan"], simulated["result"]
    live = dashboard_factory(settings)
    recorded = dashboard_factory(settings, data_dir=settings.data_dir)
    seqs = [d.seq for d in result["decisions"]]

    def live_view():
        view = get_json(live.url + "api/rollouts/" + quoted(plan.rollout_id)) if live.state.model.tracks else None
        return (
            view
            if view and [d["seq"] for d in view["decisions"]][: len(seqs)] == seqs and view["status_live"]
            else None
        )

    live_now = wait_for(live_view)
    assert live_now, get_json(live.url + "api/rollouts")
    recorded_now = get_json(recorded.url + "api/rollouts/" + quoted(plan.rollout_id))
    assert [d["seq"] for d in recorded_now["decisions"]] == seqs
    assert [d["action"] for d in recorded_now["decisions"]] == [d["action"] for d in live_now["decisions"][: len(seqs)]]
    for view in (live_now, recorded_now):
        metrics = [g["metric"] for g in view["guardrails"]]
        assert metrics == ["thumbs_down_rate", "latency_ms_p95_cache_hit", "latency_ms_p95_cache_miss"]
        assert any(g["points"] for g in view["guardrails"]), "no interval over time"
        rows = {row["key"]: row["values"] for row in view["variant_rows"]}
        for key in (
            "latency_ms_p50",
            "latency_ms_p95",
            "cost_usd_mean",
            "cost_per_session_mean",
            "error_rate",
            "thumbs_down_rate",
            "retry_rate",
            "abandon_rate",
        ):
            assert rows[key]["control"] is not None and rows[key]["candidate"] is not None, key
        assert view["split"]["percent"] == 30 and view["variants"]["candidate"]["prompt_version"] == "v42<img src=x>"
        # candidate vs control with its interval (the estimate inside it), or none
        differences = {row["key"]: row["difference"] for row in view["variant_rows"]}
        found = differences["thumbs_down_rate"]
        assert found["ci_low"] <= found["estimate"] <= found["ci_high"] and found["alpha"] == 0.05, found
        assert differences["latency_ms_p95"] is None
    # The recorded statistics keep the exposure cohorts: the replay compares what the worker compared.
    track = recorded.state.model.tracks[plan.rollout_id]
    assert all(s.cohorts for (source, _), s in track.latest_snapshots.items() if not source)
    listing = get_json(recorded.url + "api/rollouts")["rollouts"]
    assert [r["rollout_id"] for r in listing] == [plan.rollout_id]
    # The page escapes the rollout id, description and prompt version that came from events.
    with urllib.request.urlopen(recorded.url, timeout=10) as response:
        html = response.read().decode()
    assert "<b>bold</b>" not in html and "<img src=x>" not in html and "alert('x')</script>" not in html
    assert "dash-&lt;b&gt;bold&lt;/b&gt;" in html


def test_worker_metrics_endpoint(simulated):
    settings, plan = simulated["settings"], simulated["plan"]
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    asyncio.run(send_raw(settings, [("traces", b"{not json")], key=b"metrics-test-user"))  # a known dead letter

    def scrape():
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        lagging = (
            {s.labels.get("agent") for s in families["safeswap_consumer_lag_messages"].samples}
            if "safeswap_consumer_lag_messages" in families
            else set()
        )
        letters = (
            {
                (s.labels["agent"], s.labels["reason"])
                for s in families["safeswap_dead_letters"].samples
                if s.name == "safeswap_dead_letters_total"
            }
            if "safeswap_dead_letters" in families
            else set()
        )
        seen[:] = [lagging, letters]
        return families if {"outcomes", "sink", "decide"} <= lagging and ("outcomes", "invalid") in letters else None

    seen: list = []
    families = wait_for(scrape, timeout_s=30)
    assert families, f"after 30 s: lag of {seen[0]}, dead letters {seen[1]} (want outcomes, sink, decide; invalid)"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    processed = {labels: v for (name, labels), v in samples.items() if name == "safeswap_events_processed_total"}
    traces = settings.topic("traces")
    by_agent = {dict(labels)["agent"]: v for labels, v in processed.items() if dict(labels)["topic"] == traces}
    assert by_agent.get("outcomes", 0) > 0 and by_agent.get("sink", 0) > 0  # each reader counted on its own
    assert (
        sum(
            v
            for labels, v in processed.items()
            if dict(labels) == {"topic": settings.topic("stats"), "agent": "decide"}
        )
        > 0
    )
    for name in ("safeswap_consumer_lag", "safeswap_consumer_lag_messages"):
        lag = [dict(labels) for (n, labels), v in samples.items() if n == name and v >= 0]
        assert {"topic": traces, "partition": "0", "agent": "sink"} in lag, (name, lag)
    assert samples[("safeswap_dead_letters_total", (("agent", "outcomes"), ("reason", "invalid")))] >= 1
    started = samples[("safeswap_decisions_total", (("action", "start"), ("rollout_id", plan.rollout_id)))]
    assert started >= 1
    threshold = samples[
        ("safeswap_guardrail_threshold", (("metric", "thumbs_down_rate"), ("rollout_id", plan.rollout_id)))
    ]
    assert threshold == pytest.approx(0.5)
    assert ("safeswap_guardrail_ci_low", (("metric", "thumbs_down_rate"), ("rollout_id", plan.rollout_id))) in samples
    assert samples[("safeswap_rollout_percent", (("rollout_id", plan.rollout_id),))] == 30
    assert samples[("safeswap_rollout_candidate_ratio", (("rollout_id", plan.rollout_id),))] == pytest.approx(0.3)

    def sample(name: str, **labels) -> float:
        return samples[(name, tuple(sorted({"rollout_id": plan.rollout_id, **labels}.items())))]

    for variant in ("control", "candidate"):

        def value(name: str, **labels) -> float:
            return sample(name, variant=variant, **labels)  # noqa: B023 - called within this iteration

        assert 0 < value("safeswap_variant_metric", metric="thumbs_down_rate") < 1
        assert value("safeswap_variant_rate_ratio", metric="thumbs_down_rate") == value(
            "safeswap_variant_metric", metric="thumbs_down_rate"
        )
        assert value("safeswap_variant_latency_seconds", quantile="0.95") == pytest.approx(
            value("safeswap_variant_metric", metric="latency_ms_p95") / 1000
        )
        assert value("safeswap_variant_cost_usd", per="response") == value(
            "safeswap_variant_metric", metric="cost_usd_mean"
        )
        assert value("safeswap_variant_cost_usd", per="session") == value(
            "safeswap_variant_metric", metric="cost_per_session_mean"
        )


async def send_raw(settings, records: list[tuple[str, bytes]], key: bytes) -> None:
    """Raw records (topic name without prefix, value) as a client would send them, in order."""
    producer = AIOKafkaProducer(**client_options(settings))
    await producer.start()
    try:
        for topic, value in records:
            await producer.send_and_wait(settings.topic(topic), value, key=key)
    finally:
        await producer.stop()


def test_browser_renders_offline_and_updates_without_reload(simulated, dashboard_factory):
    settings, plan = simulated["settings"], simulated["plan"]
    live = dashboard_factory(settings)
    assert wait_for(
        lambda: plan.rollout_id in live.state.model.tracks and live.state.model.tracks[plan.rollout_id].looks
    )

    async def steer(call):
        # The page is loaded; now the operator aborts, and the page must show it by itself.
        await command_rollout(settings, plan.rollout_id, "abort", "browser test", wait_s=20)
        for _ in range(150):
            found = await call(
                "Runtime.evaluate",
                returnByValue=True,
                expression="document.getElementById('main').innerText.includes('aborted by an operator')",
            )
            if found["result"]["value"]:
                return
            await asyncio.sleep(0.2)
        raise AssertionError("the page did not show the abort without a reload")

    # A dead letter, and the events counted beside it: the page shows the DLQ by reason and rate.
    asyncio.run(send_raw(settings, [("traces", b"{not json either")], key=b"browser-test-user"))
    letters = live.state.model.dead_letters
    assert wait_for(lambda: letters.by_kind.get("invalid") and letters.events, timeout_s=60), letters
    visit = visit_page(live.url + "?rollout=" + quoted(plan.rollout_id), settle=steer)
    assert visit.requests, "chromium made no request"
    foreign = [u for u in visit.requests if not u.startswith("http://127.0.0.1:")]
    assert not foreign, f"requests that left 127.0.0.1: {foreign}"
    assert not visit.failed, visit.failed
    assert not visit.console_errors, visit.console_errors
    charts = visit.charts
    assert charts["svg"] >= 5 and charts["nonempty"] >= 4 and charts["bands"] >= 1 and charts["thresholds"] >= 1
    for url in charts["urls"]:
        assert not url.startswith(("http:", "https:", "//")) or url.startswith("http://127.0.0.1"), url
    pages = [u for u in visit.requests if urllib.parse.urlparse(u).path == "/"]
    assert len(pages) == 1, pages  # loaded once, never reloaded
    assert any(urllib.parse.urlparse(u).path == "/fragment" for u in visit.requests)  # the live refresh
    assert "dash-<b>bold</b>" in charts["text"]  # shown as text, not markup
    # What on-call reads: no label cut off; one event-time range on every chart, the current stage
    # shaded on each; decisions in event-time order; every interval whole; health checks with
    # their threshold and status; dead letters by reason with the rate.
    assert not charts["clipped"], charts["clipped"]
    assert len(set(charts["ranges"])) == 1 and len(charts["ranges"]) >= charts["nonempty"], charts["ranges"]
    assert charts["current_stage"] == len(charts["ranges"]) - 1  # every chart but the timeline shades it
    assert charts["decision_times"] == sorted(charts["decision_times"]), charts["decision_times"]
    assert ", -]" not in charts["text"] and "[-, " not in charts["text"]
    assert "candidate vs control" in charts["text"] and "always-valid 95% interval" in charts["text"]
    checks = {row[0]: row for row in charts["health_rows"]}
    assert set(checks) == {"srm", "crossover", "model_drift", "event_loss", "cache_skew"}, checks
    for _check, _value, threshold, status, on_failure in checks.values():
        assert threshold and status in ("ok", "problem", "flagged", "not checked") and on_failure, checks
    assert checks["srm"][2] == "p < 0.001" and checks["srm"][3] in ("ok", "problem")
    kinds = {row[0]: row for row in charts["dead_letter_rows"]}
    assert "invalid" in kinds and int(kinds["invalid"][1].replace(",", "")) >= 1, kinds
    assert "undecodable TraceEvent" in kinds["invalid"][4]
    assert "events apps wrote" in charts["text"] and "Flagged above 1%" in charts["text"]
    assert visit.screenshot.startswith(b"\x89PNG") and len(visit.screenshot) > 20_000
    save(visit.screenshot, Path(simulated["root"]) / "dashboard.png")
