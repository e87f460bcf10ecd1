"""Device enrolment, authentication and per-device rate limits."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, Update, bindparam, case, update
from sqlalchemy.orm import Session

from coordinator.db.models import Device
from coordinator.security import hash_token, new_device_id, new_token, secret_matches

__all__ = [
    "AuthError",
    "RateLimited",
    "authenticate",
    "checkin_params",
    "checkin_result",
    "checkin_statement",
    "enroll",
]


class AuthError(Exception):
    """Missing, unknown or wrong credentials (401)."""


class RateLimited(Exception):
    """Too many requests from one device in the current minute (429)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def enroll(
    session: Session,
    *,
    secret: str,
    expected_secret: str,
    platform: str,
    client_version: str,
    device_class: str,
) -> tuple[str, str]:
    """Create a device if the fleet secret matches; returns (device id, bearer token)."""
    if not secret_matches(secret, expected_secret):
        raise AuthError("wrong enrolment secret")
    token = new_token()
    device = Device(
        id=new_device_id(),
        token_hash=hash_token(token),
        created_at=datetime.now(UTC),
        platform=platform,
        client_version=client_version,
        device_class=device_class,
    )
    session.add(device)
    return device.id, token


def authenticate(
    session: Session, *, token: str, rate_limit_per_minute: int, checkin: dict[str, object] | None = None
) -> Device:
    """The device owning ``token``, in one round trip: the same statement counts the request
    against the device's per-minute budget (and, for a check-in, records its state).

    The counter lives in the device row (no process memory). A refused request rolls back with
    its transaction, so hammering a limit does not extend it.
    """
    now = time.time()
    minute = int(now // 60)
    values: dict[str, object] = {
        "rate_count": case((Device.rate_window == minute, Device.rate_count + 1), else_=1),
        "rate_window": minute,
        **(checkin or {}),
    }
    device = session.execute(
        update(Device)
        .where(Device.token_hash == hash_token(token))
        .values(**values)
        .returning(Device)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if device is None:
        raise AuthError("unknown or revoked device token")
    if device.rate_count > rate_limit_per_minute:
        raise RateLimited(retry_after=60 - now % 60)
    return device


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
            rate_count=case((t.c.rate_window == bindparam("b_minute"), t.c.rate_count + 1), else_=1),
            rate_window=bindparam("b_minute"),
            last_checkin_at=bindparam("b_seen", type_=t.c.last_checkin_at.type),
            client_version=bindparam("b_version", type_=t.c.client_version.type),
            device_class=bindparam("b_class", type_=t.c.device_class.type),
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
