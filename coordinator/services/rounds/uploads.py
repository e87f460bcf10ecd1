"""Uploads and sums: the size an upload must have, its check before any lock, its write, and
the sum of a round's updates without secure aggregation (masked inputs are summed by the
secure-aggregation server when their stage closes, :mod:`.closes`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from coordinator.db.models import Device, Participant, Round, RoundUpload
from coordinator.round_plan import plan_of
from coordinator.services.rounds.context import Gone, RoundContext, StageConflict, utc
from coordinator.services.rounds.messages import (
    expect_stage,
    lock_shared,
    my_part,
    record_report,
    round_and_participant,
)
from protocol.codec import check_update_norm, encoded_length, packed_size, ring_bits
from protocol.wire import (
    HEADER_SIZE,
    Stage,
    TrainReport,
    UpdateKind,
    WireError,
    peek_header,
    unpack_dense_update,
    unpack_update,
    verify_update,
)

__all__ = ["PlainSum", "check_upload", "expected_upload", "plain_sum", "stored_uploads", "upload"]


def _upload_slot(session: Session, round_id: int, device_id: str) -> Round | None:
    """The round, if this device may upload to it now (a live participant of its upload stage;
    the usual 403/409/410 otherwise); None when its update is in already (a repeat)."""
    rnd, part = round_and_participant(session, round_id, device_id)
    if part.stage in (Stage.MASKED_INPUT, Stage.UPLOAD, Stage.UNMASK):
        return None
    if part.stage == Stage.DROPPED:
        raise Gone(f"round {rnd.id} went on without this device")
    if rnd.stage == Stage.DONE:
        raise Gone(f"round {rnd.id} is over ({rnd.outcome})")
    expect_stage(rnd, Stage.MASKED_INPUT, Stage.UPLOAD)
    if rnd.stage == Stage.MASKED_INPUT and part.stage != Stage.SHARE_KEYS:
        raise Gone("device did not complete key sharing in time")
    return rnd


def expected_upload(session: Session, *, round_id: int, device_id: str) -> int | None:
    """Bytes of the upload this device may send now, checked before its body is read: the
    device must be a live participant of the round's upload stage (else the usual 403/409/410),
    and the frame's size is fixed by the round's plan. None for a repeat (already in: the body
    need not be read at all)."""
    got = _upload_slot(session, round_id, device_id)
    if got is None:
        return None
    p = plan_of(got)
    if got.stage == Stage.MASKED_INPUT:
        assert p.secagg is not None
        return HEADER_SIZE + packed_size(p.secagg.vector_length, p.secagg.ring_bits)
    if p.codec is None:
        return HEADER_SIZE + 4 * p.dim
    return HEADER_SIZE + packed_size(encoded_length(p.codec, p.dim), ring_bits(p.codec))


def check_upload(
    session: Session, *, round_id: int, device_id: str, body: bytes, examples: int
) -> float | None:
    """Validate an upload against the round's plan before any lock is taken (header, sizes,
    CRC; float updates are decoded for NaN/Inf): the costly part. Returns the update's weight
    (capped example count; 0 with secure aggregation, whose weights travel inside the masked
    vector), or None when it is a repeat. Raises the usual 4xx errors otherwise; the write
    (:func:`upload`) re-checks the stage under the round's lock."""
    got = _upload_slot(session, round_id, device_id)
    if got is None:
        return None  # idempotent: this device's update is already in
    rnd, p = got, plan_of(got)
    if rnd.stage == Stage.MASKED_INPUT:
        assert p.secagg is not None
        verify_update(
            body,
            expected_round=rnd.id,
            expected_layout_hash=p.layout_hash,
            expected_bits=p.secagg.ring_bits,
            expected_length=p.secagg.vector_length,
        )
        return 0.0
    weight = float(min(max(examples, 0), p.weight_cap))
    if weight <= 0:
        raise StageConflict("an update must come with a positive example count")
    _decode_plain(rnd, body)
    return weight


def _decode_plain(rnd: Round, body: bytes) -> tuple[str, npt.NDArray[Any]]:
    """An update of a round without secure aggregation: ("ring", values) for the compressed
    codec, ("float", values) for float32 updates."""
    p = plan_of(rnd)
    dim = p.dim
    expected_hash = p.layout_hash
    header = peek_header(body)
    codec = p.codec
    if header.kind == UpdateKind.DENSE_F32 and codec is None:
        _, vec = unpack_dense_update(
            body, expected_round=rnd.id, expected_layout_hash=expected_hash, expected_dim=dim
        )
        return "float", vec
    if header.kind == UpdateKind.RING and codec is not None:
        _, values = unpack_update(
            body,
            expected_round=rnd.id,
            expected_layout_hash=expected_hash,
            expected_bits=ring_bits(codec),
            expected_length=encoded_length(codec, dim),
        )
        check_update_norm(values, codec, dim)  # the server sees this update: it is checked alone
        return "ring", values
    raise WireError(f"update kind {header.kind.name} does not match this round's codec")


def upload(
    session: Session,
    ctx: RoundContext,
    *,
    round_id: int,
    device_id: str,
    body: bytes,
    weight: float,
    omitted: Sequence[str] = (),
    report: TrainReport | None = None,
) -> bool:
    """Record a checked upload (appended: no shared row is rewritten). False for a repeat.
    ``omitted``: the neighbours a masked input was made without (unusable shares), checked
    against the relayed shares and kept in the participant's message slot until the stage
    closes (:mod:`.closes`). ``report``: the training report that came with it."""
    rnd = lock_shared(session, round_id)
    part = my_part(session, rnd, device_id, lock=True)
    if part.stage in (Stage.MASKED_INPUT, Stage.UPLOAD, Stage.UNMASK):
        return False  # idempotent: this device's update is already in
    expect_stage(rnd, Stage.MASKED_INPUT, Stage.UPLOAD)
    secure = rnd.stage == Stage.MASKED_INPUT
    if secure and part.stage != Stage.SHARE_KEYS:
        raise Gone("device did not complete key sharing in time")
    if omitted and not secure:
        raise StageConflict("only a masked input names neighbours it masked without")
    if secure:
        omitted = ctx.secagg_snapshot(rnd).check_omissions(device_id, omitted)
        part.secagg_msg = json.dumps(list(omitted)).encode() if omitted else None
    # The round takes K updates. Uploads in flight at once on PostgreSQL (share locks) can
    # overshoot by a few, never beyond the selected devices that the ring's headroom covers.
    have = session.scalar(
        select(func.count())
        .select_from(Participant)
        .where(Participant.round_id == rnd.id, Participant.stage.in_((Stage.MASKED_INPUT, Stage.UPLOAD)))
    )
    k = plan_of(rnd).clients_per_round
    if (have or 0) >= k:
        raise Gone(f"round {rnd.id} already has the {k} updates it needs")
    if report is not None:
        record_report(session, rnd, part, report)
    session.add(RoundUpload(round_id=rnd.id, device_id=device_id, weight=weight, body=body))
    part.stage = Stage.MASKED_INPUT if secure else Stage.UPLOAD
    part.upload_bytes = len(body)
    session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(util_seconds=(ctx.now() - utc(part.selected_at)).total_seconds())  # oort's speed
    )
    return True


def stored_uploads(session: Session, round_id: int) -> Iterator[tuple[str, float, bytes]]:
    """The round's stored uploads, one at a time (O(d) memory however many there are)."""
    ids = session.execute(
        select(RoundUpload.device_id, RoundUpload.weight)
        .where(RoundUpload.round_id == round_id)
        .order_by(RoundUpload.device_id)
    ).all()
    for device_id, weight in ids:
        body = session.scalar(
            select(RoundUpload.body).where(
                RoundUpload.round_id == round_id, RoundUpload.device_id == device_id
            )
        )
        if body is not None:
            yield device_id, weight, body


@dataclass(frozen=True)
class PlainSum:
    """The sum of a round's updates without secure aggregation."""

    total: npt.NDArray[Any] | None
    """uint32 ring words for the compressed codec (the ring width keeps the true sum below
    2**k), else the weighted float64 sum; None when no update arrived."""
    weight: float
    count: int
    clipped: int = 0
    """Float updates the coordinator clipped to the task's clip norm."""


def plain_sum(session: Session, rnd: Round, clip_norm: float) -> PlainSum:
    """The sum of a round's updates without secure aggregation. Float updates (no codec, so no
    clipping on the device) are clipped here to ``clip_norm``, the bound the codec applies on
    devices: no single device moves the weighted mean further than that."""
    total: npt.NDArray[Any] | None = None
    weight_sum, n, clipped = 0.0, 0, 0
    for _, weight, body in stored_uploads(session, rnd.id):
        kind, values = _decode_plain(rnd, body)
        if kind == "ring":
            if total is None:
                total = np.zeros(len(values), dtype=np.uint32)
            np.add(total, values.astype(np.uint32, copy=False), out=total)
        else:
            if total is None:
                total = np.zeros(plan_of(rnd).dim, dtype=np.float64)
            v = values.astype(np.float64)
            norm = float(np.linalg.norm(v))
            if norm > clip_norm:
                v *= clip_norm / norm
                clipped += 1
            total += weight * v
        weight_sum += weight
        n += 1
    return PlainSum(total, weight_sum, n, clipped)
