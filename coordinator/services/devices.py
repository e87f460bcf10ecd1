"""Device enrolment (one-time codes or a fleet secret), revocation, authentication and
per-device rate limits."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, Update, bindparam, case, delete, func, select, text, update
from sqlalchemy.orm import Session

from coordinator.db.models import Candidate, Device
from coordinator.security import hash_token, new_device_id, new_token, secret_matches
from coordinator.services.enrollment import claim_code, note_attempt
from coordinator.services.rounds import Forbidden
from coordinator.services.tasks import NotFound

__all__ = [
    "AuthError",
    "EnrollmentClosed",
    "RateLimited",
    "authenticate",
    "authenticate_id",
    "checkin_params",
    "checkin_result",
    "checkin_statement",
    "enroll",
    "limit_enrollment",
    "revoke_device",
]


class AuthError(Exception):
    """Missing, unknown or wrong credentials (401)."""


class EnrollmentClosed(Forbidden):
    """403: the fleet secret has enrolled as many devices as it may."""


class RateLimited(Exception):
    """Too many requests from one device (or enrolment attempts) in the current minute (429)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def limit_enrollment(session: Session, *, address: str | None, per_address: int, total: int) -> None:
    """Count an enrolment attempt from ``address``; :class:`RateLimited` (429) beyond this
    minute's limits (per address and in all). Commit it before enrolling: failed attempts
    count too, so guessing a fleet secret or a code is as slow as the limits make it."""
    wait = note_attempt(session, address=address, per_address=per_address, total=total, now=time.time())
    if wait is not None:
        raise RateLimited(retry_after=wait)


def enroll(
    session: Session,
    *,
    secret: str,
    fleet_secret: str,
    fleet_max_devices: int | None,
    platform: str,
    client_version: str,
    device_class: str,
    now: datetime | None = None,
) -> tuple[str, str]:
    """Create a device for a one-time enrolment code (claimed here: used once, never again)
    or, if one is configured, the fleet secret of a simulated fleet (at most
    ``fleet_max_devices`` devices, revoked ones included; None: unlimited). Returns
    (device id, bearer token). A code's device class, if it has one, is the device's for good."""
    now = now or datetime.now(UTC)
    claimed = claim_code(session, secret, now)
    if claimed is not None:
        code_id, code_class = claimed
        kind = "code"
    elif secret_matches(secret, fleet_secret):
        _check_fleet_cap(session, fleet_max_devices)
        code_id, code_class, kind = None, None, "fleet"
    else:
        raise AuthError("wrong enrolment secret, or an unknown, used, expired or revoked enrolment code")
    token = new_token()
    device = Device(
        id=new_device_id(),
        token_hash=hash_token(token),
        created_at=now,
        platform=platform,
        client_version=client_version,
        device_class=code_class or device_class,
        class_fixed=code_class is not None,
        enrollment=kind,
        enrollment_code_id=code_id,
    )
    session.add(device)
    session.flush()  # a clash (impossible in practice) fails here, inside the transaction
    return device.id, token


_FLEET_LOCK = 0x666C656574  # "fleet": serialises fleet-secret enrolments on PostgreSQL


def _check_fleet_cap(session: Session, cap: int | None) -> None:
    if cap is None:
        return
    if session.get_bind().dialect.name == "postgresql":  # SQLite: one writer at a time anyway
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _FLEET_LOCK})
    enrolled = session.scalar(select(func.count()).select_from(Device).where(Device.enrollment == "fleet"))
    if (enrolled or 0) >= cap:
        raise EnrollmentClosed(
            f"the fleet secret has enrolled its limit of {cap} devices: enrol with a one-time code"
        )


REVOKED_HASH_PREFIX = "revoked-"  # not hex: no SHA-256 hex digest of a token can equal it


def revoke_device(session: Session, device_id: str, now: datetime | None = None) -> Device:
    """Revoke a device (idempotent): its token stops working at once, on every route, check-ins
    included (its hash is replaced by a value no token hashes to, so the authenticating
    statements need no extra condition), and it leaves any selection pool. Its rows stay (the
    history of its rounds). In an open round it can send nothing more: it is dropped at the
    next stage close like any silent participant."""
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise NotFound(f"no device {device_id}")
    if device.revoked_at is None:
        device.revoked_at = now or datetime.now(UTC)
        device.token_hash = REVOKED_HASH_PREFIX + secrets.token_hex(32 - len(REVOKED_HASH_PREFIX) // 2)
        session.execute(delete(Candidate).where(Candidate.device_id == device_id))
    return device


def authenticate(session: Session, *, token: str, rate_limit_per_minute: int) -> Device:
    """The device owning ``token``, in one round trip: the same statement counts the request
    against the device's per-minute budget.

    The counter lives in the device row (no process memory). A refused request rolls back with
    its transaction, so hammering a limit does not extend it.
    """
    now = time.time()
    device: Device | None = session.execute(
        _auth_device_statement(),
        {"b_token": hash_token(token), "b_minute": int(now // 60)},
        execution_options={"synchronize_session": False},
    ).scalar_one_or_none()
    if device is None:
        raise AuthError("unknown or revoked device token")
    if device.rate_count > rate_limit_per_minute:
        raise RateLimited(retry_after=60 - now % 60)
    return device


@functools.cache
def _auth_device_statement() -> Update:
    """:func:`authenticate`'s statement, returning the whole device (built once: every device
    request but the check-in and the status runs it, and building and cache-keying it per
    request cost about as much as running it)."""
    t = cast(Table, Device.__table__)
    return (
        update(Device)
        .where(Device.token_hash == bindparam("b_token"))
        .values(**_counted(t))
        .returning(Device)
    )


def _counted(t: Table) -> dict[str, Any]:
    """The values that count a request against the device's budget for minute ``b_minute``
    (the bound statements below)."""
    return {
        "rate_count": case((t.c.rate_window == bindparam("b_minute"), t.c.rate_count + 1), else_=1),
        "rate_window": bindparam("b_minute"),
    }


@functools.cache
def _auth_statement() -> Update:
    """:func:`authenticate`'s statement returning only the id and the count (built once)."""
    t = cast(Table, Device.__table__)
    return (
        update(t)
        .where(t.c.token_hash == bindparam("b_token"))
        .values(**_counted(t))
        .returning(t.c.id, t.c.rate_count)
    )


def authenticate_id(session: Session, *, token: str, rate_limit_per_minute: int) -> str:
    """:func:`authenticate` for a route that needs only the device's id (the round status,
    which devices long-poll all round): the same statement and rules, without building an
    ORM object of the whole row."""
    now = time.time()
    row = session.execute(
        _auth_statement(), {"b_token": hash_token(token), "b_minute": int(now // 60)}
    ).one_or_none()
    if row is None:
        raise AuthError("unknown or revoked device token")
    device_id, count = row
    if count > rate_limit_per_minute:
        raise RateLimited(retry_after=60 - now % 60)
    return str(device_id)


@functools.cache
def checkin_statement() -> Update:
    """:func:`authenticate` for the hottest path: one statement that authenticates, counts the
    request and records the device's state, returning only what a check-in needs (device id,
    rate count, the number of its last round; :func:`checkin_result`) instead of a whole ORM
    object. On the autocommit connection of a check-in a refused request still counts (the
    refusal lasts until the minute ends). Built once: constructing and cache-keying the
    statement per request cost more than executing it."""
    t = cast(Table, Device.__table__)
    return (
        update(t)
        .where(t.c.token_hash == bindparam("b_token"))
        .values(
            **_counted(t),
            last_checkin_at=bindparam("b_seen", type_=t.c.last_checkin_at.type),
            client_version=bindparam("b_version", type_=t.c.client_version.type),
            # a class given by the device's enrolment code is kept
            device_class=case(
                (t.c.class_fixed, t.c.device_class),
                else_=bindparam("b_class", type_=t.c.device_class.type),
            ),
            data_bucket=bindparam("b_bucket", type_=t.c.data_bucket.type),
        )
        .returning(t.c.id, t.c.rate_count, t.c.last_round_number)
    )


def checkin_params(
    *, token: str, seen: datetime, client_version: str, device_class: str, data_bucket: int
) -> dict[str, object]:
    """The bind parameters of the check-in statement (:func:`checkin_statement`)."""
    return {
        "b_token": hash_token(token),
        "b_minute": int(time.time() // 60),
        "b_seen": seen,
        "b_version": client_version,
        "b_class": device_class,
        "b_bucket": data_bucket,
    }


def checkin_result(row: Sequence[Any] | None, *, rate_limit_per_minute: int) -> tuple[str, int]:
    """(device id, number of its last round) from the check-in statement's row; raises
    :class:`AuthError` for an unknown token and :class:`RateLimited` over the budget."""
    if row is None:
        raise AuthError("unknown or revoked device token")
    device_id, count, last_round = row
    if count > rate_limit_per_minute:
        raise RateLimited(retry_after=60 - time.time() % 60)
    return str(device_id), int(last_round)
