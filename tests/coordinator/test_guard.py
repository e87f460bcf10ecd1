"""The HTTP edge against hostile clients (issue 17, items 2, 11 and 13): body limits per route
before anything parses, strict JSON, error answers that never echo the input, a /metrics
scrape that costs no query, bounded evaluation counts; and, against a real TLS server on both
databases, 1 GB bodies to every route leave the server's memory flat."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from pydantic import ValidationError
from sqlalchemy import Integer, event
from starlette.requests import Request
from starlette.responses import Response

from bench.hostile_bodies import GB, attack, rss_kb
from coordinator.api.deps import BodyTooLarge, WrongBodySize, read_body, spool_body
from coordinator.api.guard import MAX_JSON_DEPTH, NO_BODY, BodyKind, json_problem, route_rules
from coordinator.app import create_app
from coordinator.config import Settings
from coordinator.db.models import EvalReport
from protocol.wire import EvalCounts
from tests.coordinator.scripted import ready_state
from tests.servers import start_server, stop_server

ADMIN = "admin-token-for-the-guard-tests"
SECRET = "enrolment-secret-for-the-guard-tests"
PATH_VALUES = {"round_id": "1", "name": "kb", "task": "kb", "version": "0", "bundle": "0" * 64}
BINARY = {("PUT", "/v1/rounds/{round_id}/update"), ("POST", "/v1/admin/tasks/{name}/bundle")}


class InProcess:
    """The real app (``create_app``, SQLite in a temporary directory, no background threads)
    served through httpx's ASGI transport on an event loop of its own thread, so that plain
    tests, hypothesis' included, can call it; one enrolled device."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.settings = Settings(
            database_url=f"sqlite:///{tmp / 'coordinator.db'}",
            data_dir=tmp / "data",
            admin_token=ADMIN,
            enrollment_secret=SECRET,
            publish_predict=False,
            log_json=False,
            rate_limit_per_minute=1_000_000,
            **settings,
        )
        self._stack = ExitStack()

    def __enter__(self) -> InProcess:
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        self.app: FastAPI = create_app(self.settings, background=False)
        self._stack.enter_context(
            self.portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app))
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(self.app), base_url="http://coordinator"
        )
        self._stack.callback(self.portal.call, self.client.aclose)
        r = self.request(
            "POST",
            "/v1/devices/enroll",
            json={"enrollment_secret": SECRET, "platform": "t", "client_version": "0.1.0"},
        )
        assert r.status_code == 201, r.text
        self.device_token: str = r.json()["token"]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self.client.request, method, url, **kw))

    def token_for(self, path: str) -> str:
        return ADMIN if path.startswith("/v1/admin") else self.device_token

    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every endpoint of the app."""
        out = []
        for rc in iter_route_contexts(self.app.routes):
            if rc.path is not None and rc.methods:
                out += [(m, rc.path) for m in sorted(rc.methods)]
        return out

    def json_routes(self) -> list[tuple[str, str]]:
        out = []
        for rc in iter_route_contexts(self.app.routes):
            if rc.path is not None and rc.methods and getattr(rc, "body_field", None) is not None:
                out += [(m, rc.path) for m in sorted(rc.methods)]
        return out


def concrete(template: str, values: dict[str, str] = PATH_VALUES) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "1"), template)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    with InProcess(tmp_path_factory.mktemp("guard"), metrics_refresh_seconds=3600) as a:
        yield a


# ---------------------------------------------------------------------------------------
# Body limits
# ---------------------------------------------------------------------------------------


def test_every_route_has_a_body_rule_derived_from_the_app(app: InProcess) -> None:
    rules = route_rules(
        app.app.routes,
        json_limit=app.settings.max_json_body_bytes,
        binary={
            ("PUT", "/v1/rounds/{round_id}/update"): app.settings.max_body_bytes,
            ("POST", "/v1/admin/tasks/{name}/bundle"): app.settings.max_bundle_bytes,
        },
    )
    json_routes = set(app.json_routes())
    assert {
        ("POST", "/v1/checkin"),
        ("POST", "/v1/devices/enroll"),
        ("POST", "/v1/admin/tasks"),
    } <= json_routes
    for method, template in app.routes():
        rule = rules.rule(method, concrete(template))
        if (method, template) in BINARY:
            assert rule.kind is BodyKind.BINARY and rule.limit >= app.settings.max_body_bytes
        elif (method, template) in json_routes:
            assert rule.kind is BodyKind.JSON and rule.limit == app.settings.max_json_body_bytes
        else:
            assert rule == NO_BODY, (method, template)
    assert rules.rule("POST", "/no/such/route") == NO_BODY
    assert rules.rule("DELETE", "/v1/checkin") == NO_BODY  # 405: no body either
    with pytest.raises(ValueError, match="not found"):
        route_rules(app.app.routes, json_limit=1, binary={("PUT", "/v1/renamed"): 1})


class _Source:
    """A request body of ``total`` bytes produced on demand, counting what was taken."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.taken = total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.taken < self.total:
            n = min(self.chunk, self.total - self.taken)
            self.taken += n
            yield b"\0" * n


def test_a_declared_length_over_the_limit_is_refused_unread(app: InProcess) -> None:
    for method, template in [
        *app.json_routes(),
        ("GET", "/healthz"),
        ("PUT", "/v1/rounds/{round_id}/update"),
    ]:
        body = _Source(GB)
        r = app.request(
            method,
            concrete(template),
            content=body,
            headers={
                "Content-Length": str(GB),
                "Content-Type": "application/json",
                "Authorization": "Bearer nope",
            },
        )
        assert r.status_code == 413, (method, template, r.status_code, r.text)
        assert r.headers["connection"] == "close", (method, template)
        assert "limit" in r.json()["detail"] or "takes no request body" in r.json()["detail"]
        assert body.taken == 0, (method, template, body.taken)


def test_a_streamed_body_is_refused_at_the_limit(app: InProcess) -> None:
    limit = app.settings.max_json_body_bytes
    for method, template in [*app.json_routes(), ("GET", "/metrics"), ("POST", "/no/such/route")]:
        body = _Source(GB)  # no Content-Length: streamed
        r = app.request(
            method,
            concrete(template),
            content=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {app.token_for(template)}",
            },
        )
        assert r.status_code == 413, (method, template, r.status_code, r.text)
        assert r.headers["connection"] == "close"
        assert body.taken <= limit + body.chunk, (method, template, body.taken)


def test_binary_routes_need_a_content_length(app: InProcess) -> None:
    for method, template in sorted(BINARY):
        body = _Source(10 * 1024 * 1024)
        r = app.request(
            method, concrete(template), content=body, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert r.status_code == 411 and body.taken == 0, (template, r.status_code, r.text)


def test_an_answer_before_the_body_was_read_closes_the_connection(app: InProcess) -> None:
    """The upload route refuses a bad token before it reads the body: the connection then
    closes, or uvicorn would go on reading (and discarding) what the client still sends."""
    body = _Source(1_000_000, chunk=1000)
    r = app.request(
        "PUT",
        "/v1/rounds/1/update",
        content=body,
        headers={"Content-Length": "1000000", "Authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and r.headers["connection"] == "close"
    assert body.taken < 1_000_000
    ok = app.request("GET", "/healthz")
    assert ok.status_code == 200 and "connection" not in ok.headers


def test_json_routes_take_json_only(app: InProcess) -> None:
    body = ready_state().model_dump_json().encode()
    auth = {"Authorization": f"Bearer {app.device_token}"}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = auth if ctype is None else {**auth, "Content-Type": ctype}
        r = app.request("POST", "/v1/checkin", content=b'{"state": %s}' % body, headers=headers)
        assert r.status_code == 415, (ctype, r.status_code, r.text)
    ok = app.request("POST", "/v1/checkin", json={"state": ready_state().model_dump()}, headers=auth)
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------
# Malformed JSON: 4xx with a reason, never the input
# ---------------------------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000
MALFORMED: dict[str, tuple[bytes, int]] = {
    "infinity": (b'{"state": {"battery_pct": Infinity, "pad": "xxxxxxxxxxxx"}}', 422),
    "nan": (b'{"state": {"battery_pct": NaN, "pad": "xxxxxxxxxxxxxxxxxxx"}}', 422),
    "-infinity": (b'{"loss_sum": -Infinity, "padding": "xxxxxxxxxx"}', 422),
    "1e400": (b'{"state": {"battery_pct": 1e400, "pad": "xxxxxxxxxxxxxxx"}}', 422),
    "big int": (b'{"version": 1' + b"0" * 5000 + b"}", 422),
    "int past 64 bits": (b'{"version": 18446744073709551616}', 422),
    "latin-1": ('{"platform": "t\xe9l\xe9phone"}'.encode("latin-1"), 400),
    "utf-16 with BOM": ('{"state": {}}'.encode("utf-16"), 400),
    "lone surrogate": (b'{"platform": "\\ud800 is not a character"}', 422),
    "deep": (NESTED, 422),
    "just deep enough": (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), 422),
    "truncated": (b'{"state": {"charging": tru', 422),
    "nul bytes": (b"\0" * 64, 422),
}


NASTY_BODIES: list[bytes] = [
    *(body for body, _ in MALFORMED.values()),
    b"",
    b"null",
    b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
    b'[{"state": {}}]',  # an array where an object is expected
    b'{"state": {}, "state": {"charging": true}}',  # a duplicate key
    b'"' + b"x" * 10_000 + b'"',
    b'{"a": "\x00\x01\x02"}',
    b"\x00" + b'{"state": {}}',
    b"\xc0\x80\xed\xa0\x80\xf4\x90\x80\x80",  # overlong, surrogate, past U+10FFFF
    b"-" * 100 + b"1",
    b"1" * 100 + b"e" + b"9" * 100,
    b'{"state": ' * 30 + b"1" + b"}" * 30,
]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_json_is_a_4xx_on_every_json_route(app: InProcess, name: str) -> None:
    body, status = MALFORMED[name]
    for method, template in app.json_routes():
        for token in (app.token_for(template), "nope"):
            r = app.request(
                method,
                concrete(template),
                content=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )
            assert r.status_code == status, (name, method, template, r.status_code, r.text[:300])
            assert r.json()["detail"] and body[:16] not in r.content


def test_json_problem_accepts_what_it_should() -> None:
    assert json_problem(b'{"a": [1, 2.5, -3e10, "\\ud83d\\ude00 [[[[", {"b": null}]}') is None
    assert json_problem(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None
    assert json_problem('{"emoji": "😀", "accent": "é"}'.encode()) is None
    assert json_problem(b'{"a": 9223372036854775807, "b": -9223372036854775808}') is None
    assert json_problem(b"[1e-400, 1.5E+308, 0.12345678901234567890123, 12345678901234567890.5]") is None
    assert json_problem(b'{"a": "1e400", "b": "99999999999999999999999", "c": "NaN [[[["}') is None
    for refused in (
        b"[9223372036854775808]",
        b"[-9223372036854775809]",
        b"[-1E+400]",
        b"[1" + b"0" * 400 + b".0]",
    ):
        problem = json_problem(refused)
        assert problem is not None and problem[0] == 422, refused
        assert "does not fit" in problem[1] or "out of range" in problem[1], problem


def test_validation_errors_never_echo_the_input(app: InProcess) -> None:
    marker = "Z" * 5000
    state = ready_state().model_dump() | {"client_version": marker, "battery_pct": marker}
    r = app.request(
        "POST",
        "/v1/checkin",
        json={"state": state, marker: 1},
        headers={"Authorization": f"Bearer {app.device_token}"},
    )
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert errors and all(set(e) == {"loc", "msg", "type"} for e in errors)
    assert "Z" * 65 not in r.text  # a location names a key: cut to 64 characters


def test_a_validation_error_inside_a_route_is_not_echoed(app: InProcess) -> None:
    """A model validated inside a route (e.g. a stored config) raises pydantic's own
    ValidationError: its answer names the fields, never the values."""
    with pytest.raises(ValidationError) as caught:
        EvalCounts.model_validate(
            {"words": "W" * 5000, "top1": float("nan"), "top3": 0, "loss_sum": float("inf"), "tokens": 0}
        )
    handler = app.app.exception_handlers[ValidationError]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""})
    response = handler(request, caught.value)
    assert isinstance(response, Response)
    assert response.status_code == 422
    text = bytes(response.body).decode()
    assert "words" in text and "WWWWWWWW" not in text and "nan" not in text.lower()


# ---------------------------------------------------------------------------------------
# read_body and spool_body
# ---------------------------------------------------------------------------------------


def _request(parts: list[bytes], content_length: int | None) -> Request:
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request(
        {"type": "http", "method": "PUT", "path": "/", "headers": headers, "query_string": b""}, receive
    )


def test_read_body_with_an_exact_size() -> None:
    async def read(parts: list[bytes], declared: int | None, **kw: Any) -> bytes:
        return await read_body(_request(parts, declared), 100, **kw)

    assert anyio.run(functools.partial(read, [b"ab", b"cd"], 4, exact=4)) == b"abcd"
    assert anyio.run(functools.partial(read, [b"ab", b"cd"], None)) == b"abcd"
    for parts, declared, error in [
        ([b"abcd"], None, WrongBodySize),  # no Content-Length: refused unread
        ([b"abcde"], 5, BodyTooLarge),
        ([b"abc"], 3, WrongBodySize),
        ([b"abc", b"def"], 4, BodyTooLarge),  # more than declared: stopped at the size
        ([b"abc"], 4, WrongBodySize),  # the stream ended short
    ]:
        with pytest.raises(error):
            anyio.run(functools.partial(read, parts, declared, exact=4))
    with pytest.raises(BodyTooLarge):
        anyio.run(functools.partial(read, [b"x" * 101], None))
    with pytest.raises(BodyTooLarge):
        anyio.run(functools.partial(read, [b"x"], 1, exact=101))  # more than the route's limit


def test_spool_body_writes_to_disk(tmp_path: Path) -> None:
    parts = [bytes([i]) * 300_000 for i in range(8)]  # 2.4 MB: more than one write
    dest = tmp_path / "body"
    size = anyio.run(spool_body, _request(parts, None), 10_000_000, dest)
    assert size == dest.stat().st_size == 2_400_000 and dest.read_bytes() == b"".join(parts)
    with pytest.raises(BodyTooLarge):
        anyio.run(spool_body, _request(parts, None), 1_000_000, tmp_path / "big")


# ---------------------------------------------------------------------------------------
# /metrics and the evaluation counts
# ---------------------------------------------------------------------------------------


def test_a_metrics_scrape_between_refreshes_costs_no_query(app: InProcess) -> None:
    from tests.coordinator.test_rounds import task_config

    created = app.request(
        "POST",
        "/v1/admin/tasks",
        json={"name": "metrics", "config": task_config()},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201, created.text
    app.app.state.privacy_gauges.refreshed = float("-inf")  # due now
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = app.app.state.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        per_scrape = []
        for _ in range(4):
            before = len(statements)
            r = app.request("GET", "/metrics")  # no token: Prometheus scrapes it as is
            assert r.status_code == 200 and "fedkeys_checkins" in r.text
            per_scrape.append(len(statements) - before)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert per_scrape[0] >= 1 and per_scrape[1:] == [0, 0, 0], per_scrape


def test_evaluation_counts_fit_their_columns() -> None:
    """Every count is bounded below what the int4 column holds (a larger one made PostgreSQL
    refuse the insert: a 500) and the loss is bounded per token."""
    int4 = (1 << 31) - 1
    for name in ("words", "top1", "top3", "tokens"):
        assert isinstance(EvalReport.__table__.c[name].type, Integer)
        bounds = [m.le for m in EvalCounts.model_fields[name].metadata if hasattr(m, "le")]
        assert bounds and bounds[0] < int4, name
        with pytest.raises(ValidationError):
            EvalCounts(**{"words": 0, "top1": 0, "top3": 0, "loss_sum": 0.0, "tokens": 0, name: int4 + 1})
    with pytest.raises(ValidationError):
        EvalCounts(words=10, top1=1, top3=2, loss_sum=1e300, tokens=10)
    with pytest.raises(ValidationError):
        EvalCounts(words=0, top1=0, top3=0, loss_sum=1.0, tokens=0)  # a loss with no tokens
    EvalCounts(words=5000, top1=1500, top3=2500, loss_sum=5000 * 6.5, tokens=7000)


# ---------------------------------------------------------------------------------------
# A real server: 1 GB bodies to every route
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_gb_bodies_to_every_route_leave_the_server_memory_flat(tmp_path: Path, db_url: str) -> None:
    """Every route, with a bad and a valid token, a declared and a chunked 1 GB body: each
    answered with a 4xx within seconds (a reset after the answer is the intended close), and
    the server's peak RSS stays within 50 MB of its RSS before. (A valid admin may upload a
    bundle up to its limit; here 64 MB, which keeps the test fast: bundles are spooled to
    disk, bench/hostile_bodies.py sends the full 1 GB.)"""
    server = start_server(tmp_path, db_url, extra_env={"FEDKEYS_MAX_BUNDLE_BYTES": str(64 << 20)})
    try:
        before, results = attack(server, GB)
        assert server.proc is not None
        after = rss_kb(server.proc.pid)
    finally:
        stop_server(server)
    assert len(results) >= 4 * 30
    bad = [(o.probe, o.status, o.error) for o, _ in results if not o.refused]
    assert not bad, bad
    assert max(o.seconds for o, _ in results) < 10
    grown_mb = (after["VmHWM"] - before["VmRSS"]) / 1024
    assert grown_mb < 50, (before, after)


def test_an_upload_is_refused_before_its_body_is_read_unless_the_device_may_send_it(app: InProcess) -> None:
    """Issue 17.2: the upload route authenticates, checks that the device is a live
    participant of the round's upload stage, and (when it is) that the declared size is the
    one the round's plan fixes, all before it reads a byte of the body."""
    read = {"chunks": 0}

    async def body() -> AsyncIterator[bytes]:
        for _ in range(16):
            read["chunks"] += 1
            yield b"\x00" * 65536

    for round_id in (1, 999):  # no such round, or one the device was not selected for
        read["chunks"] = 0
        r = app.request(
            "PUT",
            f"/v1/rounds/{round_id}/update",
            content=body(),
            headers={
                "Authorization": f"Bearer {app.device_token}",
                "Content-Length": str(16 * 65536),
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code in (403, 410), r.text
        assert read["chunks"] <= 1  # httpx may have pulled the first chunk; the route read none
