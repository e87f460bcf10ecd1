"""Device API (/v1): enrolment, check-in, round plan and status, secure-aggregation stages,
update upload, reports, federated evaluation."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from coordinator.api.deps import (
    ContextDep,
    CurrentDevice,
    RoundIdPath,
    SessionDep,
    SettingsDep,
    TransactionalRoute,
    _bearer,
    read_body,
)
from coordinator.api.longpoll import DB_BACKOFF, StatusWatch
from coordinator.db.session import AsyncStatement, single_statement
from coordinator.services import rounds
from coordinator.services.devices import (
    authenticate,
    authenticate_id,
    checkin_params,
    checkin_result,
    checkin_statement,
    enroll,
    limit_enrollment,
)
from coordinator.services.rounds import RoundContext
from protocol.wire import (
    MAX_DEVICES,
    MAX_INT32,
    MAX_REPORT_HEADER_BYTES,
    REPORT_HEADER,
    AdvertiseKeys,
    CheckinRequest,
    CheckinResponse,
    DeviceId,
    EnrollRequest,
    EnrollResponse,
    EvalCounts,
    MaskedInputRequest,
    RoundPlan,
    RoundStatus,
    ShareKeys,
    ShareKeysRequest,
    Stage,
    TrainReport,
    UnmaskRequest,
    UnmaskResponse,
    WireError,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["devices"], route_class=TransactionalRoute)


def _close_later(background: BackgroundTasks, request: Request, round_id: int, maybe_complete: bool) -> None:
    """A message that may have completed its stage closes it after the response is sent (and
    after its own transaction committed), so devices never wait for a stage transition."""
    if maybe_complete:
        app = request.app
        background.add_task(rounds.close_if_complete, app.state.sessions, app.state.ctx, round_id)


@router.post(
    "/devices/enroll",
    status_code=status.HTTP_201_CREATED,
    responses={
        401: {"description": "wrong secret; unknown, used, expired or revoked code"},
        403: {"description": "the fleet secret's device limit is reached"},
        429: {"description": "too many enrolment attempts (Retry-After)"},
    },
)
def enroll_device(body: EnrollRequest, request: Request, settings: SettingsDep) -> EnrollResponse:
    """Exchange a one-time enrolment code (minted by the admin), or the fleet secret of a
    simulated fleet, for a device id and a bearer token. Every attempt, successful or not,
    counts against the enrolment rate limits (per client address and in all; 429 beyond)."""
    app = request.app
    with app.state.soft_sessions() as counting, counting.begin():  # committed even if enrolment fails
        limit_enrollment(
            counting,
            address=request.client.host if request.client else None,
            per_address=settings.enrollment_per_address_per_minute,
            total=settings.enrollment_per_minute,
        )
    with app.state.sessions() as session, session.begin():
        device_id, token = enroll(
            session,
            secret=body.enrollment_secret,
            fleet_secret=settings.enrollment_secret.get_secret_value(),
            fleet_max_devices=settings.enrollment_secret_max_devices,
            platform=body.platform,
            client_version=body.client_version,
            device_class=body.device_class,
        )
    return EnrollResponse(device_id=device_id, token=token)


@router.post("/checkin")
async def checkin(body: CheckinRequest, request: Request) -> CheckinResponse:
    """Report the device's state; get ``retry_after`` (pace steering) or an assignment. A
    device that joins a selecting round's pool is held (:func:`_hold_candidate`) until the
    selection ends or ``candidate_hold_seconds`` pass, and then learns whether it was chosen."""
    app = request.app
    ctx: RoundContext = app.state.ctx
    fast: AsyncStatement | None = app.state.checkin_statement
    if fast is None:  # SQLite: the statement and the answer in one thread hop
        device_id, last_round, answer = await anyio.to_thread.run_sync(
            _checkin_in_thread, app, _bearer(request), body, limiter=app.state.checkin_limiter
        )
    else:
        device_id, last_round, answer = await _checkin_async(app, fast, _bearer(request), body)
    if isinstance(answer, rounds.Candidacy):
        response = await _hold_candidate(app, device_id, last_round, body, answer)
    else:
        response = answer
    ctx.metrics.checkins.labels(response.action).inc()
    return response


async def _hold_candidate(
    app: Any, device_id: str, last_round: int, body: CheckinRequest, candidacy: rounds.Candidacy
) -> CheckinResponse:
    """A candidate of a selecting round's pool waits here for the selection's end (at most
    ``candidate_hold_seconds``, and not past the selection's deadline), holding no thread and
    no database connection (the worker's :class:`StatusWatch`), then gets its assignment or
    its pace as any check-in would; if the selection is still open, it comes back shortly.

    Candidates used to come back every ``candidate_poll_seconds`` until the pool filled: with
    selections of 10-30 s those were most of a round's check-ins (1,214 a round for 130 selected
    of 400 devices, 2.3 ms of coordinator CPU each: bench/RESULTS.md), and a chosen device
    learned of its selection up to a poll later."""
    ctx: RoundContext = app.state.ctx
    hold = min(app.state.settings.candidate_hold_seconds, candidacy.seconds_left(ctx.now()))
    watch: StatusWatch = app.state.status_watch
    if hold <= 0 or not await watch.wait(candidacy.round_id, Stage.SELECTING, device_id, timeout=hold):
        return candidacy.response
    again = rounds.answer_from_view(
        await _round_views(app), ctx, device_id=device_id, last_round_number=last_round, state=body.state
    )
    # still a selecting round in this view (one older than the close): back shortly, as before
    return again if isinstance(again, CheckinResponse) else candidacy.response


async def _round_views(app: Any) -> rounds.Views:
    """The worker's round view; a stale one is refreshed in a check-in thread (one at a time,
    the others answer from the previous view)."""
    ctx: RoundContext = app.state.ctx
    snap = ctx.views_if_fresh()
    if snap is not None:
        return snap
    return await anyio.to_thread.run_sync(
        rounds.current_views, app.state.soft_sessions, ctx, limiter=app.state.checkin_limiter
    )


def _identity_params(app: Any, token: str, body: CheckinRequest) -> dict[str, object]:
    st = body.state
    return checkin_params(
        token=token,
        seen=app.state.ctx.now(),
        client_version=st.client_version,
        device_class=st.device_class,
        data_bucket=max(0, int(st.examples).bit_length()),
    )


CheckinAnswer = tuple[str, int, CheckinResponse | rounds.Candidacy]
"""The device, the number of the last round it was selected for, and its answer."""


def _checkin_in_thread(app: Any, token: str, body: CheckinRequest) -> CheckinAnswer:
    # One statement authenticates and records the state; most answers then come from the
    # worker's round view without another round trip. A few threads at a time (each with a
    # pooled connection of its own): more only queue on the GIL and the database.
    with single_statement(app.state.soft_engine) as conn:
        row = conn.execute(checkin_statement(), _identity_params(app, token, body)).one_or_none()
    device_id, last_round = checkin_result(
        row, rate_limit_per_minute=app.state.settings.rate_limit_per_minute
    )
    answer = rounds.checkin(
        app.state.soft_sessions,
        app.state.ctx,
        device_id=device_id,
        last_round_number=last_round,
        state=body.state,
    )
    return device_id, last_round, answer


async def _checkin_async(app: Any, fast: AsyncStatement, token: str, body: CheckinRequest) -> CheckinAnswer:
    """PostgreSQL: the statement on the event loop's own connection, the answer from the
    worker's round view; a thread only for a stale view's refresh (one at a time, the others
    answer from the previous view) and for joining a selection pool (a short transaction)."""
    ctx: RoundContext = app.state.ctx
    row = await fast.fetchone(_identity_params(app, token, body))
    device_id, last_round = checkin_result(
        row, rate_limit_per_minute=app.state.settings.rate_limit_per_minute
    )
    answer = rounds.answer_from_view(
        await _round_views(app), ctx, device_id=device_id, last_round_number=last_round, state=body.state
    )
    if isinstance(answer, CheckinResponse):
        return device_id, last_round, answer
    joined = await anyio.to_thread.run_sync(
        rounds.join_pool,
        app.state.soft_sessions,
        ctx,
        answer,
        device_id,
        body.state,
        limiter=app.state.checkin_limiter,
    )
    return device_id, last_round, joined


@router.get("/rounds/{round_id}/plan")
def plan(
    round_id: RoundIdPath,
    request: Request,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> RoundPlan:
    rnd, _ = rounds.round_for_device(session, round_id, device)
    return rounds.plan_for(session, ctx, rnd)


MAX_STATUS_WAIT = 30.0  # seconds a long poll of the round status may be held


def _status_moved(st: RoundStatus, since: Stage) -> bool:
    return st.stage != since or st.stage == Stage.DONE or st.participant_stage == Stage.DROPPED


@router.get("/rounds/{round_id}/status")
async def round_status(
    round_id: RoundIdPath,
    request: Request,
    since: Annotated[Stage | None, Query(description="the stage the device knows (long poll)")] = None,
    wait: Annotated[
        float, Query(ge=0, le=MAX_STATUS_WAIT, description="seconds to hold the answer (long poll)")
    ] = 0.0,
    payload: Annotated[
        bool, Query(description="bring this device's message of the stage (roster, shares, unmask request)")
    ] = False,
) -> RoundStatus:
    """The round's stage and the device's part in it. A long poll with ``since`` (the stage
    the device knows) and ``wait``: the answer comes as soon as the round leaves that stage or
    the device leaves the round, or after ``wait`` seconds. A waiting poll holds no database
    connection: the worker's :class:`~coordinator.api.longpoll.StatusWatch` watches the round
    view for all of them (refreshed every ``view_ttl``; a stage closed by this worker shows at
    once) and wakes a poll only when the view shows a change, so a round's devices learn of
    stage changes within a fraction of a second without polling the coordinator several times
    a second each. With ``payload`` the answer carries the device's message of the stage it
    reports (:func:`coordinator.services.rounds.with_payload`)."""
    app = request.app
    ctx: RoundContext = app.state.ctx
    token = _bearer(request)
    limit = app.state.settings.rate_limit_per_minute

    def first() -> tuple[str, RoundStatus]:
        with app.state.sessions() as session, session.begin():
            device_id = authenticate_id(session, token=token, rate_limit_per_minute=limit)
            return device_id, rounds.status_of(session, ctx, round_id=round_id, device_id=device_id)

    def again() -> RoundStatus:
        with app.state.sessions() as session:
            return rounds.status_of(session, ctx, round_id=round_id, device_id=device_id)

    def bring(st: RoundStatus) -> RoundStatus:
        with app.state.sessions() as session:
            return rounds.with_payload(session, ctx, st, device_id=device_id)

    async def answer(st: RoundStatus) -> RoundStatus:
        if payload and rounds.carries_payload(st):
            return await run_in_threadpool(bring, st)
        return st

    device_id, st = await run_in_threadpool(first)
    if since is None or wait <= 0 or _status_moved(st, since):
        return await answer(st)

    watch: StatusWatch = app.state.status_watch
    end = time.monotonic() + wait
    db_after = -math.inf  # no database read before this time (after one that showed no change)
    while await watch.wait(round_id, since, device_id, timeout=end - time.monotonic(), not_before=db_after):
        st = await run_in_threadpool(again)
        if _status_moved(st, since):
            return await answer(st)
        db_after = time.monotonic() + DB_BACKOFF
    return await answer(await run_in_threadpool(again))


@router.post("/rounds/{round_id}/secagg/advertise", status_code=status.HTTP_204_NO_CONTENT)
def advertise(
    round_id: RoundIdPath,
    body: AdvertiseKeys,
    request: Request,
    background: BackgroundTasks,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    done = rounds.advertise(session, ctx, round_id=round_id, device=device, msg=body)
    _close_later(background, request, round_id, done)


@router.get("/rounds/{round_id}/secagg/roster")
def roster(
    round_id: RoundIdPath, device: CurrentDevice, session: SessionDep, ctx: ContextDep
) -> ShareKeysRequest:
    return rounds.roster(session, ctx, round_id=round_id, device_id=device.id)


@router.post("/rounds/{round_id}/secagg/shares", status_code=status.HTTP_204_NO_CONTENT)
def share_keys(
    round_id: RoundIdPath,
    body: ShareKeys,
    request: Request,
    background: BackgroundTasks,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    done = rounds.share_keys(session, ctx, round_id=round_id, device=device, msg=body)
    _close_later(background, request, round_id, done)


@router.get("/rounds/{round_id}/secagg/shares")
def inbound_shares(
    round_id: RoundIdPath, device: CurrentDevice, session: SessionDep, ctx: ContextDep
) -> MaskedInputRequest:
    """The encrypted shares addressed to this device (and only to it)."""
    return rounds.inbound_shares(session, ctx, round_id=round_id, device_id=device.id)


@router.get("/rounds/{round_id}/secagg/unmask")
def unmask_request(round_id: RoundIdPath, device: CurrentDevice, session: SessionDep) -> UnmaskRequest:
    return rounds.unmask_request(session, round_id=round_id, device_id=device.id)


@router.post("/rounds/{round_id}/secagg/unmask", status_code=status.HTTP_204_NO_CONTENT)
def unmask(
    round_id: RoundIdPath,
    body: UnmaskResponse,
    request: Request,
    background: BackgroundTasks,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    done = rounds.unmask(session, ctx, round_id=round_id, device=device, msg=body)
    _close_later(background, request, round_id, done)


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
    background: BackgroundTasks,
    examples: Annotated[int, Query(ge=0, le=MAX_INT32, description="local examples behind the update")] = 0,
    omit: Annotated[
        list[DeviceId],
        Query(max_length=MAX_DEVICES, description="neighbours a masked input was made without"),
    ] = [],  # noqa: B006 (FastAPI copies defaults per request)
) -> Response:
    """The device's encoded (and, with secure aggregation, masked) update: a binary body in
    the format of protocol/wire.py, checked and stored until the round's sum is taken.
    Repeating an upload is harmless (idempotent per device and round). The training report
    may come along in the ``X-Fedkeys-Report`` header (``protocol.wire.REPORT_HEADER``)."""
    app = request.app
    token = _bearer(request)
    sessions = app.state.sessions
    train_report = _report_header(request)

    def check_auth() -> tuple[str, int | None]:
        with sessions() as session, session.begin():
            device = authenticate(
                session, token=token, rate_limit_per_minute=app.state.settings.rate_limit_per_minute
            )
            return device.id, rounds.expected_upload(session, round_id=round_id, device_id=device.id)

    # before the body is read: who sends it, whether it may send one now, and its exact size
    device_id, size = await run_in_threadpool(check_auth)
    if size is None:  # a repeat of an upload that is in: nothing to read
        return Response(status_code=200, content=b'{"accepted":false}', media_type="application/json")
    body = await read_body(request, app.state.settings.max_body_bytes, exact=size)

    def work() -> bool:
        # checked without locks; then one short transaction appends it
        with sessions() as session:
            weight = rounds.check_upload(
                session, round_id=round_id, device_id=device_id, body=body, examples=examples
            )
        if weight is None:
            return False
        with sessions() as session, session.begin():
            return rounds.upload(
                session,
                app.state.ctx,
                round_id=round_id,
                device_id=device_id,
                body=body,
                weight=weight,
                omitted=omit,
                report=train_report,
            )

    fresh = await run_in_threadpool(work)
    app.state.ctx.metrics.bytes_in.labels("update").inc(len(body))
    _close_later(background, request, round_id, fresh)
    return Response(
        status_code=200,
        content=b'{"accepted":%s}' % (b"true" if fresh else b"false"),
        media_type="application/json",
    )


def _report_header(request: Request) -> TrainReport | None:
    """The training report of an upload's header, bounded and checked before the body is read
    (422 with the reason when it is not a report)."""
    raw = request.headers.get(REPORT_HEADER)
    if raw is None:
        return None
    if len(raw) > MAX_REPORT_HEADER_BYTES:
        raise WireError(f"{REPORT_HEADER} is longer than {MAX_REPORT_HEADER_BYTES} bytes")
    try:
        return TrainReport.model_validate_json(raw)
    except ValidationError as e:
        raise WireError(f"{REPORT_HEADER} is not a training report: {e.error_count()} errors") from None


@router.post("/rounds/{round_id}/report", status_code=status.HTTP_204_NO_CONTENT)
def report(round_id: RoundIdPath, body: TrainReport, device: CurrentDevice, session: SessionDep) -> None:
    """Scalar training metrics (loss, examples, steps, seconds): never text."""
    rounds.report(session, round_id=round_id, device=device, msg=body)


@router.post("/rounds/{round_id}/evaluation", status_code=status.HTTP_204_NO_CONTENT)
def evaluation(
    round_id: RoundIdPath,
    body: EvalCounts,
    request: Request,
    background: BackgroundTasks,
    device: CurrentDevice,
    session: SessionDep,
    ctx: ContextDep,
) -> None:
    """Federated evaluation counts of the round's model on the device's recent messages."""
    done = rounds.evaluation(session, ctx, round_id=round_id, device=device, counts=body)
    _close_later(background, request, round_id, done)
