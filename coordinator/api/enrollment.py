"""Admin API (/v1/admin, admin bearer token): one-time enrolment codes and device revocation.

Codes are shown once, in the answer that mints them; listings show only an id and the code's
first characters. Revoking a device stops its token at once, on every route.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, Field

from coordinator.api.deps import MAX_ID, AdminDep, SessionDep, TransactionalRoute
from coordinator.db.models import EnrollmentCode
from coordinator.services.devices import revoke_device
from coordinator.services.enrollment import CodeStatus, code_status, list_codes, mint_codes, revoke_code

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=TransactionalRoute)

MAX_CODES_PER_REQUEST = 1000
DeviceClass = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")]  # as devices report it
CodeIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="enrolment code id")]
DeviceIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="device id")]


class MintCodes(BaseModel):
    count: int = Field(default=1, ge=1, le=MAX_CODES_PER_REQUEST)
    expires_in_seconds: int | None = Field(default=None, ge=1, le=10 * 366 * 86400)
    """Unused codes stop working after this long (default: never)."""
    device_class: DeviceClass | None = None
    """The class of every device these codes enrol (check-ins cannot change it)."""


class CodePublic(BaseModel):
    """An enrolment code as listings show it: never the code, never its hash."""

    id: int
    prefix: str
    """The code's first characters, to tell codes apart."""
    status: CodeStatus
    device_class: str | None
    created_at: datetime
    expires_at: datetime | None
    used_at: datetime | None
    revoked_at: datetime | None
    device_id: str | None = None
    """The device the code enrolled."""


class MintedCode(CodePublic):
    code: str
    """The one-time code itself: shown in this answer only (the coordinator keeps its hash)."""


class MintedCodes(BaseModel):
    codes: list[MintedCode]


class DeviceRevoked(BaseModel):
    device_id: str
    revoked_at: datetime
    enrollment: str
    """How the device had enrolled: ``code`` or ``fleet`` (the fleet secret)."""
    enrollment_code_id: int | None


def _public(code: EnrollmentCode, now: datetime, device_id: str | None = None) -> CodePublic:
    return CodePublic(
        id=code.id,
        prefix=code.prefix,
        status=code_status(code, now),
        device_class=code.device_class,
        created_at=code.created_at,
        expires_at=code.expires_at,
        used_at=code.used_at,
        revoked_at=code.revoked_at,
        device_id=device_id,
    )


@router.post("/enrollment-codes", status_code=status.HTTP_201_CREATED)
def mint(body: MintCodes, _: AdminDep, session: SessionDep) -> MintedCodes:
    """Mint one-time enrolment codes (256 bits each). The codes are in this answer only."""
    now = datetime.now(UTC)
    minted = mint_codes(
        session,
        count=body.count,
        now=now,
        expires_in_seconds=body.expires_in_seconds,
        device_class=body.device_class,
    )
    return MintedCodes(
        codes=[MintedCode(**_public(row, now).model_dump(), code=code) for row, code in minted]
    )


@router.get("/enrollment-codes")
def list_enrollment_codes(
    _: AdminDep,
    session: SessionDep,
    status: Annotated[CodeStatus | None, Query(description="only codes in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_CODES_PER_REQUEST)] = 100,
) -> list[CodePublic]:
    """Enrolment codes, newest first (ids and prefixes only)."""
    now = datetime.now(UTC)
    return [
        _public(code, now, device_id)
        for code, device_id in list_codes(session, now=now, status=status, limit=limit)
    ]


@router.delete("/enrollment-codes/{code_id}")
def revoke_enrollment_code(code_id: CodeIdPath, _: AdminDep, session: SessionDep) -> CodePublic:
    """Revoke an unused code (idempotent); a used one answers 409: revoke its device instead."""
    now = datetime.now(UTC)
    return _public(revoke_code(session, code_id, now), now)


@router.post("/devices/{device_id}/revoke")
def revoke(device_id: DeviceIdPath, _: AdminDep, session: SessionDep) -> DeviceRevoked:
    """Revoke a device (idempotent): its token is refused (401) on every route from now on; its
    history stays. In an open round it is dropped at the next stage close."""
    device = revoke_device(session, device_id)
    assert device.revoked_at is not None
    return DeviceRevoked(
        device_id=device.id,
        revoked_at=device.revoked_at,
        enrollment=device.enrollment,
        enrollment_code_id=device.enrollment_code_id,
    )
