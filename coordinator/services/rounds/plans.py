"""Opening rounds and the round plan: the plan stored with a round when it opens (version,
codec, secure-aggregation and privacy parameters, deadlines) and the device-facing
:class:`~protocol.wire.RoundPlan` made from it."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.models import ModelVersion, Round, Task
from coordinator.dp_plan import PrivacyPlan
from coordinator.observability import log_event
from coordinator.round_plan import StoredPlan, plan_of, set_plan
from coordinator.schemas import TaskConfig
from coordinator.services.privacy_budget import current_clip, privacy_plan, refusal
from coordinator.services.rounds.context import (
    RoundContext,
    config_of,
    pace_target,
    recent_durations_before,
    timestamp,
)
from protocol.codec import CodecError, CodecParams, ring_bits
from protocol.secagg.common import MIN_DEVICES, secagg_params_for
from protocol.wire import API_PREFIX, ArtifactRef, Outcome, RoundKind, RoundPlan, Stage, TrainingPlan

__all__ = ["model_version", "open_rounds", "plan_for"]

log = logging.getLogger("coordinator.rounds")


def model_version(session: Session, task: Task, version: int) -> ModelVersion:
    """The task's model version ``version``."""
    return session.scalars(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == version)
    ).one()


def _selection_deadline(
    session: Session, ctx: RoundContext, task: Task, cfg: TaskConfig, now: datetime
) -> datetime:
    """A selection window, or longer when the idle fleet is away: while the previous round ran,
    pace steering sent the devices it did not need back for when the shortest earlier round
    would have ended (``checkin._pace``). A round that ended well before that (52-62 s after
    rounds of 97 s and more) opened a selection that closed before they were back, and the
    round failed with 0-1 devices. The window now stays open until they are back (the last of
    them by one spread window after the target); a full pool still closes it at once."""
    window = now + timedelta(seconds=cfg.deadlines.selection)
    prev = session.execute(
        select(Round.id, Round.created_at).where(Round.task_id == task.id).order_by(Round.id.desc()).limit(1)
    ).one_or_none()
    if prev is None:
        return window
    target = pace_target(prev.created_at, recent_durations_before(session, task.id, prev.id))
    if target is None:
        # no history before the previous round: its idle devices were sent back within two
        # selection windows of their check-in, spread over up to one more (a 20 s selection
        # after the first round found nobody, bench/sim_overhead.py 2026-12-05)
        back = now + timedelta(seconds=3 * cfg.deadlines.selection)
    else:
        back = target + timedelta(seconds=cfg.deadlines.selection + ctx.settings.min_retry_seconds)
    return min(max(window, back), now + timedelta(seconds=ctx.settings.max_retry_seconds))


def _open_round(session: Session, ctx: RoundContext, task: Task) -> Round | None:
    """Create the task's next round (the task row is locked by the caller)."""
    cfg = config_of(task)
    if task.current_version is None:
        return None
    # rounds that trained the model: a failed round (too few devices by a deadline) moved
    # nothing, so max_rounds counts model versions, and runs that compare settings over the
    # same max_rounds take the same number of server steps
    trained = (
        session.scalar(
            select(func.count())
            .select_from(Round)
            .where(
                Round.task_id == task.id, Round.kind == RoundKind.TRAIN, Round.outcome == Outcome.COMMITTED
            )
        )
        or 0
    )
    number = task.next_round
    due = cfg.eval_every_rounds and number % (cfg.eval_every_rounds + 1) == 0
    kind = RoundKind.EVALUATE if due else RoundKind.TRAIN
    if kind == RoundKind.TRAIN and cfg.max_rounds is not None and trained >= cfg.max_rounds:
        task.status = "paused"
        log_event(log, "task finished its rounds", task=task.name)
        return None
    now = ctx.now()
    mv = model_version(session, task, task.current_version)
    bundle = ctx.store.bundle(mv.bundle_dir)
    layout = bundle.manifest.train.layout
    target = cfg.selection_size if kind == RoundKind.TRAIN else cfg.eval_clients
    codec: CodecParams | None = None
    dp_plan: PrivacyPlan | None = None
    if kind == RoundKind.TRAIN and cfg.codec.compress:
        codec = CodecParams.model_validate(
            {
                **cfg.codec.model_dump(exclude={"compress"}),  # the task's knobs, then the round's
                "clip_norm": current_clip(session, task, cfg),
                "max_clients": target,
                "count_slot": cfg.privacy.enabled and cfg.privacy.adaptive_clip,
                "seed": secrets.token_bytes(32),
            }
        )
        if cfg.privacy.enabled:
            try:
                dp_plan = privacy_plan(cfg, codec, layout.size)
            except ValueError as e:  # DPError too; create/update refuse such settings already
                task.status = "paused"
                task.status_reason = f"privacy settings cannot be honoured: {e}"
                log_event(log, "task paused", task=task.name, reason=task.status_reason)
                return None
            reason = refusal(session, task, cfg, next_z=dp_plan.z)
            if reason is not None:
                task.status = "paused"
                task.status_reason = reason
                log_event(log, "task paused", task=task.name, reason=reason)
                return None
            codec = codec.model_copy(
                update={"noise_std": dp_plan.device_std, "count_noise_std": dp_plan.device_count_std}
            )
            try:
                ring_bits(codec)
            except CodecError as e:
                task.status = "paused"
                task.status_reason = f"the round's noise does not fit the ring: {e}"
                log_event(log, "task paused", task=task.name, reason=task.status_reason)
                return None
    rnd = Round(
        task_id=task.id,
        number=number,
        kind=kind,
        stage=Stage.SELECTING,
        base_version=mv.version,
        plan={},
        created_at=now,
        stage_started_at=now,
        stage_deadline=_selection_deadline(session, ctx, task, cfg, now),
        selection_target=target,
        metrics={} if dp_plan is None or codec is None else {"dp": _dp_metrics(dp_plan, codec)},
    )
    session.add(rnd)
    task.next_round = number + 1
    session.flush()  # the round id goes into the secure-aggregation parameters
    sec = None
    if codec is not None and cfg.secagg.enabled:
        sec = secagg_params_for(
            codec,
            layout.size,
            round_id=rnd.id,
            graph_seed=secrets.token_bytes(32),
            degree=cfg.secagg.neighbours,
            threshold=cfg.secagg.threshold,
            min_devices=max(MIN_DEVICES, cfg.min_reports),
            dropout=cfg.secagg.design_dropout(cfg.over_selection),
        )
    set_plan(
        rnd,
        StoredPlan(
            task=task.name,
            kind=kind,
            model_version=mv.version,
            bundle_dir=mv.bundle_dir,
            weights_file=mv.weights_file,
            weights_sha256=mv.weights_sha256,
            layout_hash=layout.hash(),
            dim=layout.size,
            clients_per_round=cfg.clients_per_round,
            min_reports=cfg.min_reports if kind == RoundKind.TRAIN else 1,
            training=cfg.training,
            deadlines=cfg.deadlines,
            codec=codec,
            secagg=sec,
            dp=dp_plan,
            plain_weight_cap=cfg.codec.weight_cap,
        ),
    )
    log_event(log, "round opened", task=task.name, round=rnd.id, stage=Stage.SELECTING, version=mv.version)
    return rnd


def _dp_metrics(dp: PrivacyPlan, codec: CodecParams) -> dict[str, Any]:
    return {
        "mode": dp.mode,
        "adjacency": dp.adjacency,
        "noise_multiplier": dp.z,
        "sampling_rate": dp.q,
        "clip_norm": codec.clip_norm,
        "noise_std_levels": dp.z_update * dp.sensitivity,
    }


def open_rounds(session: Session, ctx: RoundContext) -> list[Round]:
    """The open round of every active task, opening new ones where none is open."""
    out = []
    for task in session.scalars(select(Task).where(Task.status == "active").order_by(Task.id)).all():
        rnd = session.scalars(
            select(Round).where(Round.task_id == task.id, Round.stage != Stage.DONE).order_by(Round.id)
        ).first()
        if rnd is None:
            session.refresh(task, with_for_update=True)
            if task.status != "active":
                continue
            rnd = session.scalars(
                select(Round).where(Round.task_id == task.id, Round.stage != Stage.DONE)
            ).first() or _open_round(session, ctx, task)
        if rnd is not None:
            out.append(rnd)
    return out


def plan_for(session: Session, ctx: RoundContext, rnd: Round) -> RoundPlan:
    """The device-facing plan of a round. Artifact URLs are paths (``/v1/...``): a device joins
    them to the coordinator origin it was configured with, so neither a request's ``Host``
    header nor a TLS-terminating proxy can make it send its token anywhere else."""
    p = plan_of(rnd)
    bundle = ctx.store.bundle(p.bundle_dir)
    tar = ctx.store.bundle_tarball(p.bundle_dir)
    task, version = p.task, p.model_version
    mv = session.scalars(
        select(ModelVersion).join(Task).where(Task.name == task, ModelVersion.version == version)
    ).one()
    predict = None
    if mv.predict_file and mv.predict_sha256:
        predict = ArtifactRef(
            url=f"{API_PREFIX}/tasks/{task}/versions/{version}/predict.pte",
            sha256=mv.predict_sha256,
            size=ctx.store.path(mv.predict_file).stat().st_size,
        )
    t = p.training
    training = TrainingPlan(
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        local_steps=t.local_steps,
        max_seconds=t.max_seconds,
        max_examples=t.max_examples,
        local_epochs=t.local_epochs,
    )
    return RoundPlan(
        round_id=rnd.id,
        task=task,
        kind=rnd.kind,
        model_version=version,
        bundle=ArtifactRef(
            url=f"{API_PREFIX}/bundles/{p.bundle_dir}.tar",
            sha256=ctx.store.sha256_of(tar),
            size=tar.stat().st_size,
        ),
        weights=ArtifactRef(
            url=f"{API_PREFIX}/tasks/{task}/versions/{version}/weights",
            sha256=p.weights_sha256,
            size=4 * bundle.manifest.train.layout.size,
        ),
        predict=predict,
        layout_hash=p.layout_hash,
        training=training if rnd.kind == RoundKind.TRAIN else None,
        codec=p.codec,
        secagg=p.secagg,
        stage_deadline=timestamp(rnd.stage_deadline),
    )
