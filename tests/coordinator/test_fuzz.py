"""Arbitrary bytes to every route (issue 17, item 11): whatever the path parameters, query,
token, Content-Type and body, the answer is never a 5xx (nor a dropped connection), and a
refusal never echoes the body it refuses. Schemathesis (test_schemathesis.py) only sends
schema-shaped JSON; here the bodies are hypothesis' ``st.binary()`` and hand-picked nasties
(invalid UTF-8, non-finite numbers, deep nesting, huge integers, valid messages with one
field replaced). In-process against the real app for many examples, and a smaller sample
against a real TLS server for what only the transport shows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.coordinator.scripted import ready_state
from tests.coordinator.test_guard import ADMIN, NASTY_BODIES, InProcess
from tests.servers import Server

VALID_PATH = {"round_id": "1", "name": "kb", "task": "kb", "version": "0", "bundle": "0" * 64}
HOSTILE_PATH = [
    "0",
    "-1",
    "99999999999999999999999",
    "1e400",
    "nan",
    "%00",
    "%ff%fe",
    "..%2F..%2Fetc",
    "a" * 300,
    "%E2%80%AE",
]
QUERIES = ["", "?wait=nan", "?wait=1e400&since=x", "?examples=-1", "?base=99999999999999999999", "?x=%ff"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
CONTENT_TYPES = [
    "application/json",
    "application/octet-stream",
    "text/plain",
    None,
    "application/json; charset=utf-16",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]


def _valid_bodies() -> list[dict[str, Any]]:
    return [
        {"state": ready_state().model_dump()},
        {"enrollment_secret": "x", "platform": "fuzz", "client_version": "0.1.0"},
        {"words": 10, "top1": 1, "top3": 2, "loss_sum": 3.0, "tokens": 12},
        {"loss_before": 1.0, "loss_after": 0.5, "examples": 10, "steps": 2, "seconds": 1.0},
        {"version": 0},
    ]


REPLACEMENTS: list[Any] = [None, "x" * 10_000, 1e308, -1, 2**64, [], {}, True, "\u0000", -0.0, "😀"]


def _one_field_replaced(body: dict[str, Any], value: Any) -> bytes:
    """``body`` with its first (innermost, for the check-in) field set to ``value``."""
    out = json.loads(json.dumps(body))
    target = out.get("state", out)
    target[next(iter(target))] = value
    return json.dumps(out).encode()


MUTATED = [_one_field_replaced(b, v) for b in _valid_bodies() for v in REPLACEMENTS]
BODIES = st.one_of(
    st.binary(max_size=4096),
    st.sampled_from(NASTY_BODIES + MUTATED),
    st.builds(lambda b: json.dumps(b).encode(), st.sampled_from(_valid_bodies())),
)


def _concrete(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "1"), template)


def _check(
    r: httpx.Response, body: bytes, what: tuple[Any, ...], resend: Callable[[bytes], httpx.Response]
) -> None:
    """No 5xx; and a refusal does not contain a body of more than 8 bytes, unless it also
    does when that body's last byte is changed (then its own fixed text contains it)."""
    assert r.status_code < 500, (*what, r.status_code, r.text[:300])
    if r.status_code >= 400 and len(body) > 8 and body in r.content:
        other = resend(body[:-1] + bytes([body[-1] ^ 1]))
        assert body in other.content, (*what, "the answer echoes the body", r.text[:300])


def _send(
    via: InProcess | httpx.Client, method: str, path: str, headers: dict[str, str], body: bytes
) -> httpx.Response:
    return via.request(method, path, content=body, headers=headers)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    with InProcess(tmp_path_factory.mktemp("fuzz")) as a:
        from tests.coordinator.test_rounds import task_config

        r = a.request(
            "POST",
            "/v1/admin/tasks",
            json={"name": "kb", "config": task_config()},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 201, r.text
        yield a


def _tokens(a: InProcess) -> list[str | None]:
    return [None, "wrong", a.device_token, ADMIN]


def test_every_nasty_body_on_every_route_is_never_a_5xx(app: InProcess) -> None:
    """Each hand-picked body to each route, with no token and with the route's valid token."""
    for method, template in app.routes():
        path = _concrete(template, VALID_PATH)
        for token in (None, app.token_for(template)):
            for body in NASTY_BODIES:
                headers = {"Content-Type": "application/json"}
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                send = partial(_send, app, method, path, headers)
                _check(send(body), body, (method, path, token is not None, body[:40]), send)


def test_arbitrary_requests_in_process(app: InProcess) -> None:
    routes = app.routes()
    tokens = _tokens(app)

    @given(
        route=st.sampled_from(routes),
        method=st.one_of(st.none(), st.sampled_from(METHODS)),
        path_value=st.one_of(st.none(), st.sampled_from(HOSTILE_PATH)),
        query=st.sampled_from(QUERIES),
        token=st.sampled_from(tokens),
        content_type=st.sampled_from(CONTENT_TYPES),
        body=BODIES,
    )
    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(
        route: tuple[str, str],
        method: str | None,
        path_value: str | None,
        query: str,
        token: str | None,
        content_type: str | None,
        body: bytes,
    ) -> None:
        values = VALID_PATH if path_value is None else dict.fromkeys(VALID_PATH, path_value)
        path = _concrete(route[1], values) + query
        headers = {} if content_type is None else {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        send = partial(_send, app, method or route[0], path, headers)
        _check(send(body), body, (method or route[0], path, content_type, body[:40]), send)

    check()


@pytest.mark.slow
def test_arbitrary_requests_over_tls(sqlite_server: Server, tmp_path: Path) -> None:
    """A smaller sample against the real server (uvicorn, TLS): a dropped connection shows
    here as an httpx error, which fails the test like a 5xx does."""
    server = sqlite_server
    with server.client() as c:
        enrolled = c.post(
            "/v1/devices/enroll",
            json={"enrollment_secret": server.enroll_secret, "platform": "fuzz", "client_version": "0.1.0"},
        )
        assert enrolled.status_code == 201, enrolled.text
        routes = [
            (m.upper(), p)
            for p, ops in c.get("/openapi.json").json()["paths"].items()
            for m in ops
            if m != "parameters"
        ]
    tokens = [None, "wrong", enrolled.json()["token"], server.admin_token]

    with httpx.Client(base_url=server.url, verify=server.tls(), timeout=30) as client:

        @given(
            route=st.sampled_from(routes),
            path_value=st.one_of(st.none(), st.sampled_from(HOSTILE_PATH)),
            token=st.sampled_from(tokens),
            content_type=st.sampled_from(CONTENT_TYPES),
            body=BODIES,
        )
        @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(
            route: tuple[str, str],
            path_value: str | None,
            token: str | None,
            content_type: str | None,
            body: bytes,
        ) -> None:
            values = VALID_PATH if path_value is None else dict.fromkeys(VALID_PATH, path_value)
            path = _concrete(route[1], values)
            headers = {} if content_type is None else {"Content-Type": content_type}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            send = partial(_send, client, route[0], path, headers)
            _check(send(body), body, (route[0], path, content_type, body[:40]), send)

        check()
        for body in NASTY_BODIES:  # and each nasty once, to the check-in, over the wire
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {tokens[2]}"}
            send = partial(_send, client, "POST", "/v1/checkin", headers)
            _check(send(body), body, ("POST", "/v1/checkin", body[:40]), send)
