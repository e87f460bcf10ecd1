"""The privacy accountant (dp-accounting RDP) and the per-round noise plan, without I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from dp_accounting import dp_event, pld, rdp
from dp_accounting.privacy_accountant import NeighboringRelation
from scipy import optimize, stats

from coordinator.db.migrate import upgrade
from coordinator.db.models import Round, Task
from coordinator.db.session import make_engine, make_sessionmaker
from coordinator.dp_plan import (
    RoundCharge,
    adjusted_charge,
    calibrate_noise_multiplier,
    epsilon_spent,
    plan_round,
    sampling_rate,
    task_delta,
)
from coordinator.schemas import TaskConfig
from coordinator.services.privacy_budget import charges, privacy_plan
from protocol.codec import CodecParams, kept_count, quant_range
from protocol.dp import level_sensitivity


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
    common: dict[str, Any] = {
        "adjacency": "replace-one",
        "z": 1.0,
        "q": 0.1,
        "delta": 1e-5,
        "sensitivity": 500.0,
        "kept": 1000,
        "selected": 13,
    }
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
    with pytest.raises(ValueError, match="min_examples"):  # the weight slot carries no noise
        TaskConfig.model_validate({**base, "eligibility": {"min_examples": 0}})


def dp_task(mode: str, **privacy: Any) -> TaskConfig:
    return TaskConfig.model_validate(
        {
            "codec": {"weight_cap": 1, "clip_norm": 1.0, "bits": 8, "keep_fraction": 0.25},
            "privacy": {"mode": mode, "noise_multiplier": 0.9, "delta": 1e-5, **privacy},
        }
    )


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_replace_one_is_the_default_and_doubles_the_noise(mode: str) -> None:
    """The coordinator knows the cohort: neighbours differ in one device's data, which moves
    the sum by up to twice one device's bound, and the noise follows for the same z."""
    d = 5000
    codec = CodecParams(
        clip_norm=1.0, bits=8, keep_fraction=0.25, max_clients=13, seed=b"s" * 32, weight_cap=1
    )
    default = privacy_plan(dp_task(mode), codec, d)
    add_remove = privacy_plan(dp_task(mode, adjacency="add-remove"), codec, d)
    m = kept_count(codec, d)
    bound = level_sensitivity(1.0, 8, quant_range(codec, d), m, adjacency="add-remove")
    assert default.adjacency == "replace-one" and default.to_json()["adjacency"] == "replace-one"
    assert default.sensitivity == pytest.approx(2 * bound)
    assert add_remove.sensitivity == pytest.approx(bound)
    assert default.z_update == add_remove.z_update == 0.9
    noise = "central_std" if mode == "central" else "device_std"
    assert getattr(default, noise) == pytest.approx(2 * getattr(add_remove, noise))
    survivors = 1 if mode == "central" else 3  # distributed: min_reports devices carry it all
    assert getattr(default, noise) == pytest.approx(0.9 * 2 * bound / math.sqrt(survivors))


@pytest.mark.parametrize(("q", "z", "rounds"), [(1.0, 1.0, 1), (0.13, 0.6, 20), (0.01, 1.1, 1000)])
def test_the_charge_bounds_the_replace_one_epsilon(q: float, z: float, rounds: int) -> None:
    """Replace-one with Poisson sampling: the tight epsilon of the pair (1-q) N(0) + q N(+-Delta)
    with noise z * 2 Delta (dp-accounting's PLD, REPLACE_ONE, noise in units of Delta) is below
    what the accountant charges (add/remove at sensitivity 2 Delta); equal up to RDP's slack
    at q = 1."""
    delta = 1e-5
    ours = epsilon_spent([RoundCharge(q, z)] * rounds, delta)
    tight = pld.PLDAccountant(NeighboringRelation.REPLACE_ONE)
    tight.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(2 * z)), rounds)
    replace_one = tight.get_epsilon(delta)
    assert replace_one <= ours
    if q == 1.0:
        assert ours <= 1.15 * replace_one


def test_adjusted_charge_restates_the_multiplier() -> None:
    c = RoundCharge(0.1, 1.2)
    # an add/remove round carries noise z Delta = (z / 2) 2 Delta
    assert adjusted_charge(c, "add-remove", "replace-one") == RoundCharge(0.1, 0.6)
    assert adjusted_charge(c, "replace-one", "replace-one") == c
    assert adjusted_charge(c, "add-remove", "add-remove") == c
    assert adjusted_charge(c, "replace-one", "add-remove") == c  # conservative (clip count)


def test_charges_restate_earlier_rounds_for_the_current_relation(db_url: str) -> None:
    """Rounds planned before the adjacency setting (no ``adjacency`` in their plan) were
    calibrated to one device's bound: under replace-one they count at half their multiplier."""
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        now = datetime.now(UTC)
        with make_sessionmaker(engine)() as session, session.begin():
            task = Task(name="kb", config={}, created_at=now, updated_at=now)
            session.add(task)
            session.flush()
            plans: list[dict[str, Any]] = [
                {"dp": {"q": 0.1, "z": 1.0}},  # before the setting
                {"dp": {"q": 0.1, "z": 1.0, "adjacency": "add-remove"}},
                {"dp": {"q": 0.1, "z": 1.0, "adjacency": "replace-one"}},
                {},  # not a DP round: never charged
            ]
            for number, plan in enumerate(plans, 1):
                dp = plan.get("dp")
                session.add(
                    Round(
                        task_id=task.id,
                        number=number,
                        stage="done",
                        base_version=0,
                        plan=plan,
                        created_at=now,
                        stage_started_at=now,
                        stage_deadline=now,
                        selection_target=4,
                        metrics={},
                        dp_q=dp and dp["q"],
                        dp_z=dp and dp["z"],
                    )
                )
            session.flush()
            assert sorted(c.z for c in charges(session, task.id, "replace-one")) == [0.5, 0.5, 1.0]
            assert sorted(c.z for c in charges(session, task.id, "add-remove")) == [1.0, 1.0, 1.0]
    finally:
        engine.dispose()
