"""Selection strategies (pure): determinism, Oort's utility ordering, exploration, fairness
and the representativeness cap under skewed check-ins."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.selection import Candidate, SelectionPolicy, oort_utility, rank, select

OORT = SelectionPolicy(strategy="oort", exploration=0.2)


def fleet(n: int, *, seen: bool = True) -> list[Candidate]:
    return [
        Candidate(
            device_id=f"d{i:03d}",
            examples=20 + 10 * (i % 7),
            device_class=["pi", "phone"][i % 2],
            data_bucket=5 + i % 3,
            last_selected=float(i),
            participations=i % 4,
            last_round=1 + i % 5 if seen else None,
            loss=2.0 + 0.1 * (i % 9) if seen else None,
            seconds=10.0 + i % 11 if seen else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("strategy", ["random", "least-recent", "oort"])
def test_selection_is_deterministic_per_seed(strategy: str) -> None:
    pol = SelectionPolicy(strategy=strategy)  # type: ignore[arg-type]
    cands = fleet(40)
    a = select(cands, 10, pol, seed=b"round-1", round_number=3)
    assert a == select(list(reversed(cands)), 10, pol, seed=b"round-1", round_number=3)
    assert len(a) == len(set(a)) == 10
    if strategy != "least-recent":
        assert a != select(cands, 10, pol, seed=b"round-2", round_number=3)


def test_least_recent_takes_the_longest_unselected() -> None:
    cands = fleet(20)
    assert select(cands, 5, SelectionPolicy(), seed=b"s", round_number=2) == [f"d{i:03d}" for i in range(5)]


def test_oort_utility_orders_constructed_cases() -> None:
    kw = {"max_stat": 100.0, "round_number": 10, "preferred": 20.0, "alpha": 2.0}
    base = Candidate("a", examples=50, loss=2.0, seconds=10.0, last_round=9)
    more_data = Candidate("b", examples=100, loss=2.0, seconds=10.0, last_round=9)
    higher_loss = Candidate("c", examples=50, loss=3.0, seconds=10.0, last_round=9)
    slow = Candidate("d", examples=100, loss=2.0, seconds=40.0, last_round=9)
    stale = Candidate("e", examples=50, loss=2.0, seconds=10.0, last_round=1)
    u = {c.device_id: oort_utility(c, **kw) for c in (base, more_data, higher_loss, slow, stale)}  # type: ignore[arg-type]
    assert u["b"] > u["a"] and u["c"] > u["a"] and u["e"] > u["a"]
    # twice as slow as preferred: (20/40)^2 = 1/4 of the same device's utility at full speed
    assert u["d"] == pytest.approx(u["b"] / 4)
    # and the ranking follows the utility for a clear winner
    cands = [base, more_data, higher_loss, slow, stale]
    wins = Counter(rank(cands, OORT, seed=bytes([i]), round_number=10, k=1)[0] for i in range(200))
    assert wins.most_common(1)[0][0] == max(u, key=u.__getitem__)


def test_exploration_keeps_picking_unseen_devices() -> None:
    seen = fleet(30)
    unseen = [Candidate(f"new{i}", examples=30) for i in range(10)]
    for r in range(5):
        picked = select(seen + unseen, 10, OORT, seed=bytes([r]), round_number=5 + r)
        assert sum(p.startswith("new") for p in picked) >= math.ceil(0.2 * 10)
    # without any history every slot explores
    assert len(select(unseen, 5, OORT, seed=b"x", round_number=1)) == 5


def test_every_eligible_device_keeps_a_chance() -> None:
    """The fairness floor: even a device with tiny utility is picked in some rounds."""
    cands = fleet(30)
    weak = Candidate("weak", examples=1, loss=0.01, seconds=500.0, last_round=1)
    hits = sum(
        "weak" in select([*cands, weak], 10, OORT, seed=bytes([i, 7]), round_number=20) for i in range(256)
    )
    assert hits > 0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(5, 60),
    k=st.integers(1, 20),
    share=st.floats(0.05, 0.95),
    skew=st.floats(0.5, 1.0),
    strategy=st.sampled_from(["random", "least-recent", "oort"]),
    stratum=st.sampled_from(["data_bucket", "device_class"]),
    seed=st.binary(min_size=1, max_size=8),
)
def test_the_stratum_cap_holds_under_skewed_checkins(
    n: int, k: int, share: float, skew: float, strategy: str, stratum: str, seed: bytes
) -> None:
    # a share `skew` of the check-ins come from one stratum
    heavy = int(n * skew)
    cands = [
        Candidate(
            f"d{i}",
            examples=30,
            data_bucket=1 if i < heavy else 2 + i % 3,
            device_class="pi" if i < heavy else f"c{i % 3}",
            loss=1.0 + i % 5 if i % 2 else None,
            seconds=5.0 + i,
            last_round=1,
        )
        for i in range(n)
    ]
    pol = SelectionPolicy(strategy=strategy, stratum=stratum, max_share=share)  # type: ignore[arg-type]
    picked = select(cands, k, pol, seed=seed, round_number=4)
    by = {c.device_id: (c.data_bucket if stratum == "data_bucket" else c.device_class) for c in cands}
    counts = Counter(by[p] for p in picked)
    cap = max(1, math.ceil(share * k))
    assert all(v <= cap for v in counts.values())
    assert len(picked) == len(set(picked)) <= k
    # the cap only removes what it must: as many as the strata allow
    avail = Counter(by.values())
    assert len(picked) == min(k, sum(min(cap, v) for v in avail.values()))


def test_straggler_rule_needs_the_quorum_and_the_quiet() -> None:
    from datetime import UTC, datetime, timedelta

    from coordinator.schemas import DeadlineSettings
    from coordinator.services.rounds import quiet_enough

    d = DeadlineSettings(quorum=0.9, quiet_seconds=2.0)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    old, fresh = now - timedelta(seconds=2.5), now - timedelta(seconds=1.0)
    assert quiet_enough("advertise_keys", 9, 10, old, d, now)
    assert quiet_enough("share_keys", 117, 130, old, d, now)  # ceil(0.9 * 130) = 117
    assert not quiet_enough("share_keys", 116, 130, old, d, now)  # below the quorum
    assert not quiet_enough("advertise_keys", 9, 10, fresh, d, now)  # answers still coming
    assert not quiet_enough("advertise_keys", 9, 10, None, d, now)
    assert not quiet_enough("masked_input", 10, 10, old, d, now)  # uploads keep their own rule
    assert not quiet_enough("advertise_keys", 9, 10, old, DeadlineSettings(quiet_seconds=0), now)
    naive = old.replace(tzinfo=None)  # SQLite hands back naive UTC datetimes
    assert quiet_enough("advertise_keys", 9, 10, naive, d, now)
