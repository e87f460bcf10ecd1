"""Device enrolment, authentication and per-device rate limits."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.models import Device
from coordinator.security import hash_token, new_device_id, new_token, secret_matches

__all__ = ["AuthError", "RateLimited", "authenticate", "enroll"]


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


def authenticate(session: Session, *, token: str, rate_limit_per_minute: int) -> Device:
    """The device owning ``token``; counts the request against its per-minute budget.

    The counter lives in the device row (no process memory), updated in the same transaction
    as the request's own work.
    """
    device = session.scalars(select(Device).where(Device.token_hash == hash_token(token))).one_or_none()
    if device is None:
        raise AuthError("unknown or revoked device token")
    now = time.time()
    minute = int(now // 60)
    if device.rate_window != minute:
        session.execute(update(Device).where(Device.id == device.id).values(rate_window=minute, rate_count=1))
    else:
        if device.rate_count >= rate_limit_per_minute:
            raise RateLimited(retry_after=60 - now % 60)
        session.execute(update(Device).where(Device.id == device.id).values(rate_count=Device.rate_count + 1))
    return device
