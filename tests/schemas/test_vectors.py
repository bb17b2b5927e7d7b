"""Conformance vectors: language-neutral JSON cases (``schemas/vectors/``) that any client,
in any language, can run to agree with safeswap: user bucketing, the key -> partition hash
emitters must use, session boundaries, and the sequential comparison and SRM test. This test
runs every case through the code the worker runs. Regenerate after an intended change:

    python -m tests.schemas.test_vectors --write
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[2] / "schemas" / "vectors"
FLOAT_TOLERANCE = 1e-9  # relative: the statistics are floating point in every language


def bucketing(case: dict[str, Any]) -> dict[str, Any]:
    from safeswap.core.assignment import assign, bucket

    return {
        "bucket": bucket(case["salt"], case["user_id"]),
        "variant": assign(case["salt"], case["user_id"], case["percent"]),
    }


def partitioning(case: dict[str, Any]) -> dict[str, Any]:
    from aiokafka.partitioner import murmur2

    # Kafka's default partitioner (murmur2, the Java client's): positive hash modulo partitions
    return {"partition": (murmur2(case["key"].encode()) & 0x7FFFFFFF) % case["partitions"]}


def sessions(case: dict[str, Any]) -> dict[str, Any]:
    from safeswap.core.sessions import closable_sessions

    return {
        "closed_sessions": [list(pair) for pair in closable_sessions(case["times"], case["watermark"], case["gap_ms"])]
    }


def sequential(case: dict[str, Any]) -> dict[str, Any]:
    from safeswap.core.stats import Proportion, Ratio, sequential_compare

    kind = {"proportion": Proportion, "ratio": Ratio}[case["kind"]]
    result = sequential_compare(
        kind(**case["control"]),
        kind(**case["candidate"]),
        alpha=case["alpha"],
        n_tune=case["n_tune"],
        difference=case["difference"],
        alternative=case["alternative"],
    )
    return {k: getattr(result, k) for k in ("estimate", "ci_low", "ci_high", "p_value")}


def srm(case: dict[str, Any]) -> dict[str, Any]:
    from safeswap.core.stats import srm_test

    result = srm_test(case["counts"], case["weights"])
    return {"p_value": result.p_value}


KINDS = {
    "bucketing": bucketing,
    "partitioning": partitioning,
    "sessions": sessions,
    "sequential": sequential,
    "srm": srm,
}

# The inputs of every case; expected outputs are computed by --write and checked by the test.
INPUTS: dict[str, list[dict[str, Any]]] = {
    "bucketing": [
        {"salt": salt, "user_id": user, "percent": percent}
        for salt in ("support-bot-sonnet", "support-bot-sonnet:shadow", "r1")
        for user in ("u-1", "user-42", "alice@example.com", "ユーザー7", "")
        for percent in (0, 0.01, 5, 50, 100)
    ],
    "partitioning": [
        {"key": key, "partitions": n}
        for key in ("u-1", "user-42", "alice@example.com", "ユーザー7", "a" * 100)
        for n in (1, 8, 12)
    ],
    "sessions": [
        {"times": [0, 60_000, 1_800_000 + 60_000, 1_800_000 + 61_000], "watermark": 10_000_000, "gap_ms": 1_800_000},
        {"times": [0, 1_799_999, 3_599_998], "watermark": 5_400_000, "gap_ms": 1_800_000},
        {"times": [0, 1_800_000], "watermark": 1_800_000, "gap_ms": 1_800_000},
        {"times": [0, 1_800_000], "watermark": 1_799_999, "gap_ms": 1_800_000},
        {"times": [5, 10], "watermark": 100, "gap_ms": 1_000},
    ],
    "sequential": [
        {
            "kind": "proportion",
            "control": {"n": 5000, "successes": 250},
            "candidate": {"n": 5000, "successes": 300},
            "alpha": 0.05,
            "n_tune": 5000,
            "difference": "relative",
            "alternative": "two-sided",
        },
        {
            "kind": "proportion",
            "control": {"n": 800, "successes": 40},
            "candidate": {"n": 200, "successes": 18},
            "alpha": 0.01,
            "n_tune": 2000,
            "difference": "absolute",
            "alternative": "greater",
        },
        {
            "kind": "ratio",
            "control": {
                "n_units": 1000,
                "num": 150.0,
                "num_sq": 260.0,
                "den": 3000.0,
                "den_sq": 11000.0,
                "num_den": 560.0,
            },
            "candidate": {
                "n_units": 1000,
                "num": 190.0,
                "num_sq": 330.0,
                "den": 2950.0,
                "den_sq": 10700.0,
                "num_den": 690.0,
            },
            "alpha": 0.05,
            "n_tune": 5000,
            "difference": "relative",
            "alternative": "two-sided",
        },
    ],
    "srm": [
        {"counts": [5000, 5000], "weights": [0.5, 0.5]},
        {"counts": [5200, 4800], "weights": [0.5, 0.5]},
        {"counts": [9400, 600], "weights": [0.95, 0.05]},
        {"counts": [900, 100], "weights": [0.5, 0.5]},
    ],
}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        if want is None or got is None:
            return want is got
        if math.isinf(want) or math.isinf(got):
            return want == got
        return math.isclose(got, want, rel_tol=FLOAT_TOLERANCE, abs_tol=1e-12)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return got == want


def load(kind: str) -> list[dict[str, Any]]:
    return json.loads((VECTORS / f"{kind}.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_case_agrees_with_the_code(kind):
    cases = load(kind)
    assert [{k: v for k, v in c.items() if k != "expected"} for c in cases] == INPUTS[kind]  # none lost or added
    wrong = [(case, KINDS[kind](case)) for case in cases if not same(KINDS[kind](case), case["expected"])]
    assert not wrong, wrong[:3]


def test_bucketing_vectors_follow_the_documented_formula_written_out_again():
    import hashlib

    for case in load("bucketing"):
        digest = hashlib.sha256(f"{case['salt']}:{case['user_id']}".encode()).hexdigest()
        bucket = int(digest[:16], 16) % 10_000  # the first 8 bytes, big-endian
        assert case["expected"]["bucket"] == bucket
        assert case["expected"]["variant"] == ("candidate" if bucket < round(case["percent"] * 100) else "control")


def test_the_vectors_cover_both_variants_and_several_partitions():
    variants = {case["expected"]["variant"] for case in load("bucketing")}
    assert variants == {"control", "candidate"}
    assert len({case["expected"]["partition"] for case in load("partitioning") if case["partitions"] == 12}) > 2


DESCRIPTIONS = {
    "bucketing": "bucket = first 8 bytes of SHA-256(salt + ':' + user_id) as a big-endian unsigned integer, "
    "modulo 10,000; candidate iff bucket < round(percent * 100). Shadow sampling uses salt + ':shadow'.",
    "partitioning": "Emitters key events by user_id: partition = (murmur2(utf-8 key) & 0x7fffffff) % partitions, "
    "Kafka's default partitioner (librdkafka: partitioner=murmur2_random).",
    "sessions": "closable_sessions(times, watermark, gap_ms): the leading sessions of sorted request times that the "
    "watermark has closed, as [first_index, last_index]; a session ends when the next request starts "
    ">= gap_ms after the previous one, and closes once watermark >= its last request + gap_ms.",
    "sequential": "sequential_compare(control, candidate, ...): the always-valid estimate, interval and p-value "
    "(docs/statistics.md); floats agree to a relative 1e-9.",
    "srm": "srm_test(counts, weights): the sequential sample-ratio-mismatch p-value (docs/statistics.md).",
}


def write() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    for kind, inputs in INPUTS.items():
        cases = [{**case, "expected": KINDS[kind](case)} for case in inputs]
        document = {"description": DESCRIPTIONS[kind], "cases": cases}
        (VECTORS / f"{kind}.json").write_text(
            json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"wrote {VECTORS / f'{kind}.json'}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.schemas.test_vectors --write")
    write()
