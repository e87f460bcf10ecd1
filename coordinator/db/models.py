"""Everything a round needs lives in these tables, so a restart resumes or cleanly fails rounds.

Uniqueness constraints carry the concurrency guarantees across workers and replicas:
a device is selected at most once per round (``participants`` primary key), an upload is
counted at most once (``participants.stage`` moves forward only under a row lock on the
round), and a model version number is committed once per task.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocol.wire import RoundKind

__all__ = [
    "Base",
    "Candidate",
    "Device",
    "EnrollmentCode",
    "EnrollmentCounter",
    "EvalReport",
    "ModelVersion",
    "Participant",
    "Round",
    "RoundUpload",
    "Task",
]


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
        bytes: LargeBinary,
    }


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the bearer token
    created_at: Mapped[datetime]
    platform: Mapped[str] = mapped_column(String(64))
    device_class: Mapped[str] = mapped_column(String(32), default="unknown")
    client_version: Mapped[str] = mapped_column(String(32))
    last_checkin_at: Mapped[datetime | None]
    last_selected_at: Mapped[datetime | None]
    participations: Mapped[int] = mapped_column(Integer, default=0)
    last_round_number: Mapped[int] = mapped_column(Integer, default=-(10**9))  # for the cooldown
    data_bucket: Mapped[int] = mapped_column(Integer, default=0)  # log2 bucket of local examples
    # selection signals (oort), from what the device reported: loss before its last local
    # training, that round's number, and the seconds from selection to its upload
    util_loss: Mapped[float | None] = mapped_column(Float)
    util_round: Mapped[int | None] = mapped_column(Integer)
    util_seconds: Mapped[float | None] = mapped_column(Float)
    rate_window: Mapped[int] = mapped_column(BigInteger, default=0)  # minute of the counter
    rate_count: Mapped[int] = mapped_column(Integer, default=0)
    # how the device enrolled: "code" (a one-time code, kept in enrollment_code_id) or "fleet"
    # (the fleet secret; devices enrolled before codes existed are "fleet" too)
    enrollment: Mapped[str] = mapped_column(String(8), server_default="fleet")
    enrollment_code_id: Mapped[int | None] = mapped_column(
        ForeignKey("enrollment_codes.id", name="fk_devices_enrollment_code_id")
    )
    # the enrolment code fixed the device class: check-ins do not change it
    class_fixed: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # revoked by the admin: the token hash was replaced (no token matches it); the row stays
    revoked_at: Mapped[datetime | None]


class EnrollmentCode(Base):
    """A one-time enrolment code minted by the admin. Only its SHA-256 is stored; ``prefix``
    (its first characters) lets the admin tell codes apart. Used at most once: the enrolment
    that claims it sets ``used_at`` in a conditional UPDATE, so of two concurrent enrolments
    with one code exactly one succeeds."""

    __tablename__ = "enrollment_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(8))
    device_class: Mapped[str | None] = mapped_column(String(32))  # given to the device it enrols
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class EnrollmentCounter(Base):
    """Enrolment attempts in one minute under one key (a client address, or all): the rate
    limit's state, shared by every worker and replica. Rows of past minutes are pruned."""

    __tablename__ = "enrollment_counters"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="paused")  # active | paused
    status_reason: Mapped[str | None] = mapped_column(String(512))  # why it paused itself
    config: Mapped[dict[str, Any]]
    current_version: Mapped[int | None]
    next_round: Mapped[int] = mapped_column(Integer, default=1)
    next_eval_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int]
    created_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))  # initial | round | rollback
    round_id: Mapped[int | None]
    parent_version: Mapped[int | None]
    weights_file: Mapped[str] = mapped_column(String(256))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    bundle_dir: Mapped[str] = mapped_column(String(256))  # bundle the weights belong to
    predict_file: Mapped[str | None] = mapped_column(String(256))  # published predict.pte
    predict_sha256: Mapped[str | None] = mapped_column(String(64))
    publish_claimed_at: Mapped[datetime | None]  # a worker is exporting predict.pte
    metrics: Mapped[dict[str, Any]]


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_id", "number"),
        Index("ix_rounds_open", "stage"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    number: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16), default=RoundKind.TRAIN)  # protocol.wire.RoundKind
    stage: Mapped[str] = mapped_column(String(16))  # see coordinator.services.rounds.context
    base_version: Mapped[int]
    plan: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    stage_started_at: Mapped[datetime]
    stage_deadline: Mapped[datetime]
    selection_target: Mapped[int]
    selected: Mapped[int] = mapped_column(Integer, default=0)
    reported: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(16))  # committed | failed
    failure_reason: Mapped[str | None] = mapped_column(String(512))
    new_version: Mapped[int | None]
    # serialised protocol.secagg server state, written when a stage closes (the messages of the
    # open stage are in the participants' rows); deferred: most requests only need the plan
    secagg_state: Mapped[bytes | None] = mapped_column(deferred=True)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]]
    finished_at: Mapped[datetime | None]
    claimed_at: Mapped[datetime | None]  # aggregation claimed by a worker (stale claims expire)
    # DP tasks: the round's sampling rate and joint noise multiplier, set once the coordinator
    # could compute its noisy sum (uploads closed); the accountant composes these
    dp_q: Mapped[float | None] = mapped_column(Float)
    dp_z: Mapped[float | None] = mapped_column(Float)


class Participant(Base):
    __tablename__ = "participants"
    __table_args__ = (Index("ix_participants_device", "device_id"),)

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    index: Mapped[int]  # 1-based position in the round (secure aggregation id)
    stage: Mapped[str] = mapped_column(String(16))  # last stage the device completed
    selected_at: Mapped[datetime]
    message_at: Mapped[datetime | None]  # the device's newest stage message (straggler rule)
    keys: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # advertised public keys
    # the device's share-keys message (JSON) until its stage closes, and its unmask response
    secagg_msg: Mapped[bytes | None] = mapped_column(deferred=True)
    unmask: Mapped[bytes | None] = mapped_column(deferred=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # scalar training metrics
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    download_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class RoundUpload(Base):
    """A device's verified upload (its wire form), kept until the round's sum is taken.

    Uploads only append rows (no read-modify-write of a shared running sum, so concurrent
    uploads never queue on one lock); the sum is streamed from them once, in O(d) memory, when
    the upload stage closes."""

    __tablename__ = "round_uploads"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    weight: Mapped[float] = mapped_column(Float, default=0.0)  # capped example count (plain rounds)
    body: Mapped[bytes] = mapped_column(deferred=True)


class Candidate(Base):
    """An eligible device that checked in while the round was selecting."""

    __tablename__ = "candidates"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    checked_in_at: Mapped[datetime]
    examples: Mapped[int] = mapped_column(Integer, default=0)


class EvalReport(Base):
    __tablename__ = "eval_reports"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    version: Mapped[int]
    words: Mapped[int]
    top1: Mapped[int]
    top3: Mapped[int]
    loss_sum: Mapped[float]
    tokens: Mapped[int]
