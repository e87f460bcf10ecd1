"""Aggregation and commit of a round, and publishing ``predict.pte`` for new versions.

Both are heavy (unmasking regenerates masks; exporting runs torch.export), so they run outside
request transactions: a worker claims the job in the database (a claim older than
``STALE_CLAIM`` is taken over, which is how a job survives a killed worker), computes, and
commits the result in one transaction that re-checks the claim.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db.models import ModelVersion, Participant, Round, RoundUpload, Task
from coordinator.observability import log_event
from coordinator.optimizers import OptimizerState, make_optimizer
from coordinator.round_plan import plan_of
from coordinator.schemas import TaskConfig
from coordinator.services.rounds import (
    RETRYABLE,
    RoundContext,
    fail_after_error,
    fail_round_now,
    plain_sum,
    unmask_responses,
    utc,
)
from protocol.codec import CodecError, NormBoundError, decode_mean, unclipped_count
from protocol.dp import NoiseStream, next_clip_norm, sample_discrete_gaussian
from protocol.secagg.common import SecAggError
from protocol.secagg.server import SecAggServer
from protocol.wire import Outcome, RoundKind, Stage

__all__ = ["STALE_CLAIM", "aggregate", "pending_aggregations", "publish_pending"]

log = logging.getLogger("coordinator.aggregate")

STALE_CLAIM = timedelta(minutes=10)


def pending_aggregations(session: Session, now: datetime) -> list[int]:
    return list(
        session.scalars(
            select(Round.id).where(
                Round.stage == Stage.AGGREGATING,
                or_(Round.claimed_at.is_(None), Round.claimed_at < now - STALE_CLAIM),
            )
        )
    )


def _claim(factory: sessionmaker[Session], ctx: RoundContext, round_id: int) -> datetime | None:
    with factory() as session, session.begin():
        rnd = session.get(Round, round_id, with_for_update=True, populate_existing=True)
        now = ctx.now()
        if rnd is None or rnd.stage != Stage.AGGREGATING:
            return None
        if rnd.claimed_at is not None and utc(rnd.claimed_at) > now - STALE_CLAIM:
            return None
        rnd.claimed_at = now
        return now


def _ring(
    session: Session, rnd: Round, clip_norm: float, record: dict[str, Any]
) -> tuple[np.ndarray[Any, np.dtype[np.uint32]], int]:
    """The integer sum of a compressed round and the number of inputs in it."""
    plan = plan_of(rnd)
    if plan.secagg is not None:
        server = SecAggServer.from_bytes(rnd.secagg_state or b"")
        total = server.unmask(unmask_responses(session, rnd.id))
        if server.refused:  # reveals that failed their digests: left out, the others sufficed
            record["unmask_refused"] = server.refused
        assert plan.unmask is not None  # set when the masked-input stage closed
        return total.astype(np.uint32, copy=False), len(plan.unmask.survivors)
    # compressed without secure aggregation: a plain integer sum, which the codec's ring
    # width keeps below 2**k for up to max_clients inputs (so mod 2**32 loses nothing)
    got = plain_sum(session, rnd, clip_norm)
    if got.total is None:
        raise CodecError("no update arrived")
    return got.total.astype(np.uint32, copy=False), got.count


def _mean_delta(
    session: Session, rnd: Round, d: int, clip_norm: float
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int, dict[str, Any], dict[str, Any]]:
    """The mean delta, the number of summed devices, DP diagnostics (empty without DP) and
    what the round's record should say of the sum (its norm against the bound, clipping)."""
    plan = plan_of(rnd)
    record: dict[str, Any] = {}
    if plan.codec is None:
        got = plain_sum(session, rnd, clip_norm)
        if got.total is None:
            raise CodecError("no update arrived")
        if got.weight <= 0:
            raise CodecError("summed weight is 0")
        record["clipped_updates"] = got.clipped
        return (got.total / got.weight).astype(np.float32), got.count, {}, record
    codec = plan.codec
    ring, n = _ring(session, rnd, clip_norm, record)
    dp = plan.dp
    central = 0.0 if dp is None else dp.central_std
    decoded = decode_mean(ring, codec, n, d, central_noise_std=central)
    record["aggregate_norm"] = {"kept": round(decoded.kept_norm, 6), "bound": round(decoded.bound, 6)}
    mean = decoded.mean
    if dp is None:
        return mean, n, {}, record
    info: dict[str, Any] = dict(rnd.metrics.get("dp") or {})  # set when the round opened
    if codec.count_slot:
        count = unclipped_count(ring, codec, n, d) + float(
            sample_discrete_gaussian(dp.central_count_std, 1, NoiseStream())[0]
        )
        info["unclipped_fraction"] = count / n  # noisy: only its use below is private
    return mean, n, info, record


def _next_clip(cfg: TaskConfig, info: dict[str, Any]) -> None:
    if "unclipped_fraction" in info:
        p = cfg.privacy
        info["next_clip_norm"] = next_clip_norm(
            info["clip_norm"], info["unclipped_fraction"], p.target_quantile, p.clip_lr
        )


def aggregate(factory: sessionmaker[Session], ctx: RoundContext, round_id: int) -> int | None:
    """Unmask, decode, apply the server optimizer and commit a new version. Returns it."""
    claim = _claim(factory, ctx, round_id)
    if claim is None:
        return None
    try:
        return _aggregate(factory, ctx, round_id, claim)
    except RETRYABLE:
        raise  # a busy database: the claim goes stale and the job is taken over
    except Exception as e:  # anything else would fail the same way at every retry
        fail_after_error(factory, ctx, round_id, e)
        return None


def _aggregate(
    factory: sessionmaker[Session], ctx: RoundContext, round_id: int, claim: datetime
) -> int | None:
    with factory() as session:
        rnd = session.get(Round, round_id)
        assert rnd is not None
        task = session.get(Task, rnd.task_id)
        assert task is not None
        base = session.scalars(
            select(ModelVersion).where(
                ModelVersion.task_id == task.id, ModelVersion.version == rnd.base_version
            )
        ).one()
        cfg = TaskConfig.model_validate(task.config)
        d = plan_of(rnd).dim
        failure: Exception | None = None
        try:
            delta, n, dp_info, record = _mean_delta(session, rnd, d, cfg.codec.clip_norm)
            _next_clip(cfg, dp_info)
            if not np.isfinite(delta).all():
                raise CodecError("aggregate contains NaN or Inf")
        except (SecAggError, CodecError, ValueError) as e:
            failure = e
        else:
            weights = ctx.store.load_weights(base.weights_file)
            state = ctx.store.load_optimizer_state(task.name, base.version)
            # the base version is the server steps taken so far (version 0: the pretrained model)
            opt = make_optimizer(cfg.server_optimizer, step=base.version, rounds=cfg.schedule_rounds)
            server_lr = opt.lr
            new_weights, new_state = opt.step(weights, delta, state)
    if failure is not None:
        with factory() as session, session.begin():
            rnd = session.get(Round, round_id, with_for_update=True, populate_existing=True)
            if rnd is not None and rnd.stage == Stage.AGGREGATING:
                fail_round_now(session, ctx, rnd, f"aggregation: {failure}")
                if isinstance(failure, NormBoundError):
                    rnd.metrics = {**rnd.metrics, "aggregate_refused": str(failure)}
        return None
    with factory() as session, session.begin():
        rnd = session.get(Round, round_id, with_for_update=True, populate_existing=True)
        if (
            rnd is None
            or rnd.stage != Stage.AGGREGATING
            or rnd.claimed_at is None
            or utc(rnd.claimed_at) != claim
        ):
            return None  # another worker took over a claim we held too long
        task = session.get(Task, rnd.task_id, with_for_update=True, populate_existing=True)
        assert task is not None
        latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task_id == task.id))
        version = (latest or 0) + 1
        weights_file, sha = ctx.store.save_weights(task.name, version, new_weights)
        _save_state(ctx, task.name, version, new_state)
        reports = _reports(session, rnd.id)
        metrics: dict[str, Any] = {
            "reports": n,
            "update_norm": float(np.linalg.norm(delta)),
            "server_lr": server_lr,
            **record,
        }
        if dp_info:
            metrics["dp"] = dp_info
        if reports:
            metrics["mean_loss_before"] = float(np.mean([r["loss_before"] for r in reports]))
            metrics["mean_loss_after"] = float(np.mean([r["loss_after"] for r in reports]))
            metrics["mean_train_seconds"] = float(np.mean([r["seconds"] for r in reports]))
        session.add(
            ModelVersion(
                task_id=task.id,
                version=version,
                created_at=ctx.now(),
                source="round",
                round_id=rnd.id,
                parent_version=rnd.base_version,
                weights_file=weights_file,
                weights_sha256=sha,
                bundle_dir=base.bundle_dir,
                predict_file=None,
                predict_sha256=None,
                metrics=metrics,
            )
        )
        task.current_version = version
        rnd.stage = Stage.DONE
        rnd.outcome = Outcome.COMMITTED
        rnd.new_version = version
        rnd.finished_at = ctx.now()
        rnd.metrics = {**rnd.metrics, **metrics}
        rnd.secagg_state = None
        session.execute(delete(RoundUpload).where(RoundUpload.round_id == rnd.id))
        ctx.metrics.rounds.labels(RoundKind.TRAIN, Outcome.COMMITTED).inc()
        log_event(log, "version committed", task=task.name, round=rnd.id, version=version)
        return version


def _reports(session: Session, round_id: int) -> list[dict[str, Any]]:
    """Training reports of the devices whose update is in the sum (not of dropped ones)."""
    rows = session.scalars(
        select(Participant.report).where(Participant.round_id == round_id, Participant.stage != Stage.DROPPED)
    ).all()
    return [r for r in rows if r]


def _save_state(ctx: RoundContext, task: str, version: int, state: OptimizerState) -> None:
    ctx.store.save_optimizer_state(task, version, state)


def publish_pending(factory: sessionmaker[Session], ctx: RoundContext, *, latest_only: bool = True) -> int:
    """Export ``predict.pte`` for committed versions that have none (newest first).

    With ``latest_only`` older unpublished versions of a task are skipped once a newer one
    exists: devices only ever need the current model. Returns the number published.
    """
    from model_export.export import export_predict_program, model_from_bundle

    published = 0
    with factory() as session:
        rows = session.execute(
            select(ModelVersion.id, ModelVersion.task_id, ModelVersion.version)
            .where(ModelVersion.predict_file.is_(None))
            .order_by(ModelVersion.task_id, ModelVersion.version.desc())
        ).all()
    seen: set[int] = set()
    for mv_id, task_id, _ in rows:
        if latest_only and task_id in seen:
            continue
        seen.add(task_id)
        now = ctx.now()
        with factory() as session, session.begin():
            mv = session.get(ModelVersion, mv_id, with_for_update=True, populate_existing=True)
            if mv is None or mv.predict_file is not None:
                continue
            if mv.publish_claimed_at is not None and utc(mv.publish_claimed_at) > now - STALE_CLAIM:
                continue
            mv.publish_claimed_at = now
            task = session.get(Task, mv.task_id)
            assert task is not None
            task_name, version, bundle_dir, weights_file = (
                task.name,
                mv.version,
                mv.bundle_dir,
                mv.weights_file,
            )
        bundle = ctx.store.bundle(bundle_dir)
        lm = model_from_bundle(bundle.root, bundle.manifest, ctx.store.load_weights(weights_file))
        spec = bundle.manifest.predict
        program = export_predict_program(lm, spec.quantization, spec.beam_batch)
        rel, sha = ctx.store.save_predict(task_name, version, program)
        with factory() as session, session.begin():
            mv = session.get(ModelVersion, mv_id, with_for_update=True, populate_existing=True)
            if mv is not None and mv.predict_file is None:
                mv.predict_file, mv.predict_sha256 = rel, sha
                published += 1
                log_event(log, "predict.pte published", task=task_name, version=version)
    return published
