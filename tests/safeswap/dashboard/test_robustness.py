"""Bad event data costs its own part of the page, never the page: out-of-range times,
health problems that are not dicts, snapshots whose histogram cannot be merged, a
section that cannot render; and model drift reads as a share per variant."""

from __future__ import annotations

import msgspec
import pytest

from safeswap.core.controller import health_checks
from safeswap.core.metrics import model_drift_text
from safeswap.dashboard.model import DashboardModel
from safeswap.dashboard.page import rollout_html
from safeswap.dashboard.server import DashboardState
from schemas import Decision, HealthSpec
from tests.safeswap.dashboard.test_model import EVIL, _with_client, fed_model, snapshot

BAD = "!bad-rollout"  # sorts first: it is the rollout `/` shows


def malformed(model: DashboardModel) -> DashboardModel:
    """A rollout whose decision claims a time no calendar holds and whose health has odd entries."""
    model.add_decision(
        Decision(
            rollout_id=BAD,
            seq=1,
            ts=10**19,
            action="pause",
            stage="canary",
            percent=5.0,
            salt="s",
            reason="odd <i>",
            health={
                "problems": ["not a dict <b>", 3, {"reason": "srm mismatch"}],
                "srm_p_value": "nan?",
                "model_drift": {"candidate": 0.032, "control": 0.0},
                "cache_skew": ["not", "a", "dict"],
            },
        )
    )
    return model


def test_a_malformed_rollout_still_serves_the_page():
    state = DashboardState(malformed(fed_model()), live=True)

    async def check(client) -> None:
        page = await client.get("/")
        html = await page.text()
        assert page.status == 200, html[:500]
        assert "!bad-rollout" in html and "could not render" not in html
        assert "ts 10000000000000000000" in html  # the time it claims, as a number
        assert "not a dict &lt;b&gt;" in html and '<li class="bad">3</li>' in html and "srm mismatch" in html
        assert "control 0.0%, candidate 3.2%" in html
        fragment = await client.get("/fragment")
        assert fragment.status == 200 and "!bad-rollout" in (await fragment.json())["main"]
        other = await client.get("/", params={"rollout": EVIL})
        assert other.status == 200 and "<svg" in await other.text()

    _with_client(state, check)


def test_a_section_that_cannot_render_shows_why_and_the_others_render():
    view = fed_model().view(EVIL)
    broken_guardrail = {k: v for k, v in view["guardrails"][0].items() if k != "scale"}
    html = rollout_html({**view, "judge": None, "guardrails": [broken_guardrail, view["guardrails"][0]]})
    assert html.count("could not render") == 2
    assert '<h3>judge preference</h3><p class="bad">could not render: TypeError' in html
    assert "could not render: KeyError: &#x27;scale&#x27;" in html
    # The rest of the page is there: summary, timeline, the good guardrail's interval, variants, health.
    assert 'class="summary"' in html and "stage timeline" in html and 'class="band"' in html
    assert "Per variant" in html and "Data health" in html


def test_model_drift_reads_as_a_share_per_variant():
    assert model_drift_text({"candidate": 0.25, "control": 0.001}) == "control 0.1%, candidate 25.0%"
    assert model_drift_text({}) == "none" and model_drift_text(None) == "none"
    view = fed_model().view(EVIL)
    health = {"model_drift": {"control": 0.5}}
    html = rollout_html({**view, "health": health, "health_checks": health_checks(health, HealthSpec())})
    assert "control 50.0%" in html and "{" not in html.split("Data health")[1]


def test_a_snapshot_that_cannot_be_merged_is_refused_and_leaves_the_rollout_as_it_was():
    model = fed_model()
    track = model.tracks[EVIL]
    looks, current = len(track.looks), msgspec.to_builtins(track.current)
    bad = snapshot(0, 100, 1_000 + 100 * 600_000, 2_000, {"control": 0.1, "candidate": 0.2})
    bad.metrics["control"]["latency_ms_p95"]["counts"] = [[1]]
    with pytest.raises(ValueError, match="cannot be merged"):
        model.add_snapshot(bad)
    assert len(track.looks) == looks and track.current == current
    good = snapshot(0, 101, 1_000 + 101 * 600_000, 2_000, {"control": 0.1, "candidate": 0.2})
    model.add_snapshot(good)  # the bad one did not stay among the latest: the next one folds in
    assert len(track.looks) == looks + 1 and track.latest_snapshots[("", 0)].seq == 101
