"""Device messages within a round: status, advertised keys, roster, key shares, inbound shares,
unmasking, training reports and evaluation counts (uploads: :mod:`.uploads`).

A message that changes a round takes the round's row in share mode (:func:`lock_shared`) and
its participant row exclusively: any number of devices write at once, a stage close waits for
them, and a device's stage only moves forward. Messages are checked against the stage's
secure-aggregation state when they arrive and kept in the participant's row; the stage close
replays them (:mod:`.closes`).
"""

from __future__ import annotations

import base64

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.models import Device, EvalReport, Participant, Round
from coordinator.round_plan import plan_of
from coordinator.services.rounds.context import (
    Forbidden,
    Gone,
    RoundContext,
    StageConflict,
    timestamp,
    utc,
)
from protocol.wire import (
    AdvertiseKeys,
    EvalCounts,
    MaskedInputRequest,
    RoundKind,
    RoundStatus,
    ShareKeys,
    ShareKeysRequest,
    Stage,
    TrainReport,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = [
    "PAYLOAD_STAGES",
    "advertise",
    "carries_payload",
    "evaluation",
    "expect_stage",
    "inbound_shares",
    "lock_shared",
    "my_part",
    "record_report",
    "report",
    "roster",
    "round_and_participant",
    "round_for_device",
    "share_keys",
    "status_of",
    "unmask",
    "unmask_request",
    "unmask_responses",
    "with_payload",
]


def my_part(session: Session, rnd: Round, device_id: str, *, lock: bool = False) -> Participant:
    """The device's participant row (locked with ``lock``: its stage moves forward once);
    403 if it was not selected, 410 if the round went on without it or is over."""
    stmt = select(Participant).where(Participant.round_id == rnd.id, Participant.device_id == device_id)
    if lock:
        stmt = stmt.with_for_update()
    part = session.execute(stmt.execution_options(populate_existing=True)).scalar_one_or_none()
    if part is None:
        raise Forbidden(f"device was not selected for round {rnd.id}")
    if part.stage == Stage.DROPPED:
        raise Gone(f"round {rnd.id} went on without this device")
    if rnd.stage == Stage.DONE:
        raise Gone(f"round {rnd.id} is over ({rnd.outcome})")
    return part


def expect_stage(rnd: Round, *stages: str) -> None:
    """409 unless the round is in one of ``stages``."""
    if rnd.stage not in stages:
        raise StageConflict(f"round {rnd.id} is in stage {rnd.stage!r}, not {' or '.join(stages)!r}")


def round_for_device(session: Session, round_id: int, device: Device) -> tuple[Round, Participant]:
    return round_and_participant(session, round_id, device.id)


def round_and_participant(session: Session, round_id: int, device_id: str) -> tuple[Round, Participant]:
    """The round and the device's row in it (410 without the round, 403 if not selected)."""
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = session.get(Participant, (rnd.id, device_id))
    if part is None:
        raise Forbidden(f"device was not selected for round {rnd.id}")
    return rnd, part


def lock_shared(session: Session, round_id: int) -> Round:
    """The round, locked against stage changes but not against other devices' messages
    (``FOR SHARE`` on PostgreSQL: any number of uploads at once, while closing a stage takes
    ``FOR UPDATE`` and waits for them; SQLite serialises transactions anyway)."""
    rnd = session.execute(
        select(Round)
        .where(Round.id == round_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if rnd is None:
        raise Gone(f"no round {round_id}")
    return rnd


def status_of(session: Session, ctx: RoundContext, *, round_id: int, device_id: str) -> RoundStatus:
    """The round's stage and the device's part in it (410 without the round, 403 if it was not
    selected): one query for the five columns it needs (devices poll it all round long; whole
    rows came with the round's plan and metrics, JSON parsed at every poll)."""
    row = session.execute(
        select(Round.stage, Round.stage_deadline, Round.outcome, Round.new_version, Participant.stage)
        .select_from(Round)
        .outerjoin(Participant, (Participant.round_id == Round.id) & (Participant.device_id == device_id))
        .where(Round.id == round_id)
    ).one_or_none()
    if row is None:
        raise Gone(f"no round {round_id}")
    stage, deadline, outcome, new_version, part_stage = row
    if part_stage is None:
        raise Forbidden(f"device was not selected for round {round_id}")
    remaining = max((utc(deadline) - ctx.now()).total_seconds(), 0.0)
    # stages close the moment their last message arrives: poll often enough that devices do
    # not spend the round waiting to hear of it (at most 1 s, sooner near a deadline)
    poll = 0.0 if stage == Stage.DONE else min(max(remaining / 8, 0.2), 1.0)
    return RoundStatus(
        round_id=round_id,
        stage=stage,
        stage_deadline=timestamp(deadline),
        participant_stage=part_stage,
        outcome=outcome,
        new_version=new_version,
        retry_after=round(poll, 3),
    )


PAYLOAD_STAGES = (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)
"""Stages whose status answer can carry the device's message of that stage (``with_payload``)."""


def carries_payload(st: RoundStatus) -> bool:
    """Whether ``st`` is at a stage with a message for its device (``with_payload``)."""
    return st.stage in PAYLOAD_STAGES and st.participant_stage != Stage.DROPPED


def with_payload(session: Session, ctx: RoundContext, st: RoundStatus, *, device_id: str) -> RoundStatus:
    """``st`` with the message the device needs at the round's stage (its roster, its inbound
    shares or the unmask request), read as the stage's GET route would, with the same checks.
    Where that route would refuse (the device missed the stage, the message is not fixed
    yet), the status goes without it and a device that still asks gets the refusal there."""
    if not carries_payload(st):
        return st
    try:
        if st.stage == Stage.SHARE_KEYS:
            return st.model_copy(
                update={"roster": roster(session, ctx, round_id=st.round_id, device_id=device_id)}
            )
        if st.stage == Stage.MASKED_INPUT:
            got = inbound_shares(session, ctx, round_id=st.round_id, device_id=device_id)
            return st.model_copy(update={"shares": got})
        return st.model_copy(
            update={"unmask": unmask_request(session, round_id=st.round_id, device_id=device_id)}
        )
    except (Gone, Forbidden, StageConflict):
        return st


def advertise(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: AdvertiseKeys
) -> bool:
    """Record the device's public keys. True when the stage may now be complete."""
    rnd = lock_shared(session, round_id)
    part = my_part(session, rnd, device.id, lock=True)
    if msg.device != device.id or msg.round_id != rnd.id:
        raise StageConflict("advertisement names another device or round")
    keys = {
        "c": base64.b64encode(msg.cipher_public_key).decode(),
        "s": base64.b64encode(msg.mask_public_key).decode(),
    }
    if part.stage != Stage.SELECTED:
        if part.keys != keys:
            raise StageConflict("this device already advertised different keys")
        return False  # a resend: already recorded
    expect_stage(rnd, Stage.ADVERTISE_KEYS)
    ctx.secagg_snapshot(rnd).check_advertisement(msg)
    part.stage = Stage.ADVERTISE_KEYS
    part.keys = keys
    part.message_at = ctx.now()
    return True


def roster(session: Session, ctx: RoundContext, *, round_id: int, device_id: str) -> ShareKeysRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = my_part(session, rnd, device_id)
    expect_stage(rnd, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)
    if part.stage == Stage.SELECTED:
        raise Gone("device did not advertise keys in time")
    r = ctx.secagg_snapshot(rnd).roster
    if r is None:
        raise StageConflict("roster not fixed yet")
    return r


def share_keys(session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: ShareKeys) -> bool:
    """Record the device's encrypted shares. True when the stage may now be complete."""
    rnd = lock_shared(session, round_id)
    part = my_part(session, rnd, device.id, lock=True)
    if msg.sender != device.id or msg.round_id != rnd.id:
        raise StageConflict("share message names another device or round")
    if part.stage not in (Stage.SELECTED, Stage.ADVERTISE_KEYS):
        return False  # a resend: already recorded (or already past this stage)
    expect_stage(rnd, Stage.SHARE_KEYS)
    if part.stage != Stage.ADVERTISE_KEYS:
        raise Gone("device did not advertise keys in time")
    ctx.secagg_snapshot(rnd).check_share_keys(msg)
    part.stage = Stage.SHARE_KEYS
    part.secagg_msg = msg.model_dump_json().encode()
    part.message_at = ctx.now()
    return True


def inbound_shares(
    session: Session, ctx: RoundContext, *, round_id: int, device_id: str
) -> MaskedInputRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    my_part(session, rnd, device_id)
    expect_stage(rnd, Stage.MASKED_INPUT)
    return ctx.secagg_snapshot(rnd).masked_input_request(device_id)


def unmask_request(session: Session, *, round_id: int, device_id: str) -> UnmaskRequest:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise Gone(f"no round {round_id}")
    part = my_part(session, rnd, device_id)
    expect_stage(rnd, Stage.UNMASK)
    if part.stage not in (Stage.MASKED_INPUT, Stage.UNMASK):
        raise Gone("device's masked input is not in the sum")
    unmask = plan_of(rnd).unmask
    if unmask is None:
        raise StageConflict("unmask request not fixed yet")
    return unmask


def unmask(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, msg: UnmaskResponse
) -> bool:
    """Record the device's revealed shares. True when the stage may now be complete."""
    rnd = lock_shared(session, round_id)
    part = my_part(session, rnd, device.id, lock=True)
    if msg.sender != device.id or msg.round_id != rnd.id:
        raise StageConflict("unmask response names another device or round")
    if part.stage == Stage.UNMASK:
        return False
    expect_stage(rnd, Stage.UNMASK)
    ctx.secagg_snapshot(rnd).check_unmask_response(msg)
    part.stage = Stage.UNMASK
    part.unmask = msg.model_dump_json().encode()
    return True


def unmask_responses(session: Session, round_id: int) -> list[UnmaskResponse]:
    """The survivors' recorded unmask responses (for aggregation)."""
    blobs = session.scalars(
        select(Participant.unmask).where(Participant.round_id == round_id, Participant.stage == Stage.UNMASK)
    ).all()
    return [UnmaskResponse.model_validate_json(b) for b in blobs if b is not None]


def report(session: Session, *, round_id: int, device: Device, msg: TrainReport) -> None:
    rnd, part = round_for_device(session, round_id, device)
    record_report(session, rnd, part, msg)


def record_report(session: Session, rnd: Round, part: Participant, msg: TrainReport) -> None:
    """Keep a device's training report (its own route, or the header of its upload)."""
    if rnd.kind != RoundKind.TRAIN:
        raise StageConflict("training reports belong to training rounds")
    part.report = msg.model_dump()
    # oort's statistical utility (with the example count)
    session.execute(
        update(Device)
        .where(Device.id == part.device_id)
        .values(util_loss=msg.loss_before, util_round=rnd.number)
    )


def evaluation(
    session: Session, ctx: RoundContext, *, round_id: int, device: Device, counts: EvalCounts
) -> bool:
    """Record the device's evaluation counts. True when the stage may now be complete."""
    rnd = lock_shared(session, round_id)
    part = my_part(session, rnd, device.id, lock=True)
    if rnd.kind != RoundKind.EVALUATE:
        raise StageConflict("evaluation counts belong to evaluation rounds")
    if part.stage == Stage.EVALUATED:
        return False
    expect_stage(rnd, Stage.EVALUATING)
    session.add(
        EvalReport(
            round_id=rnd.id,
            device_id=device.id,
            version=rnd.base_version,
            words=counts.words,
            top1=counts.top1,
            top3=counts.top3,
            loss_sum=counts.loss_sum,
            tokens=counts.tokens,
        )
    )
    part.stage = Stage.EVALUATED
    return True
