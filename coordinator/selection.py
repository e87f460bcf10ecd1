"""Participant selection strategies (pure functions; the coordinator feeds them candidates).

Every strategy ranks the eligible devices that checked in during the selection window; the
round takes the first ``k`` of the ranking that fit the representativeness cap
(:func:`select`). Rankings are deterministic for a given round seed.

- ``random``: a uniform random order (the baseline).
- ``least-recent``: least recently selected first, then fewest participations.
- ``oort`` (Lai et al., OSDI 2021, "Oort: Efficient Federated Learning via Guided Participant
  Selection"): devices seen before are ranked by utility: statistical utility
  ``examples * loss`` (the loss the device reported before training on its data: the
  gradient-norm proxy of the paper, which needs only what devices already report), normalised
  by the largest among the candidates, plus the staleness bonus
  ``sqrt(0.1 * ln(round) / last_round)``, times the system penalty
  ``(T / duration)^alpha`` for devices slower than the preferred round duration ``T``
  (``duration`` = seconds from selection to the device's upload, as the coordinator measured
  it). A share ``exploration`` of the slots goes to devices never seen. Instead of a hard
  top-k, devices are drawn by weighted sampling without replacement (Efraimidis-Spirakis keys)
  with weights floored at ``min_weight`` of the largest: the best devices are almost always
  picked, and every eligible device keeps a non-zero chance (the fairness guard).

Representativeness: with ``stratum`` set (``data_bucket``: log2 bucket of the device's local
example count; ``device_class``), no stratum gets more than ``ceil(max_share * k)`` of the
``k`` slots, however skewed the check-ins; the round then selects fewer rather than break it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Candidate", "SelectionPolicy", "oort_utility", "rank", "select"]

Strategy = Literal["random", "least-recent", "oort"]


@dataclass(frozen=True)
class SelectionPolicy:
    strategy: Strategy = "least-recent"
    exploration: float = 0.2
    speed_penalty: float = 2.0  # alpha
    preferred_seconds: float | None = None  # T; None = median duration of the known candidates
    min_weight: float = 0.01
    stratum: Literal["none", "data_bucket", "device_class"] = "none"
    max_share: float = 1.0


@dataclass(frozen=True)
class Candidate:
    device_id: str
    examples: int
    device_class: str = "unknown"
    data_bucket: int = 0
    last_selected: float = 0.0  # timestamp; 0 = never selected
    participations: int = 0
    last_round: int | None = None  # round number of the device's last report
    loss: float | None = None  # loss before local training, last report
    seconds: float | None = None  # selection-to-upload seconds, last upload


def _unit(seed: bytes, device_id: str) -> float:
    """A uniform number in (0, 1) from the round seed and the device id."""
    h = hashlib.sha256(seed + device_id.encode()).digest()
    return (int.from_bytes(h[:8], "big") + 0.5) / 2**64


def _preferred(cands: Sequence[Candidate], policy: SelectionPolicy) -> float | None:
    if policy.preferred_seconds is not None:
        return policy.preferred_seconds
    known = sorted(c.seconds for c in cands if c.seconds is not None and c.seconds > 0)
    return known[len(known) // 2] if known else None


def oort_utility(
    c: Candidate, *, max_stat: float, round_number: int, preferred: float | None, alpha: float
) -> float:
    """Oort's utility of a device seen before (see the module docstring)."""
    stat = c.examples * (c.loss or 0.0) / max_stat if max_stat > 0 else 0.0
    if c.last_round is not None and c.last_round > 0 and round_number > 1:
        stat += math.sqrt(0.1 * math.log(round_number) / c.last_round)
    if preferred is not None and c.seconds is not None and c.seconds > preferred:
        stat *= (preferred / c.seconds) ** alpha
    return stat


def rank(
    cands: Sequence[Candidate], policy: SelectionPolicy, *, seed: bytes, round_number: int, k: int
) -> list[str]:
    """All candidates' ids, most wanted first."""
    if policy.strategy == "random":
        return [c.device_id for c in sorted(cands, key=lambda c: _unit(seed, c.device_id))]
    if policy.strategy == "least-recent":
        return [
            c.device_id
            for c in sorted(
                cands, key=lambda c: (c.last_selected, c.participations, _unit(seed, c.device_id))
            )
        ]
    if policy.strategy != "oort":
        raise ValueError(f"unknown selection strategy {policy.strategy!r}")
    seen = [c for c in cands if c.loss is not None]
    unseen = sorted((c for c in cands if c.loss is None), key=lambda c: _unit(seed, c.device_id))
    explore = min(len(unseen), math.ceil(policy.exploration * k)) if seen else len(unseen)
    max_stat = max((c.examples * (c.loss or 0.0) for c in seen), default=0.0)
    preferred = _preferred(cands, policy)
    util = {
        c.device_id: oort_utility(
            c, max_stat=max_stat, round_number=round_number, preferred=preferred, alpha=policy.speed_penalty
        )
        for c in seen
    }
    top = max(util.values(), default=0.0)
    floor = policy.min_weight * top if top > 0 else 1.0
    # Efraimidis-Spirakis: key u^(1/w), largest first, is weighted sampling without replacement.
    # Unseen devices beyond the exploration share compete with the mean weight.
    mean = sum(util.values()) / len(util) if util else 1.0
    rest = seen + unseen[explore:]

    def key(c: Candidate) -> float:
        w = max(util.get(c.device_id, mean), floor)
        return math.log(_unit(seed, c.device_id)) / w

    ranked = [c.device_id for c in unseen[:explore]]
    ranked += [c.device_id for c in sorted(rest, key=key, reverse=True)]
    return ranked


def select(
    cands: Sequence[Candidate], k: int, policy: SelectionPolicy, *, seed: bytes, round_number: int
) -> list[str]:
    """The ids of up to ``k`` devices: the ranking, filtered by the stratum cap."""
    order = rank(cands, policy, seed=seed, round_number=round_number, k=k)
    if policy.stratum == "none" or policy.max_share >= 1:
        return order[:k]
    by_id = {c.device_id: c for c in cands}
    cap = max(1, math.ceil(policy.max_share * k))
    taken: Counter[object] = Counter()
    out = []
    for dev in order:
        c = by_id[dev]
        s = c.data_bucket if policy.stratum == "data_bucket" else c.device_class
        if taken[s] < cap:
            taken[s] += 1
            out.append(dev)
            if len(out) == k:
                break
    return out
