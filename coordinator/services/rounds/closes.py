"""The close of each stage: what happens to a round when its stage ends.

A close replays the messages the stage's devices left in their participant rows, refuses the
ones that no longer check out (that device loses the round, the round goes on), drops the
devices that did not answer and opens the next stage, or fails the round when too few devices
are left. :data:`CLOSES` holds one close per stage (as Flower's SecAgg+ workflow has one method
per stage); :func:`coordinator.services.rounds.stages.advance` decides when one runs.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from coordinator.db.models import Candidate, Device, EvalReport, Participant, Round, RoundUpload, Task
from coordinator.observability import log_event
from coordinator.round_plan import plan_of, set_plan
from coordinator.schemas import TaskConfig
from coordinator.selection import Candidate as SelectionCandidate
from coordinator.selection import SelectionPolicy
from coordinator.selection import select as select_devices
from coordinator.services.privacy_budget import charge
from coordinator.services.rounds.context import (
    RoundContext,
    need_state,
    timestamp,
    utc,
)
from coordinator.services.rounds.plans import model_version
from coordinator.services.rounds.uploads import stored_uploads
from protocol.secagg.common import MIN_DEVICES, SecAggError
from protocol.secagg.server import SecAggServer
from protocol.wire import AdvertiseKeys, Outcome, RoundKind, ShareKeys, Stage, WireError

__all__ = ["CLOSES", "Closing", "fail_round_now"]

log = logging.getLogger("coordinator.rounds")


@dataclass(frozen=True)
class Closing:
    """What a stage close works with: the round (locked), its task and configuration, the time
    the close was judged due at, and the round's live participants (none for a selection)."""

    session: Session
    ctx: RoundContext
    rnd: Round
    task: Task
    cfg: TaskConfig
    now: datetime
    live: list[Participant]


def _set_stage(ctx: RoundContext, rnd: Round, stage: Stage, seconds: float) -> None:
    now = ctx.now()
    took = (now - utc(rnd.stage_started_at)).total_seconds()
    ctx.metrics.stage_seconds.labels(rnd.stage).observe(took)
    timings = dict(rnd.metrics.get("stage_seconds", {}))
    timings[rnd.stage] = round(took, 3)
    rnd.metrics = {**rnd.metrics, "stage_seconds": timings}
    rnd.stage = stage
    rnd.stage_started_at = now
    rnd.stage_deadline = now + timedelta(seconds=seconds)
    log_event(log, "stage", round=rnd.id, stage=stage)


def fail_round_now(session: Session, ctx: RoundContext, rnd: Round, reason: str) -> None:
    """End the locked round as failed (the model stays unchanged): its uploads, candidates and
    secure-aggregation state are deleted, and selected devices that sent nothing are dropped."""
    rnd.stage = Stage.DONE
    rnd.outcome = Outcome.FAILED
    rnd.failure_reason = reason[:500]
    rnd.finished_at = ctx.now()
    rnd.secagg_state = None
    session.execute(delete(RoundUpload).where(RoundUpload.round_id == rnd.id))
    session.execute(delete(Candidate).where(Candidate.round_id == rnd.id))
    session.execute(
        update(Participant)
        .where(Participant.round_id == rnd.id, Participant.stage == Stage.SELECTED)
        .values(stage=Stage.DROPPED)
    )
    ctx.metrics.rounds.labels(rnd.kind, Outcome.FAILED).inc()
    log_event(log, "round failed", round=rnd.id, stage=Stage.DONE, reason=reason)


def _refuse(session: Session, rnd: Round, refused: dict[str, str]) -> None:
    """Drop devices whose stored message failed its check when the stage closed (device ->
    reason): they lose this round, the round goes on without them (recorded per stage)."""
    if not refused:
        return
    session.execute(
        update(Participant)
        .where(Participant.round_id == rnd.id, Participant.device_id.in_(list(refused)))
        .values(stage=Stage.DROPPED)
    )
    record = dict(rnd.metrics.get("refused", {}))
    record[rnd.stage] = {**record.get(rnd.stage, {}), **{d: r[:200] for d, r in refused.items()}}
    rnd.metrics = {**rnd.metrics, "refused": record}
    for device, reason in refused.items():
        log_event(
            log, "message refused at stage close", round=rnd.id, stage=rnd.stage, device=device, reason=reason
        )


def _drop_missing(session: Session, rnd: Round, keep: set[str]) -> None:
    """Every live participant of the round not in ``keep`` is dropped (counted per stage)."""
    stmt = update(Participant).where(Participant.round_id == rnd.id, Participant.stage != Stage.DROPPED)
    if keep:
        stmt = stmt.where(Participant.device_id.not_in(keep))
    n = session.execute(stmt.values(stage=Stage.DROPPED)).rowcount  # type: ignore[attr-defined]
    if n:
        dropped = dict(rnd.metrics.get("dropped", {}))
        dropped[rnd.stage] = dropped.get(rnd.stage, 0) + int(n)
        rnd.metrics = {**rnd.metrics, "dropped": dropped}


_QUANTILES = (("first", 0.0), ("p50", 0.5), ("last", 1.0))


def _close_selection(c: Closing) -> None:
    """Select the round's devices from its pool (or fail it past the deadline with too few)."""
    session, ctx, rnd, now = c.session, c.ctx, c.rnd, c.now
    rows = session.execute(
        select(Candidate, Device)
        .join(Device, Device.id == Candidate.device_id)
        .where(Candidate.round_id == rnd.id, Device.revoked_at.is_(None))  # revoked since it joined
    ).all()
    plan = plan_of(rnd)
    need = plan.min_reports
    if len(rows) < need:
        if now >= utc(rnd.stage_deadline):
            fail_round_now(
                session,
                ctx,
                rnd,
                f"only {len(rows)} eligible devices checked in; the round needs {need}",
            )
        return
    seed = bytes.fromhex(plan.selection_seed)
    cands = [
        SelectionCandidate(
            device_id=dev.id,
            examples=cand.examples,
            device_class=dev.device_class,
            data_bucket=dev.data_bucket,
            last_selected=timestamp(dev.last_selected_at) if dev.last_selected_at else 0.0,
            participations=dev.participations,
            last_round=dev.util_round,
            loss=dev.util_loss,
            seconds=dev.util_seconds,
        )
        for cand, dev in rows
    ]
    s = c.cfg.selection
    policy = SelectionPolicy(**s.model_dump()) if rnd.kind == RoundKind.TRAIN else SelectionPolicy()
    picked = select_devices(cands, rnd.selection_target, policy, seed=seed, round_number=rnd.number)
    by_id = {dev.id: (cand, dev) for cand, dev in rows}
    chosen = [by_id[i] for i in picked]
    for i, (_, dev) in enumerate(chosen, 1):
        session.add(
            Participant(round_id=rnd.id, device_id=dev.id, index=i, stage=Stage.SELECTED, selected_at=now)
        )
    ids = [dev.id for _, dev in chosen]
    session.execute(
        update(Device)
        .where(Device.id.in_(ids))
        .values(
            last_selected_at=now,
            participations=Device.participations + 1,
            last_round_number=rnd.number,
        )
    )
    session.execute(delete(Candidate).where(Candidate.round_id == rnd.id))
    started = utc(rnd.stage_started_at)
    arrived = sorted((utc(cand.checked_in_at) - started).total_seconds() for cand, _ in rows)
    rnd.metrics = {
        **rnd.metrics,
        "candidates": len(rows),
        # arrivals per second once they began (the wait before the first is not the rate)
        "candidate_rate": len(rows) / max(arrived[-1] - arrived[0], 0.05),
        # when the pool's devices checked in, seconds after the selection opened
        "pool_arrivals": {q: round(arrived[int(f * (len(arrived) - 1))], 3) for q, f in _QUANTILES},
    }
    rnd.selected = len(chosen)
    ctx.metrics.selections.inc(len(chosen))
    d = c.cfg.deadlines
    sec = plan.secagg
    if rnd.kind == RoundKind.EVALUATE:
        _set_stage(ctx, rnd, Stage.EVALUATING, d.upload)
    elif sec is not None:
        rnd.secagg_state = SecAggServer(sec).to_bytes()
        _set_stage(ctx, rnd, Stage.ADVERTISE_KEYS, d.advertise)
    else:
        _set_stage(ctx, rnd, Stage.UPLOAD, d.upload)


def _advertisement(rnd: Round, part: Participant) -> AdvertiseKeys:
    """A participant's advertisement, rebuilt from the keys stored in its row."""
    keys = part.keys or {}
    return AdvertiseKeys(
        round_id=rnd.id,
        device=part.device_id,
        cipher_public_key=base64.b64decode(keys["c"]),
        mask_public_key=base64.b64decode(keys["s"]),
    )


def _close_advertise(c: Closing) -> None:
    """Fix the roster from the advertised keys; the others are dropped."""
    session, ctx, rnd = c.session, c.ctx, c.rnd
    server = SecAggServer.from_bytes(need_state(rnd.secagg_state))
    refused: dict[str, str] = {}
    done = []
    for p in c.live:  # replay the stage's messages, kept in the participants' rows
        if p.stage != Stage.ADVERTISE_KEYS:
            continue
        try:
            server.add_advertisement(_advertisement(rnd, p))
        except (SecAggError, ValueError) as e:  # checked on arrival: only a changed rule
            refused[p.device_id] = str(e)
        else:
            done.append(p)
    _refuse(session, rnd, refused)
    if len(done) < max(MIN_DEVICES, plan_of(rnd).min_reports):
        fail_round_now(session, ctx, rnd, f"only {len(done)} devices advertised keys")
        return
    server.close_advertise()
    _drop_missing(session, rnd, {p.device_id for p in done})
    rnd.secagg_state = server.to_bytes()
    _set_stage(ctx, rnd, Stage.SHARE_KEYS, c.cfg.deadlines.share)


def _close_share_keys(c: Closing) -> None:
    """Take the encrypted shares to relay; devices that shared none are dropped."""
    session, ctx, rnd = c.session, c.ctx, c.rnd
    server = SecAggServer.from_bytes(need_state(rnd.secagg_state))
    refused: dict[str, str] = {}
    for device_id, blob in session.execute(  # replay the stage's messages in one query
        select(Participant.device_id, Participant.secagg_msg).where(
            Participant.round_id == rnd.id, Participant.stage == Stage.SHARE_KEYS
        )
    ):
        try:
            msg = ShareKeys.model_validate_json(need_state(blob))
            if msg.sender != device_id:
                raise SecAggError(f"stored share-keys message names {msg.sender!r}")
            server.add_share_keys(msg)
        except (SecAggError, ValueError) as e:
            refused[device_id] = str(e)
    _refuse(session, rnd, refused)
    active = set(server.close_share_keys())
    _drop_missing(session, rnd, active)
    session.execute(update(Participant).where(Participant.round_id == rnd.id).values(secagg_msg=None))
    rnd.secagg_state = server.to_bytes()
    _set_stage(ctx, rnd, Stage.MASKED_INPUT, c.cfg.deadlines.upload)


def _omissions(blob: bytes) -> list[str]:
    """A stored list of omitted neighbours (JSON, written by :func:`upload`)."""
    got = json.loads(blob)
    if not isinstance(got, list) or not all(isinstance(u, str) for u in got):
        raise ValueError("stored omissions are not a list of device ids")
    return got


def _add_masked_inputs(session: Session, rnd: Round, uploaded: set[str]) -> tuple[SecAggServer, set[str]]:
    """The masked inputs of ``uploaded`` added into the round's sum: the server state and the
    uploaders whose input is in it.

    Uploads were checked whole when they arrived; one that fails now (a rule that changed under
    a stored upload, a damaged row) costs its device the round and nothing else: the sum is
    validated before anything is added into it."""
    server = SecAggServer.from_bytes(need_state(rnd.secagg_state))
    refused: dict[str, str] = {}
    # first whom each uploader masked without: those neighbours' inputs stay out
    for device_id, blob in session.execute(
        select(Participant.device_id, Participant.secagg_msg).where(
            Participant.round_id == rnd.id,
            Participant.stage == Stage.MASKED_INPUT,
            Participant.secagg_msg.is_not(None),
        )
    ):
        try:
            server.record_omissions(device_id, _omissions(need_state(blob)))
        except (SecAggError, ValueError) as e:
            refused[device_id] = str(e)
    for u in server.accused & uploaded:
        refused[u] = "a neighbour could not use its share and masked without it"
    for device_id, _, body in stored_uploads(session, rnd.id):  # streamed into one sum
        if device_id not in uploaded or device_id in refused:
            continue
        try:
            server.add_masked_update(device_id, body, layout_hash=plan_of(rnd).layout_hash)
        except (WireError, SecAggError) as e:
            refused[device_id] = str(e)
    missing = uploaded - set(server.survivors) - set(refused)
    refused.update(dict.fromkeys(missing, "stored upload is missing"))
    _refuse(session, rnd, refused)
    return server, uploaded - set(refused)


def _close_upload(c: Closing) -> None:
    """End the upload stage (masked input or plain upload): too few updates fail the round;
    else the privacy budget is charged and the round goes to unmasking (secure aggregation) or
    straight to aggregation."""
    session, ctx, rnd = c.session, c.ctx, c.rnd
    uploaded = {p.device_id for p in c.live if p.stage in (Stage.MASKED_INPUT, Stage.UPLOAD)}
    server = None
    if rnd.stage == Stage.MASKED_INPUT:
        server, uploaded = _add_masked_inputs(session, rnd, uploaded)
    need = plan_of(rnd).min_reports
    if len(uploaded) < need:
        fail_round_now(
            session,
            ctx,
            rnd,
            f"only {len(uploaded)} updates by the deadline; need {need}",
        )
        return
    _drop_missing(session, rnd, uploaded)
    rnd.reported = len(uploaded)
    rnd.bytes_in = sum(p.upload_bytes for p in c.live if p.device_id in uploaded)
    charge(rnd)  # from here on the coordinator can compute the (noisy) sum
    if server is None:
        _set_stage(ctx, rnd, Stage.AGGREGATING, 0)
        return
    request = server.close_masked_input()
    set_plan(rnd, plan_of(rnd).model_copy(update={"unmask": request}))
    rnd.secagg_state = server.to_bytes()
    session.execute(delete(RoundUpload).where(RoundUpload.round_id == rnd.id))
    session.execute(update(Participant).where(Participant.round_id == rnd.id).values(secagg_msg=None))
    _set_stage(ctx, rnd, Stage.UNMASK, c.cfg.deadlines.unmask)


def _close_unmask(c: Closing) -> None:
    """The survivors' shares are in (or the deadline passed): aggregation is due."""
    _set_stage(c.ctx, c.rnd, Stage.AGGREGATING, 0)


def _close_evaluation(c: Closing) -> None:
    """Sum the evaluation reports into the round's and the model version's metrics and end the
    round (failed without any report)."""
    session, ctx, rnd = c.session, c.ctx, c.rnd
    reports = session.scalars(select(EvalReport).where(EvalReport.round_id == rnd.id)).all()
    words = sum(r.words for r in reports)
    metrics: dict[str, Any] = {"devices": len(reports), "words": words}
    if words:
        tokens = sum(r.tokens for r in reports)
        metrics.update(
            top1=sum(r.top1 for r in reports) / words,
            top3=sum(r.top3 for r in reports) / words,
            loss=sum(r.loss_sum for r in reports) / max(tokens, 1),
        )
        mv = model_version(session, c.task, rnd.base_version)
        mv.metrics = {**mv.metrics, **{f"federated_eval.{k}": v for k, v in metrics.items()}}
    _drop_missing(session, rnd, {r.device_id for r in reports})
    rnd.metrics = {**rnd.metrics, **metrics}
    rnd.stage = Stage.DONE
    rnd.outcome = Outcome.COMMITTED if reports else Outcome.FAILED
    if not reports:
        rnd.failure_reason = "no evaluation reports"
    rnd.reported = len(reports)
    rnd.finished_at = ctx.now()
    ctx.metrics.rounds.labels(RoundKind.EVALUATE, rnd.outcome).inc()


CLOSES: dict[str, Callable[[Closing], None]] = {
    Stage.SELECTING: _close_selection,
    Stage.ADVERTISE_KEYS: _close_advertise,
    Stage.SHARE_KEYS: _close_share_keys,
    Stage.MASKED_INPUT: _close_upload,
    Stage.UPLOAD: _close_upload,
    Stage.UNMASK: _close_unmask,
    Stage.EVALUATING: _close_evaluation,
}
"""The close of each stage that devices take part in (aggregating and done have none)."""
