"""The privacy budget of DP tasks in the database: charges per round, status, refusals."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.models import Round, Task
from coordinator.dp_plan import (
    PrivacyPlan,
    RoundCharge,
    adjusted_charge,
    epsilon_spent,
    plan_round,
    sampling_rate,
    task_delta,
    task_noise_multiplier,
)
from coordinator.round_plan import plan_of
from coordinator.schemas import PrivacyStatus, TaskConfig
from protocol.codec import CodecParams, kept_count, quant_range
from protocol.dp import ADJACENCY_FACTOR, Adjacency, level_sensitivity, update_noise_multiplier
from protocol.wire import Outcome, RoundKind

__all__ = ["charge", "charges", "check", "current_clip", "privacy_plan", "privacy_status", "refusal"]


def _rates(cfg: TaskConfig) -> tuple[float, float, float]:
    """(q, delta, joint z) of the task's configuration."""
    dp = cfg.privacy
    q = sampling_rate(cfg.selection_size, dp.population)
    delta = task_delta(dp.delta, dp.population)
    z = task_noise_multiplier(dp.noise_multiplier, dp.target_epsilon, delta, q, cfg.max_rounds)
    return q, delta, z


def count_noise(cfg: TaskConfig, z: float) -> float | None:
    """Total noise of the clip count: configured, or Andrew et al.'s K/20 but at least 3 z
    (the count must be noisier than the joint multiplier; at 3 z the update's own multiplier
    grows by 6%)."""
    dp = cfg.privacy
    if not dp.adaptive_clip:
        return None
    return dp.count_noise if dp.count_noise is not None else max(cfg.clients_per_round / 20, 3 * z)


def check(cfg: TaskConfig) -> None:
    """Refuse (DPError / ValueError, answered 422) privacy settings no round could honour."""
    if not cfg.privacy.enabled:
        return
    _, _, z = _rates(cfg)
    update_noise_multiplier(z, count_noise(cfg, z))


def privacy_plan(cfg: TaskConfig, codec: CodecParams, d: int) -> PrivacyPlan:
    """The noise of the task's next round with these (noise-free) codec parameters."""
    q, delta, z = _rates(cfg)
    kept = kept_count(codec, d)
    adjacency = cfg.privacy.adjacency
    sens = level_sensitivity(codec.clip_norm, codec.bits, quant_range(codec, d), kept, adjacency=adjacency)
    return plan_round(
        mode=cfg.privacy.mode,
        adjacency=adjacency,
        z=z,
        q=q,
        delta=delta,
        sensitivity=sens,
        kept=kept,
        selected=codec.max_clients,
        min_devices=max(2, cfg.min_reports),
        count_std=count_noise(cfg, z),
    )


_LEGACY_ADJACENCY: Adjacency = "add-remove"
"""Rounds planned before the adjacency setting existed were calibrated to one device's bound."""


def charges(session: Session, task_id: int, adjacency: Adjacency) -> list[RoundCharge]:
    """The task's charged rounds, each restated for the relation ``adjacency``
    (:func:`coordinator.dp_plan.adjusted_charge`)."""
    rows = session.execute(
        select(Round.dp_q, Round.dp_z, Round.plan[("dp", "adjacency")].as_string()).where(
            Round.task_id == task_id, Round.dp_z.is_not(None)
        )
    ).all()
    out = []
    for q, z, charged in rows:
        if q is not None and z is not None:
            rel = charged if charged in ADJACENCY_FACTOR else _LEGACY_ADJACENCY
            out.append(adjusted_charge(RoundCharge(float(q), float(z)), rel, adjacency))
    return out


def charge(rnd: Round) -> None:
    """Record the round's mechanism once the coordinator can compute its noisy sum."""
    dp = plan_of(rnd).dp
    if dp is not None and rnd.dp_z is None:
        rnd.dp_q = dp.q
        rnd.dp_z = dp.z


def privacy_status(
    session: Session, task: Task, cfg: TaskConfig, *, next_z: float | None = None
) -> PrivacyStatus | None:
    if not cfg.privacy.enabled:
        return None
    q, delta, z = _rates(cfg)
    spent = charges(session, task.id, cfg.privacy.adjacency)
    eps = epsilon_spent(spent, delta)
    after = epsilon_spent([*spent, RoundCharge(q, next_z or z)], delta)
    target = cfg.privacy.target_epsilon
    return PrivacyStatus(
        mode=cfg.privacy.mode,
        noise_multiplier=z,
        sampling_rate=q,
        delta=delta,
        epsilon_spent=eps,
        rounds_charged=len(spent),
        target_epsilon=target,
        epsilon_after_next_round=after,
        exhausted=target is not None and after > target * (1 + 1e-9),
    )


def refusal(session: Session, task: Task, cfg: TaskConfig, *, next_z: float | None = None) -> str | None:
    """Why the next round may not start (its epsilon would exceed the target), or None."""
    st = privacy_status(session, task, cfg, next_z=next_z)
    if st is None or not st.exhausted:
        return None
    return (
        f"privacy budget exhausted: {st.rounds_charged} rounds spent epsilon {st.epsilon_spent:.3f}; "
        f"one more would reach {st.epsilon_after_next_round:.3f} > target {st.target_epsilon:g} "
        f"(delta {st.delta:.3g})"
    )


def current_clip(session: Session, task: Task, cfg: TaskConfig) -> float:
    """The clip norm of the next round: adaptive clipping carries it from round to round."""
    if not (cfg.privacy.enabled and cfg.privacy.adaptive_clip):
        return cfg.codec.clip_norm
    metrics: dict[str, Any] | None = session.scalars(
        select(Round.metrics)
        .where(Round.task_id == task.id, Round.outcome == Outcome.COMMITTED, Round.kind == RoundKind.TRAIN)
        .order_by(Round.number.desc())
        .limit(1)
    ).first()
    nxt = ((metrics or {}).get("dp") or {}).get("next_clip_norm")
    return float(nxt) if nxt is not None and math.isfinite(nxt) and nxt > 0 else cfg.codec.clip_norm
