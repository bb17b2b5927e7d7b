"""The live source against a real broker: a record that decodes but cannot be shown is
counted and skipped (the feed goes on), and a read loop that fails reconnects, says so,
and resumes where it was (nothing folded in twice)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from schemas import Decision, encode
from tests.safeswap.dashboard.test_live import get_json, send_raw, wait_for
from tests.safeswap.dashboard.test_model import PLAN, snapshot

pytestmark = pytest.mark.integration


def produce(settings, records: list[tuple[str, bytes]]) -> None:
    asyncio.run(send_raw(settings, records, key=PLAN.rollout_id.encode()))


def decision(seq: int, action: str) -> bytes:
    return encode(
        Decision(
            rollout_id=PLAN.rollout_id,
            seq=seq,
            ts=1_000 + seq,
            action=action,
            stage="canary",
            percent=50.0,
            salt="s",
            reason=f"decision {seq}",
        )
    )


def snapshot_bytes(seq: int, counts=None) -> bytes:
    snap = snapshot(0, seq, 1_000 + seq * 600_000, 20 * seq, {"control": 0.1, "candidate": 0.12})
    if counts is not None:
        snap.metrics["control"]["latency_ms_p95"]["counts"] = counts
    return msgspec.json.encode(snap)


def test_bad_records_are_skipped_and_a_failed_read_loop_reconnects(settings, dashboard_factory):
    board = dashboard_factory(settings)
    source, model = board.state.live_source, board.state.model
    judgment = json.dumps({"rollout_id": PLAN.rollout_id, "winner": "candidate"}).encode()
    produce(
        settings,
        [
            ("plans", encode(PLAN)),
            ("stats", snapshot_bytes(2)),
            ("stats", snapshot_bytes(3, counts=[[1]])),  # decodes, but its histogram cannot be merged
            ("decisions", b"{not json"),
            ("judgments", judgment),
            ("decisions", decision(1, "start")),
            ("stats", snapshot_bytes(4)),
        ],
    )

    def track():
        return model.tracks.get(PLAN.rollout_id)

    assert wait_for(
        lambda: (
            track()
            and 1 in track().decisions
            and track().latest_snapshots.get(("", 0))
            and track().latest_snapshots[("", 0)].seq == 4
        )
    ), (source.error, source.undecodable)
    assert source.undecodable == 2 and source.error is None and not source._task.done()
    assert track().judgments["candidate"] == 1

    # The consumer stops under the loop (a broker gone, a fatal client error): the loop
    # must not die with the page still saying "live".
    asyncio.run_coroutine_threadsafe(source._consumer.stop(), board._loop).result(10)
    assert wait_for(lambda: source.restarts >= 1, timeout_s=15), source.error
    produce(settings, [("decisions", decision(2, "pause"))])
    assert wait_for(lambda: 2 in track().decisions and source.connected, timeout_s=30), source.error
    assert source.error is None and not source._task.done()
    assert track().judgments["candidate"] == 1  # resumed where it was, not from the beginning
    assert source.undecodable == 2
    status = get_json(board.url + "api/version")
    assert status["live"] and status["error"] is None and status["undecodable"] == 2 and status["restarts"] >= 1
