import os
import subprocess
import sys

from safeswap.core.assignment import BUCKETS, assign, bucket, in_candidate


def test_bucket_matches_the_documented_formula_computed_by_sha256sum():
    # An independent implementation (coreutils sha256sum) of the documented rule.
    out = subprocess.run(["sha256sum"], input=b"salt-1:user-42", capture_output=True, check=True).stdout
    expected = int(out.split()[0][:16], 16) % 10_000
    assert bucket("salt-1", "user-42") == expected


def test_buckets_are_uniform_within_one_percent_over_100k_ids():
    counts = [0] * 10
    for i in range(100_000):
        counts[bucket("rollout-a", f"user-{i}") * 10 // BUCKETS] += 1
    for count in counts:
        assert abs(count / 100_000 - 0.1) < 0.01, counts
    share_at_5 = sum(in_candidate("rollout-a", f"user-{i}", 5) for i in range(100_000)) / 100_000
    assert abs(share_at_5 - 0.05) < 0.01


def test_ramp_is_monotone_raising_the_percent_only_adds_users():
    users = [f"u{i}" for i in range(20_000)]
    previous: set[str] = set()
    for percent in (1, 5, 10, 50, 100):
        now = {u for u in users if in_candidate("s", u, percent)}
        assert previous <= now
        previous = now
    assert len(previous) == len(users)
    assert not any(in_candidate("s", u, 0) for u in users)


def test_different_salts_give_independent_assignments():
    a = {u for u in (f"u{i}" for i in range(20_000)) if in_candidate("salt-a", u, 50)}
    b = {u for u in (f"u{i}" for i in range(20_000)) if in_candidate("salt-b", u, 50)}
    overlap = len(a & b) / 20_000
    assert abs(overlap - 0.25) < 0.02


def test_identical_buckets_in_a_subprocess_with_another_hash_seed():
    ids = [f"user-{i}" for i in range(500)]
    here = [bucket("salt", u) for u in ids]
    code = "from safeswap.core.assignment import bucket; print([bucket('salt', f'user-{i}') for i in range(500)])"
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert eval(out.stdout) == here


def test_assign_names_the_variant():
    # The user exactly on the boundary: bucket 499 is in at 5% (< 500), out at 4.99% (< 499).
    user = next(u for u in (f"u{i}" for i in range(200_000)) if bucket("s", u) == 499)
    assert assign("s", user, 5) == "candidate"
    assert assign("s", user, 4.99) == "control"
