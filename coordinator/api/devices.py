"""Device API (/v1): enrolment, check-in, round plan and status, secure-aggregation stages,
update upload, reports, federated evaluation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from coordinator.api.deps import (
    ContextDep,
    CurrentDevice,
    RoundIdPath,
    SessionDep,
    SettingsDep,
    _bearer,
    read_body,
)
from coordinator.services import rounds
from coordinator.services.devices import authenticate, enroll
from protocol.wire import (
    AdvertiseKeys,
    CheckinRequest,
    CheckinResponse,
    EnrollRequest,
    EnrollResponse,
    EvalCounts,
    MaskedInputRequest,
    RoundPlan,
    RoundStatus,
    ShareKeys,
    ShareKeysRequest,
    TrainReport,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["devices"])


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("/devices/enroll", status_code=status.HTTP_201_CREATED)
def enroll_device(body: EnrollRequest, session: SessionDep, settings: SettingsDep) -> EnrollResponse:
    """Exchange the fleet's enrolment secret for a device id and a bearer token."""
    device_id, token = enroll(
        session,
        secret=body.enrollment_secret,
        expected_secret=settings.enrollment_secret.get_secret_value(),
        platform=body.platform,
        client_version=body.client_version,
        device_class=body.device_class,
    )
    return EnrollResponse(device_id=device_id, token=token)


@router.post("/checkin")
def checkin(
    body: CheckinRequest, request: Request, session: SessionDep, ctx: ContextDep, settings: SettingsDep
) -> CheckinResponse:
    """Report the device's state; get ``retry_after`` (pace steering) or an assignment."""
    if session.get_bind().dialect.name == "postgresql":
        # A check-in writes soft state (last seen, a place in a selection pool, at most the
        # closing of a selection): losing the last ~0.2 s of them in a crash is consistent (whole
        # transactions) and harmless (devices whose selection was lost get 409/410 and check in
        # again), so the commit need not wait for the WAL flush.
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    st = body.state
    device = authenticate(
        session,
        token=_bearer(request),
        rate_limit_per_minute=settings.rate_limit_per_minute,
        checkin={
            "last_checkin_at": ctx.now(),
            "client_version": st.client_version,
            "device_class": st.device_class,
            "data_bucket": max(0, int(st.examples).bit_length()),
        },
    )
    response = rounds.checkin(session, ctx, device=device, state=st)
    ctx.metrics.checkins.labels(response.action).inc()
    return response


@router.get("/rounds/{round_id}/plan")
def plan(
    round_id: RoundIdPath,
    request: Request,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> RoundPlan:
    rnd, _ = rounds.round_for_device(session, round_id, device)
    return rounds.plan_for(session, ctx, rnd, _base_url(request))


@router.get("/rounds/{round_id}/status")
def round_status(
    round_id: RoundIdPath, device: CurrentDevice, session: SessionDep, ctx: ContextDep
) -> RoundStatus:
    return rounds.status(session, ctx, round_id=round_id, device=device)


@router.post("/rounds/{round_id}/secagg/advertise", status_code=status.HTTP_204_NO_CONTENT)
def advertise(
    round_id: RoundIdPath,
    body: AdvertiseKeys,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    rounds.advertise(session, ctx, round_id=round_id, device=device, msg=body)


@router.get("/rounds/{round_id}/secagg/roster")
def roster(round_id: RoundIdPath, device: CurrentDevice, session: SessionDep) -> ShareKeysRequest:
    return rounds.roster(session, round_id=round_id, device=device)


@router.post("/rounds/{round_id}/secagg/shares", status_code=status.HTTP_204_NO_CONTENT)
def share_keys(
    round_id: RoundIdPath,
    body: ShareKeys,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    rounds.share_keys(session, ctx, round_id=round_id, device=device, msg=body)


@router.get("/rounds/{round_id}/secagg/shares")
def inbound_shares(round_id: RoundIdPath, device: CurrentDevice, session: SessionDep) -> MaskedInputRequest:
    """The encrypted shares addressed to this device (and only to it)."""
    return rounds.inbound_shares(session, round_id=round_id, device=device)


@router.get("/rounds/{round_id}/secagg/unmask")
def unmask_request(round_id: RoundIdPath, device: CurrentDevice, session: SessionDep) -> UnmaskRequest:
    return rounds.unmask_request(session, round_id=round_id, device=device)


@router.post("/rounds/{round_id}/secagg/unmask", status_code=status.HTTP_204_NO_CONTENT)
def unmask(
    round_id: RoundIdPath,
    body: UnmaskResponse,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    rounds.unmask(session, ctx, round_id=round_id, device=device, msg=body)


@router.put(
    "/rounds/{round_id}/update",
    responses={200: {"description": "accepted"}, 413: {"description": "body too large"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(
    round_id: RoundIdPath,
    request: Request,
    examples: Annotated[int, Query(ge=0, le=1 << 31, description="local examples behind the update")] = 0,
) -> Response:
    """The device's encoded (and, with secure aggregation, masked) update: a binary body in
    the format of protocol/wire.py, streamed into the round's running sum. Repeating an upload
    is harmless (idempotent per device and round)."""
    app = request.app
    token = _bearer(request)

    def check_auth() -> None:
        with app.state.sessions() as session, session.begin():
            authenticate(session, token=token, rate_limit_per_minute=app.state.settings.rate_limit_per_minute)

    await run_in_threadpool(check_auth)
    body = await read_body(request, app.state.settings.max_body_bytes)

    def work() -> bool:
        with app.state.sessions() as session, session.begin():
            device = authenticate(session, token=token, rate_limit_per_minute=1 << 30)
            return rounds.upload(
                session,
                app.state.ctx,
                round_id=round_id,
                device=device,
                body=body,
                examples=examples,
            )

    fresh = await run_in_threadpool(work)
    app.state.ctx.metrics.bytes_in.labels("update").inc(len(body))
    return Response(
        status_code=200,
        content=b'{"accepted":%s}' % (b"true" if fresh else b"false"),
        media_type="application/json",
    )


@router.post("/rounds/{round_id}/report", status_code=status.HTTP_204_NO_CONTENT)
def report(round_id: RoundIdPath, body: TrainReport, device: CurrentDevice, session: SessionDep) -> None:
    """Scalar training metrics (loss, examples, steps, seconds): never text."""
    rounds.report(session, round_id=round_id, device=device, msg=body)


@router.post("/rounds/{round_id}/evaluation", status_code=status.HTTP_204_NO_CONTENT)
def evaluation(
    round_id: RoundIdPath,
    body: EvalCounts,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    """Federated evaluation counts of the round's model on the device's recent messages."""
    rounds.evaluation(session, ctx, round_id=round_id, device=device, counts=body)
