"""The privacy accountant (dp-accounting RDP) and the per-round noise plan, without I/O."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event, pld, rdp
from scipy import optimize, stats

from coordinator.privacy import (
    RoundCharge,
    calibrate_noise_multiplier,
    epsilon_spent,
    plan_round,
    sampling_rate,
    task_delta,
)
from coordinator.schemas import TaskConfig


def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle & Wang 2018: the exact epsilon of one Gaussian mechanism with multiplier z."""

    def gap(eps: float) -> float:
        return float(
            stats.norm.cdf(-eps * z + 1 / (2 * z))
            - math.exp(eps) * stats.norm.cdf(-eps * z - 1 / (2 * z))
            - delta
        )

    return float(optimize.brentq(gap, 1e-9, 100))


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 5.0])
def test_one_full_round_is_bounded_by_the_exact_gaussian_epsilon(z: float) -> None:
    delta = 1e-5
    exact = analytic_gaussian_epsilon(z, delta)
    ours = epsilon_spent([RoundCharge(1.0, z)], delta)
    # RDP is an upper bound, and not a loose one for a single Gaussian
    assert exact <= ours <= 1.35 * exact + 0.05


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.01, 1.1, 1000), (0.13, 0.8, 30), (0.5, 3.0, 100)])
def test_composition_matches_the_library_and_pld(q: float, z: float, rounds: int) -> None:
    delta = 1e-6
    ours = epsilon_spent([RoundCharge(q, z)] * rounds, delta)
    ref = rdp.RdpAccountant()  # the library's default orders
    ref.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=0.02)
    tight = pld.PLDAccountant()
    tight.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    assert tight.get_epsilon(delta) <= ours * 1.01  # PLD is tighter than RDP


def test_mixed_rounds_compose_in_any_order() -> None:
    a, b = RoundCharge(0.1, 1.0), RoundCharge(0.2, 2.0)
    assert epsilon_spent([a, b, a], 1e-5) == pytest.approx(epsilon_spent([a, a, b], 1e-5))
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent([a, a], 1e-5) > epsilon_spent([a], 1e-5)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_spends_at_most_the_target(target: float) -> None:
    q, rounds, delta = 13 / 473, 30, 473**-1.1
    z = calibrate_noise_multiplier(target, delta, q, rounds)
    assert epsilon_spent([RoundCharge(q, z)] * rounds, delta) <= target
    assert epsilon_spent([RoundCharge(q, z - 0.01)] * rounds, delta) > target * 0.98


def test_sampling_rate_and_delta() -> None:
    assert sampling_rate(13, None) == 1.0
    assert sampling_rate(13, 130) == pytest.approx(0.1)
    assert sampling_rate(13, 5) == 1.0
    assert task_delta(None, 1000) == pytest.approx(1000**-1.1)
    assert task_delta(1e-6, 1000) == 1e-6


def test_plan_splits_noise_between_devices_and_the_count() -> None:
    common = {"z": 1.0, "q": 0.1, "delta": 1e-5, "sensitivity": 500.0, "kept": 1000, "selected": 13}
    central = plan_round(mode="central", min_devices=5, count_std=None, **common)
    assert central.central_std == 500.0 and central.device_std == 0 and central.z == 1.0
    dist = plan_round(mode="distributed", min_devices=5, count_std=None, **common)
    assert dist.device_std == pytest.approx(500.0 / math.sqrt(5))  # 5 survivors carry z * Delta
    assert dist.z == pytest.approx(1.0)  # tau underflows at this scale
    adaptive = plan_round(mode="distributed", min_devices=4, count_std=10.0, **common)
    assert adaptive.z_update > 1.0 and adaptive.device_count_std == pytest.approx(5.0)
    small = plan_round(mode="distributed", min_devices=4, count_std=None, **{**common, "sensitivity": 1.0})
    assert small.z < 1.0  # per-device sigma 0.5: the DDG closeness term is charged


def test_task_config_refuses_inconsistent_privacy() -> None:
    base = {
        "codec": {"weight_cap": 1},
        "privacy": {"mode": "central", "noise_multiplier": 1.0, "delta": 1e-5},
    }
    TaskConfig.model_validate(base)
    with pytest.raises(ValueError, match="weight_cap"):
        TaskConfig.model_validate({**base, "codec": {"weight_cap": 16}})
    with pytest.raises(ValueError, match="secure aggregation"):
        TaskConfig.model_validate(
            {**base, "secagg": {"enabled": False}, "privacy": {**base["privacy"], "mode": "distributed"}}
        )
    with pytest.raises(ValueError, match="target_epsilon and max_rounds"):
        TaskConfig.model_validate(
            {**base, "privacy": {"mode": "central", "delta": 1e-5, "target_epsilon": 3}}
        )
    with pytest.raises(ValueError, match="delta or population"):
        TaskConfig.model_validate({**base, "privacy": {"mode": "central", "noise_multiplier": 1.0}})
