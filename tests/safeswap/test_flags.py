"""FlagClient serving rules, fed through apply() (no broker): ramps, pause, rollback,
shadow, bad input, staleness policies, and concurrent readers."""

from __future__ import annotations

import math
import threading

import pytest

from safeswap.core.assignment import assign, bucket
from safeswap.flags import FlagClient
from streams.settings import Settings
from tests.support.flags import USERS, raw


def client(**kwargs) -> FlagClient:
    return FlagClient(settings=Settings(broker="unused:1"), **kwargs)


def candidates(flags: FlagClient, rollout_id: str = "r") -> set[str]:
    return {u for u in USERS if flags.variant(rollout_id, u) == "candidate"}


def test_ramp_is_sticky_and_monotone_5_10_50_then_complete():
    flags = client()
    flags.apply(raw(1, "start", 5))
    at5 = candidates(flags)
    flags.apply(raw(2, "promote", 10))
    at10 = candidates(flags)
    flags.apply(raw(3, "promote", 50))
    at50 = candidates(flags)
    assert at5 <= at10 <= at50  # every 5% user is still in the candidate at 10% and 50%
    for share, users in ((5, at5), (10, at10), (50, at50)):
        assert abs(len(users) / len(USERS) - share / 100) < 0.01
    # The client serves exactly the bucketing contract.
    assert all(flags.variant("r", u) == assign("r", u, 50) for u in USERS[:2000])
    flags.apply(raw(4, "complete", 100))
    assert candidates(flags) == set(USERS)  # complete: the candidate is the new version for everyone


def test_pause_holds_the_split_and_resume_continues():
    flags = client()
    flags.apply(raw(1, "start", 5))
    flags.apply(raw(2, "promote", 25))
    before = candidates(flags)
    flags.apply(raw(3, "pause", 25))
    assert candidates(flags) == before
    assert flags.decision("r").stage == "paused"
    flags.apply(raw(4, "resume", 25))
    assert candidates(flags) == before


def test_rollback_serves_control_to_everyone_whatever_its_percent():
    flags = client()
    flags.apply(raw(1, "promote", 50))
    assert candidates(flags)
    flags.apply(raw(2, "rollback", 50))  # even if a buggy controller left the percent
    assert candidates(flags) == set()
    flags.apply(raw(3, "hold", 50, stage="rolled_back"))
    assert candidates(flags) == set()
    assert not any(flags.should_shadow("r", u) for u in USERS[:2000])


def test_shadow_selects_about_shadow_percent_and_not_the_canary_users():
    flags = client()
    flags.apply(raw(1, "start", 0, stage="shadow", shadow_percent=20))
    shadowed = {u for u in USERS if flags.should_shadow("r", u)}
    assert abs(len(shadowed) / len(USERS) - 0.20) < 0.01
    assert candidates(flags) == set()  # shadow serves control
    # Distinct salt derivation: the users the canary would take at 20% are not the shadowed ones.
    canary20 = {u for u in USERS if assign("r", u, 20) == "candidate"}
    overlap = len(shadowed & canary20) / len(USERS)
    assert abs(overlap - 0.20 * 0.20) < 0.01  # independent: about 4%, not 20%
    # The documented contract: bucket(salt + ":shadow", user) < shadow_percent * 100.
    assert shadowed == {u for u in USERS if bucket("r:shadow", u) < 2000}


def test_shadow_never_picks_users_served_the_candidate():
    flags = client()
    flags.apply(raw(1, "start", 10, shadow_percent=30))
    for u in USERS[:3000]:
        if flags.variant("r", u) == "candidate":
            assert not flags.should_shadow("r", u)
    assert not flags.should_shadow("unknown", "u1")


def test_undecodable_and_invalid_decisions_are_counted_and_the_state_is_kept():
    flags = client()
    flags.apply(raw(1, "start", 10))
    good = candidates(flags)
    for bad in (
        b"{not json",
        b'{"rollout_id": "r"}',
        b"[]",
        raw(2, "promote", 150),
        raw(3, "promote", -1),
        b'{"rollout_id":"r","seq":5,"percent":"x"}',
    ):
        assert flags.apply(bad) is None
    assert flags.decode_errors == 6 and flags.last_error
    assert flags.decision("r").seq == 1 and candidates(flags) == good
    assert flags.stats()["decode_errors"] == 6


def test_older_sequence_numbers_are_ignored_and_tombstones_remove_the_rollout():
    flags = client()
    flags.apply(raw(5, "promote", 50))
    assert flags.apply(raw(4, "rollback", 0)) is None
    assert flags.ignored_older == 1 and flags.decision("r").seq == 5
    flags.apply(None, key=b"r")
    assert flags.decision("r") is None and flags.variant("r", "user-1") == "control"
    assert flags.tombstones == 1
    flags.apply(None)  # a tombstone without a key is bad input
    assert flags.decode_errors == 1


def test_on_change_listeners_see_each_new_decision_once_and_can_be_removed():
    flags = client()
    seen, failing = [], []
    remove = flags.on_change(lambda d: seen.append(d.seq))
    flags.on_change(lambda d: failing.append(1 / 0))  # a failing listener does not stop the others
    flags.apply(raw(1))
    flags.apply(raw(1))  # duplicate
    flags.apply(raw(2, "promote", 10))
    remove()
    flags.apply(raw(3, "promote", 20))
    assert seen == [1, 2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("policy", ["hold", "control"])
def test_stale_state_follows_the_configured_policy(policy):
    clock = FakeClock()
    flags = client(stale_policy=policy, max_staleness_s=30, clock=clock)
    flags.apply(raw(1, "promote", 50, shadow_percent=10))
    assert flags.staleness_s() == 0.0 and not flags.is_stale()  # not tracked: fed by apply() only
    flags.mark_fresh()
    served = candidates(flags)
    clock.now += 29
    assert not flags.is_stale() and candidates(flags) == served
    clock.now += 2  # 31 s since the last successful fetch
    assert flags.is_stale() and flags.stats()["stale"]
    if policy == "hold":
        assert candidates(flags) == served  # a broker blip does not flip a 50% ramp back
        assert any(flags.should_shadow("r", u) for u in USERS[:1000])
    else:
        assert candidates(flags) == set()
        assert not any(flags.should_shadow("r", u) for u in USERS[:1000])
    flags.mark_fresh()  # the broker answers again
    assert candidates(flags) == served


def test_staleness_is_infinite_when_tracked_but_never_fresh_and_policy_is_validated():
    flags = client()
    flags._tracking = True  # as after start() against an unreachable broker
    assert math.isinf(flags.staleness_s())
    with pytest.raises(ValueError):
        client(stale_policy="sometimes")
    with pytest.raises(ValueError):
        client(max_staleness_s=0)


def test_many_threads_read_while_decisions_are_applied():
    """Readers never see a torn state: along a monotone ramp a 5% user is always candidate,
    and each answer matches one of the decisions' splits."""
    flags = client()
    flags.apply(raw(1, "start", 5))
    users = USERS[:500]
    early = [u for u in users if assign("r", u, 5) == "candidate"]
    never = [u for u in users if assign("r", u, 90) == "control"]
    assert early and never
    stop = threading.Event()
    errors: list[str] = []
    reads = [0] * 8

    def reader(index: int) -> None:
        while not stop.is_set():
            for u in early:
                if flags.variant("r", u) != "candidate":
                    errors.append(f"{u} left the candidate")
            for u in never:
                if flags.variant("r", u) != "control":
                    errors.append(f"{u} entered the candidate")
            flags.should_shadow("r", users[index])
            reads[index] += len(early) + len(never)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    seen: list[int] = []
    flags.on_change(lambda d: seen.append(d.seq))

    def writer(offset: int) -> None:  # two writer threads race; seq order still wins
        for seq in range(2 + offset, 400, 2):
            flags.apply(raw(seq, "promote", 5 + (seq % 85)))  # anything between 5% and 89%

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(count > 0 for count in reads)
    assert flags.decision("r").seq == 399 and seen == sorted(seen)  # listeners in decision order
