"""Server optimizers against their papers' update rules, step by step over several rounds
(float64 references; the optimizers keep float32 state)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.optimizers import FedAdam, FedAvg, FedAvgM, make_optimizer, scheduled_lr
from coordinator.schemas import ServerOptimizer, TaskConfig


def _deltas(seed: int, rounds: int, d: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 0.1, d) * rng.choice([0.01, 1.0, 3.0])).astype(np.float32) for _ in range(rounds)]


def _run(opt: FedAvg | FedAvgM | FedAdam, w0: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    w, state, out = w0, {}, []
    for delta in deltas:
        w, state = opt.step(w, delta, state)
        assert w.dtype == np.float32 and all(v.dtype == np.float32 for v in state.values())
        out.append(w)
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lr=st.floats(0.05, 2.0), rounds=st.integers(1, 6))
def test_fedavg_is_w_plus_lr_times_the_mean_delta(seed: int, lr: float, rounds: int) -> None:
    """McMahan et al. 2017: ``w_{t+1} = w_t + lr * delta_t``."""
    deltas = _deltas(seed, rounds)
    w0 = np.random.default_rng(seed + 1).normal(size=64).astype(np.float32)
    ref = w0.astype(np.float64)
    for delta, got in zip(deltas, _run(FedAvg(lr), w0, deltas), strict=True):
        ref = ref + lr * delta.astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    lr=st.floats(0.05, 2.0),
    beta=st.floats(0.0, 0.99),
    rounds=st.integers(1, 6),
)
def test_fedavgm_is_server_momentum(seed: int, lr: float, beta: float, rounds: int) -> None:
    """Hsu, Qi & Brown 2019: ``v_t = beta * v_{t-1} + delta_t`` (``v_0 = delta_0``),
    ``w_{t+1} = w_t + lr * v_t``."""
    deltas = _deltas(seed, rounds)
    w0 = np.random.default_rng(seed + 1).normal(size=64).astype(np.float32)
    ref, v = w0.astype(np.float64), np.zeros(64)
    for delta, got in zip(deltas, _run(FedAvgM(lr, beta), w0, deltas), strict=True):
        v = beta * v + delta.astype(np.float64)
        ref = ref + lr * v
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    lr=st.floats(1e-3, 0.5),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.999),
    tau=st.floats(1e-4, 1e-1),
    rounds=st.integers(1, 6),
)
def test_fedadam_is_adam_on_the_pseudo_gradient_without_bias_correction(
    seed: int, lr: float, beta1: float, beta2: float, tau: float, rounds: int
) -> None:
    """Reddi et al. 2021, Algorithm 2 (FedAdam): ``m_t = b1 m_{t-1} + (1 - b1) delta_t``,
    ``v_t = b2 v_{t-1} + (1 - b2) delta_t^2``, ``w_{t+1} = w_t + lr m_t / (sqrt(v_t) + tau)``,
    with ``m_0 = v_0 = 0`` and no bias correction."""
    deltas = _deltas(seed, rounds)
    w0 = np.random.default_rng(seed + 1).normal(size=64).astype(np.float32)
    ref, m, v = w0.astype(np.float64), np.zeros(64), np.zeros(64)
    opt = FedAdam(lr, beta1, beta2, tau)
    for delta, got in zip(deltas, _run(opt, w0, deltas), strict=True):
        d = delta.astype(np.float64)
        m = beta1 * m + (1 - beta1) * d
        v = beta2 * v + (1 - beta2) * d * d
        ref = ref + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_fedadam_first_step_moves_each_coordinate_by_about_lr_times_one_minus_beta1() -> None:
    """With v_0 = 0 the first step is ``lr (1 - b1) delta / (sqrt(1 - b2) |delta| + tau)``:
    about ``lr (1 - b1) / sqrt(1 - b2)`` per coordinate for deltas far above tau."""
    opt = FedAdam(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-6)
    delta = np.array([0.5, -2.0, 1e-1], dtype=np.float32)
    w, _ = opt.step(np.zeros(3, np.float32), delta, {})
    np.testing.assert_allclose(w, 0.01 * 0.1 / np.sqrt(0.01) * np.sign(delta), rtol=1e-3)


@pytest.mark.parametrize(("name", "kind"), [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedadam", FedAdam)])
def test_make_optimizer_follows_the_task_setting(name: str, kind: type) -> None:
    cfg = ServerOptimizer.model_validate({"name": name, "lr": 0.3, "momentum": 0.5, "beta1": 0.8})
    opt = make_optimizer(cfg)
    assert isinstance(opt, kind) and opt.lr == 0.3
    if isinstance(opt, FedAvgM):
        assert opt.momentum == 0.5
    if isinstance(opt, FedAdam):
        assert (opt.beta1, opt.beta2, opt.tau) == (0.8, cfg.beta2, cfg.tau)


@settings(max_examples=50, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    f=st.floats(0.01, 1.0),
    rounds=st.integers(1, 200),
    step=st.integers(0, 400),
)
def test_cosine_schedule_is_the_sgdr_formula(lr: float, f: float, rounds: int, step: int) -> None:
    """Loshchilov & Hutter 2017 without restarts: ``lr (f + (1 - f)(1 + cos(pi k / (T - 1))) / 2)``,
    from ``lr`` at the first step to ``f * lr`` at step T - 1 and after; never rising."""
    cfg = ServerOptimizer(name="fedadam", lr=lr, schedule="cosine", final_lr_fraction=f)
    k = min(step, rounds - 1)
    ref = lr * (f + (1 - f) * (1 + np.cos(np.pi * k / max(rounds - 1, 1))) / 2)
    got = scheduled_lr(cfg, step, rounds)
    assert got == pytest.approx(ref, rel=1e-9)
    assert f * lr * (1 - 1e-9) <= got <= lr * (1 + 1e-9)
    assert scheduled_lr(cfg, step + 1, rounds) <= got * (1 + 1e-12)
    assert scheduled_lr(cfg, 0, rounds) == pytest.approx(lr)
    if rounds > 1:
        assert scheduled_lr(cfg, rounds - 1, rounds) == pytest.approx(f * lr)


def test_a_constant_schedule_and_no_length_keep_the_rate() -> None:
    const = ServerOptimizer(name="fedadam", lr=0.01)
    cosine = const.model_copy(update={"schedule": "cosine"})
    assert scheduled_lr(const, 30, 40) == scheduled_lr(cosine, 30, None) == 0.01
    with pytest.raises(ValueError, match="numbered from 0"):
        scheduled_lr(cosine, -1, 40)


def test_make_optimizer_takes_the_scheduled_rate() -> None:
    cfg = ServerOptimizer(name="fedadam", lr=0.02, schedule="cosine", final_lr_fraction=0.1)
    opt = make_optimizer(cfg, step=39, rounds=40)
    assert isinstance(opt, FedAdam) and opt.lr == pytest.approx(0.002)


def test_a_task_with_a_schedule_needs_its_length() -> None:
    """The schedule runs over ``schedule_rounds``, else the task's ``max_rounds``; with neither
    it is refused where the task is configured (a 422 at the admin API), not at aggregation."""
    opt = {"name": "fedadam", "lr": 0.02, "schedule": "cosine"}
    with pytest.raises(ValidationError, match="schedule_rounds or max_rounds"):
        TaskConfig.model_validate({"server_optimizer": opt})
    assert TaskConfig.model_validate({"server_optimizer": opt, "max_rounds": 40}).schedule_rounds == 40
    both = {"server_optimizer": {**opt, "schedule_rounds": 25}, "max_rounds": 40}
    assert TaskConfig.model_validate(both).schedule_rounds == 25
    assert TaskConfig.model_validate({"max_rounds": 40}).schedule_rounds is None
