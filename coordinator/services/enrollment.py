"""One-time enrolment codes (minted, listed and revoked by the admin) and the rate limit of
enrolment attempts.

A code is a 256-bit random token shown once when it is minted; only its SHA-256 is stored
(with its first characters, so the admin can tell codes apart). Enrolment claims a code with
one conditional UPDATE (unused, unrevoked, unexpired), so two concurrent enrolments with the
same code create exactly one device: on PostgreSQL the second waits for the first's row lock
and then finds the code used; SQLite runs one write transaction at a time.

Enrolment attempts, successful or not, are counted per minute per client address and in all,
in the database (``enrollment_counters``): every worker and replica sees the same counts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal, cast

from sqlalchemy import ColumnElement, Table, and_, case, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from coordinator.db.models import Device, EnrollmentCode, EnrollmentCounter
from coordinator.security import hash_token, new_token
from coordinator.services.tasks import Conflict, NotFound

__all__ = [
    "CODE_PREFIX_CHARS",
    "CodeStatus",
    "address_key",
    "claim_code",
    "code_status",
    "list_codes",
    "mint_codes",
    "note_attempt",
    "revoke_code",
]

CODE_PREFIX_CHARS = 8  # characters of a code kept in clear (48 of its 256 bits)
GLOBAL_KEY = "all"

CodeStatus = Literal["active", "used", "expired", "revoked"]


def mint_codes(
    session: Session,
    *,
    count: int,
    now: datetime,
    expires_in_seconds: int | None = None,
    device_class: str | None = None,
) -> list[tuple[EnrollmentCode, str]]:
    """``count`` new codes: (stored row, the code itself). The code exists only in the answer."""
    expires = now + timedelta(seconds=expires_in_seconds) if expires_in_seconds is not None else None
    out = []
    for _ in range(count):
        code = new_token()
        row = EnrollmentCode(
            code_hash=hash_token(code),
            prefix=code[:CODE_PREFIX_CHARS],
            device_class=device_class,
            created_at=now,
            expires_at=expires,
        )
        session.add(row)
        out.append((row, code))
    session.flush()  # assigns the ids
    return out


def _usable(now: datetime) -> ColumnElement[bool]:
    c = EnrollmentCode
    return and_(
        c.used_at.is_(None),
        c.revoked_at.is_(None),
        or_(c.expires_at.is_(None), c.expires_at > now),
    )


def claim_code(session: Session, code: str, now: datetime) -> tuple[int, str | None] | None:
    """Mark ``code`` used if it is usable; returns (its id, its device class), or None for an
    unknown, used, expired or revoked code. Rolled back with the enrolment if that fails."""
    row = session.execute(
        update(EnrollmentCode)
        .where(EnrollmentCode.code_hash == hash_token(code), _usable(now))
        .values(used_at=now)
        .returning(EnrollmentCode.id, EnrollmentCode.device_class)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return None if row is None else (int(row[0]), row[1])


def code_status(code: EnrollmentCode, now: datetime) -> CodeStatus:
    if code.used_at is not None:
        return "used"
    if code.revoked_at is not None:
        return "revoked"
    expires = code.expires_at
    if expires is not None and (expires if expires.tzinfo else expires.replace(tzinfo=now.tzinfo)) <= now:
        return "expired"
    return "active"


def _status_filter(status: CodeStatus, now: datetime) -> ColumnElement[bool]:
    c = EnrollmentCode
    if status == "used":
        return c.used_at.is_not(None)
    if status == "revoked":
        return and_(c.used_at.is_(None), c.revoked_at.is_not(None))
    if status == "expired":
        return and_(c.used_at.is_(None), c.revoked_at.is_(None), c.expires_at <= now)
    return _usable(now)


def list_codes(
    session: Session, *, now: datetime, status: CodeStatus | None = None, limit: int = 100
) -> Sequence[tuple[EnrollmentCode, str | None]]:
    """Codes, newest first, with the id of the device each one enrolled (if used)."""
    q = (
        select(EnrollmentCode, Device.id)
        .outerjoin(Device, Device.enrollment_code_id == EnrollmentCode.id)
        .order_by(EnrollmentCode.id.desc())
        .limit(limit)
    )
    if status is not None:
        q = q.where(_status_filter(status, now))
    return [(code, device_id) for code, device_id in session.execute(q).all()]


def revoke_code(session: Session, code_id: int, now: datetime) -> EnrollmentCode:
    """Make an unused code unusable (idempotent); a used code answers 409: revoke its device."""
    code = session.get(EnrollmentCode, code_id, with_for_update=True)
    if code is None:
        raise NotFound(f"no enrolment code {code_id}")
    if code.used_at is not None:
        device_id = session.scalar(select(Device.id).where(Device.enrollment_code_id == code_id))
        raise Conflict(f"enrolment code {code_id} was used by device {device_id}: revoke the device")
    if code.revoked_at is None:
        code.revoked_at = now
    return code


# -- rate limit of enrolment attempts --------------------------------------------------------


def address_key(host: str | None) -> str:
    """The rate-limit key of a client address: the address itself for IPv4, its /64 for IPv6
    (one host usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return "addr:unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False).network_address}/64"
    return f"addr:{ip}"


def _bump(session: Session, key: str, minute: int) -> int:
    """Count one attempt under ``key`` in ``minute`` (one upsert); the count so far."""
    t = cast(Table, EnrollmentCounter.__table__)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(t)
        .values(key=key, minute=minute, attempts=1)
        .on_conflict_do_update(
            index_elements=[t.c.key],
            set_={
                "attempts": case((t.c.minute == minute, t.c.attempts + 1), else_=1),
                "minute": minute,
            },
        )
        .returning(t.c.attempts)
    )
    return int(session.execute(stmt).scalar_one())


def note_attempt(
    session: Session, *, address: str | None, per_address: int, total: int, now: float
) -> float | None:
    """Count an enrolment attempt; the seconds until the next minute when this minute's
    attempts from the address or in all exceed their limits, else None. The caller runs it in
    a transaction of its own, committed before the enrolment itself, so failed attempts count
    too. The first attempt of a minute prunes the counters of earlier minutes."""
    minute = int(now // 60)
    n_all = _bump(session, GLOBAL_KEY, minute)  # always first: one lock order for all requests
    if n_all == 1:
        session.execute(delete(EnrollmentCounter).where(EnrollmentCounter.minute < minute))
    n_addr = _bump(session, address_key(address), minute)
    if n_all > total or n_addr > per_address:
        return 60 - now % 60
    return None
