"""FlagClient on a real Kafka-protocol broker: rollback fan-out, the sync API from
threads, an unreachable broker at start, and the stale policies when it goes away."""

from __future__ import annotations

import asyncio
import threading
import time

from safeswap.core.assignment import assign
from safeswap.flags import FlagClient
from streams.broker import EmbeddedBroker, free_port
from streams.topics import ensure_topics
from tests.support.flags import USERS, raw
from tests.support.kafka import produce

CANDIDATES_AT_50 = [u for u in USERS[:400] if assign("r", u, 50) == "candidate"]


def all_candidates_served(flags: FlagClient) -> bool:
    return all(flags.variant("r", u) == "candidate" for u in CANDIDATES_AT_50)


def none_served(flags: FlagClient) -> bool:
    return not any(flags.variant("r", u) == "candidate" for u in CANDIDATES_AT_50)


def test_rollback_reaches_every_client_async_and_background(settings):
    topic = settings.topic("decisions")
    asyncio.run(produce(settings.broker, topic, [(b"r", raw(1, "promote", 50))]))
    background = [FlagClient(settings=settings).start_background() for _ in range(2)]

    async def scenario():
        clients = [await FlagClient(settings=settings).start() for _ in range(3)] + background
        try:
            assert all(all_candidates_served(flags) for flags in clients)
            switched_at: dict[int, float] = {}

            def watcher(index: int):
                def on_change(decision):
                    if decision.action == "rollback":
                        switched_at[index] = time.perf_counter()

                return on_change

            for index, flags in enumerate(clients):
                flags.on_change(watcher(index))
            sent = time.perf_counter()
            await produce(settings.broker, topic, [(b"r", raw(2, "rollback", 0))])
            deadline = time.perf_counter() + 10
            while not all(none_served(flags) for flags in clients) and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            return [none_served(flags) for flags in clients], sorted(t - sent for t in switched_at.values())
        finally:
            for flags in clients[:3]:
                await flags.stop()

    try:
        switched, latencies = asyncio.run(scenario())
    finally:
        for flags in background:
            flags.stop_background()
    assert switched == [True] * 5
    assert len(latencies) == 5
    print(f"rollback produce->variant switch per client (s): {[round(x, 3) for x in latencies]}")


def test_sync_api_from_threads_with_a_context_manager(settings):
    topic = settings.topic("decisions")
    asyncio.run(produce(settings.broker, topic, [(b"r", raw(1, "start", 5))]))
    early = [u for u in USERS[:2000] if assign("r", u, 5) == "candidate"]
    errors: list[str] = []
    stop = threading.Event()
    with FlagClient(settings=settings) as flags:  # a daemon thread with its own loop; no loop here
        assert flags.serving and flags.decision("r").seq == 1
        changes: list[int] = []
        flags.on_change(lambda d: changes.append(d.seq))

        def reader() -> None:
            while not stop.is_set():
                for u in early:  # along a monotone ramp a 5% user is always candidate
                    if flags.variant("r", u) != "candidate":
                        errors.append(u)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        for seq, percent in ((2, 10), (3, 25), (4, 50)):
            garbage = [(b"r", b"{not a decision")] if seq == 3 else []  # counted, state kept
            asyncio.run(produce(settings.broker, topic, garbage + [(b"r", raw(seq, "promote", percent))]))
            flags.wait_for_sync(lambda d, seq=seq: d.seq == seq, 10)
        stop.set()
        for thread in threads:
            thread.join()
        assert flags.decision("r").percent == 50 and changes == [2, 3, 4]
        assert flags.decode_errors == 1 and "undecodable" in flags.last_error
        thread_name = flags._thread.name
    assert errors == []
    assert thread_name not in {t.name for t in threading.enumerate()}  # stopped and joined


def test_unreachable_at_start_serves_control_then_catches_up_and_stale_policies_apply(tmp_path):
    port = free_port()
    from streams.settings import Settings

    settings = Settings(broker=f"127.0.0.1:{port}", topic_prefix="stale")
    hold = FlagClient(settings=settings, stale_policy="hold", max_staleness_s=1.0)
    control = FlagClient(settings=settings, stale_policy="control", max_staleness_s=1.0)
    broker = EmbeddedBroker(port=port)
    try:
        hold.start_background(catch_up_timeout_s=0.3)  # nothing listens yet
        assert not hold.serving and none_served(hold) and not hold.should_shadow("r", "u1")
        broker.start()
        asyncio.run(ensure_topics(settings))
        asyncio.run(produce(settings.broker, settings.topic("decisions"), [(b"r", raw(1, "promote", 50))]))
        control.start_background()
        hold.wait_for_sync(lambda d: d.seq == 1, 20)  # it kept retrying and found the state
        deadline = time.monotonic() + 10
        while not (hold.serving and all_candidates_served(hold)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all_candidates_served(hold) and all_candidates_served(control)
        assert hold.staleness_s() < 1.0 and control.staleness_s() < 1.0  # heartbeats without new messages
        time.sleep(1.5)
        assert not hold.is_stale() and not control.is_stale()  # idle but fresh: fetches keep answering

        broker.stop()  # the broker goes away
        deadline = time.monotonic() + 15
        while not (hold.is_stale() and control.is_stale()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hold.is_stale() and control.is_stale()
        assert all_candidates_served(hold)  # hold: the last known split
        assert none_served(control)  # control: everyone back to control
    finally:
        hold.stop_background()
        control.stop_background()
        broker.stop()
