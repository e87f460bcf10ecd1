"""Privacy accounting for DP tasks, on Google's ``dp-accounting`` (RDP accountant).

Each training round that reaches aggregation is one Gaussian mechanism with noise multiplier
``z`` (noise over the sensitivity of the task's adjacency relation, see :mod:`protocol.dp`; the
joint multiplier of the update and, with adaptive clipping, the clip-count query:
:func:`protocol.dp.combined_noise_multiplier`), applied to a cohort sampled with probability
``q``. The accountant composes ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round and
converts to ``(epsilon, delta)``.

Adjacency. Under ``replace-one`` (the default) the noise is calibrated to the sensitivity
``2 Delta`` and the accountant charges the add/remove Poisson-subsampled Gaussian at that
sensitivity. At ``q = 1`` the two coincide exactly (the Gaussian's divergence depends only on
the distance ``2 Delta`` between the neighbouring sums). At ``q < 1`` the replace-one pair of
Poisson sampling is the mixtures ``(1-q) N(0) + q N(+-Delta)``, whose tight epsilon
(``dp-accounting``'s PLD accountant with ``REPLACE_ONE``) is below the charged one: tested in
tests/coordinator/test_privacy.py (e.g. 1.08 against 1.71 for q = 0.01, z = 1.1, 1000 rounds).
Under ``add-remove`` the sensitivity is ``Delta`` and the charge is the usual one (Mironov,
Talwar & Zhang 2019). A round's charge records the relation it was calibrated for
(``PrivacyPlan.adjacency``; rounds from before the setting existed were calibrated for
``Delta``); :func:`adjusted_charge` restates it for the task's current relation.

Sampling assumption: ``q = ceil(K * over_selection) / population`` with ``population`` the
number of devices the operator declares for the task. Amplification by sampling needs (a) each
device of a fixed population to take part independently with probability ``q`` (Poisson
sampling) and (b) the outcome of that sampling to stay hidden from the adversary. Neither
holds exactly: the coordinator takes eligible devices that check in, least recently used
first, with a cooldown, and it knows whom it selected. So ``q < 1`` is an approximation (the
same caveat as Gboard's DP-FedAvg deployments) whose epsilon speaks to observers of the
released models, not to the coordinator. It would be exact with devices that self-select with a
local coin of probability ``q`` (Balle et al. 2020, "Privacy amplification via random
check-ins") and a release that hides the cohort. Against the coordinator the honest charge is
``q = 1``, which is what a task without a declared population gets: no amplification, every
round charged in full, valid for any selection.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from dp_accounting import dp_event, rdp
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism

from protocol.dp import ADJACENCY_FACTOR, Adjacency, ddg_tau, update_noise_multiplier

__all__ = [
    "PrivacyPlan",
    "RoundCharge",
    "adjusted_charge",
    "calibrate_noise_multiplier",
    "epsilon_spent",
    "plan_round",
    "sampling_rate",
    "task_delta",
    "task_noise_multiplier",
]


def _quiet_convergence(record: logging.LogRecord) -> bool:
    # The library's fractional-order series does not converge for some (q, z); it says so at
    # WARNING and drops that order (the others still bound epsilon). Keep the logs readable.
    return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_quiet_convergence)


def _new_accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant()  # the library's default orders


@dataclass(frozen=True)
class RoundCharge:
    """One round's mechanism: sampling rate and joint noise multiplier."""

    q: float
    z: float


def sampling_rate(selected: int, population: int | None) -> float:
    """``q`` for the accountant: the selected share of the population (1 when unknown)."""
    if population is None:
        return 1.0
    if population < 1:
        raise ValueError("population must be >= 1")
    return min(1.0, selected / population)


def _accountant(charges: Iterable[RoundCharge]) -> rdp.RdpAccountant:
    acc = _new_accountant()
    for c, count in Counter(charges).items():
        if c.z <= 0 or not 0 < c.q <= 1:
            raise ValueError(f"invalid round charge {c}")
        acc.compose(dp_event.PoissonSampledDpEvent(c.q, dp_event.GaussianDpEvent(c.z)), count)
    return acc


def epsilon_spent(charges: Iterable[RoundCharge], delta: float) -> float:
    """epsilon at ``delta`` after composing ``charges`` (0 for none)."""
    charges = list(charges)
    if not charges:
        return 0.0
    return float(_accountant(charges).get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    """Smallest noise multiplier (to 1e-3) with which ``rounds`` rounds at sampling rate ``q``
    stay within ``(target_epsilon, delta)``."""
    if target_epsilon <= 0 or not 0 < delta < 1 or rounds < 1:
        raise ValueError("calibration needs target_epsilon > 0, 0 < delta < 1, rounds >= 1")

    def event(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds
        )

    z = calibrate_dp_mechanism(
        _new_accountant,
        event,
        target_epsilon,
        delta,
        ExplicitBracketInterval(1e-2, 1e3),
        tol=1e-3,
    )
    return float(math.ceil(z * 1000) / 1000)


# ----------------------------------------------------------------------------------------
# A round's noise, from the task configuration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise of one DP round (all standard deviations in quantization levels)."""

    mode: str
    adjacency: Adjacency
    """The relation the sensitivity (and so ``z``) refers to."""
    z: float
    """Joint noise multiplier the accountant charges (update, clip count, DDG closeness)."""
    z_update: float
    q: float
    delta: float
    sensitivity: float
    """Of the update sum under ``adjacency`` (protocol.dp.level_sensitivity)."""
    central_std: float
    """central: the coordinator's Gaussian noise on every kept coordinate of the sum."""
    central_count_std: float
    device_std: float
    """distributed: each device's discrete Gaussian noise (total over ``min_devices``
    survivors: ``z_update * sensitivity``)."""
    device_count_std: float
    count_std: float | None
    """Total noise of the clip count (adaptive clipping), None without it."""
    min_devices: int

    def to_json(self) -> dict[str, float | int | str | None]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def task_delta(delta: float | None, population: int | None) -> float:
    if delta is not None:
        return delta
    if population is None:
        raise ValueError("delta or population is needed")
    return float(population**-1.1)


@lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    return calibrate_noise_multiplier(target_epsilon, delta, q, rounds)


def task_noise_multiplier(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    q: float,
    max_rounds: int | None,
) -> float:
    """The configured multiplier, or the one that spends ``target_epsilon`` in ``max_rounds``."""
    if noise_multiplier is not None:
        return noise_multiplier
    if target_epsilon is None or max_rounds is None:
        raise ValueError("noise_multiplier, or target_epsilon and max_rounds, are needed")
    return _calibrated(target_epsilon, delta, q, max_rounds)


def plan_round(
    *,
    mode: str,
    adjacency: Adjacency,
    z: float,
    q: float,
    delta: float,
    sensitivity: float,
    kept: int,
    selected: int,
    min_devices: int,
    count_std: float | None,
) -> PrivacyPlan:
    """Split a round's noise between the update and the clip count, and between devices.

    ``sensitivity``: of the update sum under ``adjacency``. ``min_devices``: fewest inputs with
    which the round still commits (the sum carries at least that many devices' noise in the
    distributed mode). The charged multiplier includes the distributed discrete Gaussian's
    distance from a discrete Gaussian (Kairouz et al. 2021, Theorem 1: ``eps^2 = 1/z^2 + 2 tau
    d``) for up to ``selected`` summed devices.
    """
    z_update = update_noise_multiplier(z, count_std)
    total = z_update * sensitivity
    if mode not in ("central", "distributed"):
        raise ValueError(f"unknown privacy mode {mode!r}")
    central = mode == "central"
    root = math.sqrt(min_devices)
    device_std = 0.0 if central else total / root
    device_count_std = 0.0 if central else (count_std or 0.0) / root
    if not central:
        inv = z_update**-2 + 2 * ddg_tau(device_std, selected) * kept
        if count_std is not None:
            inv += count_std**-2 + 2 * ddg_tau(device_count_std, selected)
        z = 1 / math.sqrt(inv)
    return PrivacyPlan(
        mode=mode,
        adjacency=adjacency,
        z=z,
        z_update=z_update,
        q=q,
        delta=delta,
        sensitivity=sensitivity,
        central_std=total if central else 0.0,
        central_count_std=(count_std or 0.0) if central else 0.0,
        device_std=device_std,
        device_count_std=device_count_std,
        count_std=count_std,
        min_devices=min_devices,
    )


def adjusted_charge(charge: RoundCharge, charged: Adjacency, current: Adjacency) -> RoundCharge:
    """A round calibrated for the relation ``charged``, as a charge under ``current``.

    Its noise is ``z * F(charged) * Delta`` (``F``: :data:`protocol.dp.ADJACENCY_FACTOR`), i.e.
    ``z * F(charged) / F(current)`` times the current sensitivity: an add/remove round is worth
    half its multiplier under replace-one. The other way the multiplier is kept: the clip count
    has sensitivity 1 under both, so doubling the joint multiplier would overstate it, and
    keeping it is conservative.
    """
    ratio = ADJACENCY_FACTOR[charged] / ADJACENCY_FACTOR[current]
    return RoundCharge(charge.q, charge.z * min(1.0, ratio))
