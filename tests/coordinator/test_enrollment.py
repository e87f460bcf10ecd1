"""Enrolment: one-time codes (minted, listed, revoked by the admin), the fleet secret's cap,
rate limits shared through the database, and device revocation on every route."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db.migrate import upgrade
from coordinator.db.models import Device, EnrollmentCode, EnrollmentCounter
from coordinator.db.session import make_engine, make_sessionmaker
from coordinator.services.devices import AuthError, EnrollmentClosed, enroll
from coordinator.services.enrollment import address_key, note_attempt
from tests.coordinator.scripted import ready_state
from tests.coordinator.test_rounds import setup_task, task_config
from tests.servers import Server, start_server, stop_server

ENROL = "/v1/devices/enroll"
CODES = "/v1/admin/enrollment-codes"


def _body(secret: str, device_class: str = "unknown") -> dict[str, str]:
    return {
        "enrollment_secret": secret,
        "platform": "t",
        "client_version": "0.1.0",
        "device_class": device_class,
    }


def _mint(server: Server, **body: Any) -> list[dict[str, Any]]:
    with server.admin() as a:
        r = a.post(CODES, json=body)
    assert r.status_code == 201, r.text
    codes: list[dict[str, Any]] = r.json()["codes"]
    return codes


def _codes(server: Server, **params: Any) -> list[dict[str, Any]]:
    with server.admin() as a:
        r = a.get(CODES, params=params)
    assert r.status_code == 200, r.text
    listed: list[dict[str, Any]] = r.json()
    return listed


def _fresh_minute() -> None:
    """Wait out the end of the current minute if it is close: the counters are per minute."""
    left = 60 - time.time() % 60
    if left < 8:
        time.sleep(left + 0.1)


@pytest.fixture
def db(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


# -- codes over the API -----------------------------------------------------------------------


@pytest.mark.slow
def test_codes_are_one_time_stored_hashed_listed_and_revocable(server: Server) -> None:
    minted = _mint(server, count=3, device_class="rpi4")
    codes = [c["code"] for c in minted]
    assert len(set(codes)) == 3 and all(len(c) >= 43 for c in codes)  # 256 bits, URL-safe base64
    assert all(c["status"] == "active" and c["prefix"] == c["code"][:8] for c in minted)
    engine = make_engine(server.db_url)
    try:
        with engine.connect() as conn:
            stored = " ".join(
                conn.execute(text("SELECT code_hash || prefix FROM enrollment_codes")).scalars()
            )
    finally:
        engine.dispose()
    assert not any(c in stored for c in codes)  # only hashes (and 8-character prefixes)

    listed = _codes(server)
    assert {c["id"] for c in listed} == {c["id"] for c in minted}
    assert all("code" not in c and "code_hash" not in c for c in listed)

    with server.client() as c:
        r = c.post(ENROL, json=_body(codes[0], device_class="phone"))
        assert r.status_code == 201, r.text
        device_id, token = r.json()["device_id"], r.json()["token"]
        again = c.post(ENROL, json=_body(codes[0]))
        assert again.status_code == 401 and "code" in again.json()["detail"]
    # the code's class is the device's for good: a check-in claiming another does not change it
    with server.client(token) as c:
        state = ready_state().model_copy(update={"device_class": "phone"})
        assert c.post("/v1/checkin", json={"state": state.model_dump()}).status_code == 200
    with server.admin() as a:
        assert a.get("/v1/admin/devices/summary").json()["by_class"] == {"rpi4": 1}
    used = {c["id"]: c for c in _codes(server, status="used")}
    assert list(used) == [minted[0]["id"]] and used[minted[0]["id"]]["device_id"] == device_id

    with server.admin() as a:
        r = a.delete(f"{CODES}/{minted[1]['id']}")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert a.delete(f"{CODES}/{minted[1]['id']}").status_code == 200  # idempotent
        assert a.delete(f"{CODES}/{minted[0]['id']}").status_code == 409  # used: revoke the device
        assert a.delete(f"{CODES}/999999").status_code == 404
    with server.client() as c:
        assert c.post(ENROL, json=_body(codes[1])).status_code == 401

    (short,) = _mint(server, expires_in_seconds=1)
    time.sleep(1.5)
    with server.client() as c:
        assert c.post(ENROL, json=_body(short["code"])).status_code == 401
    assert [c["id"] for c in _codes(server, status="expired")] == [short["id"]]
    assert [c["id"] for c in _codes(server, status="active")] == [minted[2]["id"]]


@pytest.mark.slow
def test_one_code_enrols_one_device_under_concurrency(server: Server) -> None:
    (minted,) = _mint(server)
    answers: list[int] = []
    start = threading.Barrier(8)

    def attempt() -> None:
        with server.client() as c:
            start.wait()
            answers.append(c.post(ENROL, json=_body(minted["code"])).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [201] + [401] * 7, answers
    with server.admin() as a:
        assert a.get("/v1/admin/devices/summary").json()["devices"] == 1


# -- revocation --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_revoked_device_is_refused_on_every_route(server: Server, tiny_bundle_dir: Path) -> None:
    setup_task(server, tiny_bundle_dir.with_suffix(".tar"), task_config())
    (minted,) = _mint(server)
    with server.client() as c:
        r = c.post(ENROL, json=_body(minted["code"]))
    device_id, token = r.json()["device_id"], r.json()["token"]
    checkin = {"state": ready_state().model_dump()}
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/checkin", {"json": checkin}),
        ("GET", "/v1/tasks/kb/current", {}),
        ("GET", "/v1/tasks/kb/versions/0/weights", {}),
        ("GET", "/v1/rounds/1/plan", {}),
        ("GET", "/v1/rounds/1/status", {}),
        ("POST", "/v1/rounds/1/report", {"json": {"loss_before": 1, "loss_after": 1, "examples": 1}}),
        ("PUT", "/v1/rounds/1/update", {"content": b"\0" * 64}),
    ]
    with server.client(token) as c:
        assert c.post("/v1/checkin", json=checkin).status_code == 200
        assert c.get("/v1/tasks/kb/current").status_code == 200
    with server.admin() as a:
        r = a.post(f"/v1/admin/devices/{device_id}/revoke")
        assert r.status_code == 200, r.text
        assert r.json()["enrollment"] == "code" and r.json()["enrollment_code_id"] == minted["id"]
        assert a.post(f"/v1/admin/devices/{device_id}/revoke").status_code == 200  # idempotent
        assert a.post(f"/v1/admin/devices/{'0' * 32}/revoke").status_code == 404
    with server.client(token) as c:
        for method, path, kw in routes:
            r = c.request(method, path, **kw)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
    with server.admin() as a:  # its rows stay
        assert a.get("/v1/admin/devices/summary").json()["devices"] == 1
    with server.client() as c:  # and its code cannot make it a new identity
        assert c.post(ENROL, json=_body(minted["code"])).status_code == 401


# -- the fleet secret --------------------------------------------------------------------------


def test_the_fleet_secret_is_off_unless_configured_and_capped(db: sessionmaker[Session]) -> None:
    kw: dict[str, Any] = {"platform": "t", "client_version": "0.1.0", "device_class": "unknown"}
    with db() as s, s.begin(), pytest.raises(AuthError):
        enroll(s, secret="anything", fleet_secret="", fleet_max_devices=None, **kw)
    for _ in range(2):
        with db() as s, s.begin():
            enroll(s, secret="fleet", fleet_secret="fleet", fleet_max_devices=2, **kw)
    with db() as s, s.begin(), pytest.raises(EnrollmentClosed, match="limit of 2"):
        enroll(s, secret="fleet", fleet_secret="fleet", fleet_max_devices=2, **kw)
    with db() as s, s.begin():  # unlimited only when said so
        enroll(s, secret="fleet", fleet_secret="fleet", fleet_max_devices=None, **kw)
    with db() as s:
        kinds = s.scalars(select(Device.enrollment)).all()
        assert kinds == ["fleet"] * 3 and s.scalar(select(EnrollmentCode.id)) is None


@pytest.mark.slow
def test_fleet_cap_over_http_is_403_and_codes_still_work(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, f"sqlite:///{tmp_path / 'c.db'}", extra_env={"FEDKEYS_ENROLLMENT_SECRET_MAX_DEVICES": "1"}
    )
    try:
        with server.client() as c:
            assert c.post(ENROL, json=_body(server.enroll_secret)).status_code == 201
            r = c.post(ENROL, json=_body(server.enroll_secret))
            assert r.status_code == 403 and "one-time code" in r.json()["detail"]
        (minted,) = _mint(server)
        with server.client() as c:
            assert c.post(ENROL, json=_body(minted["code"])).status_code == 201
    finally:
        stop_server(server)


# -- rate limits -------------------------------------------------------------------------------


def test_attempt_counters_are_shared_per_address_and_in_all(tmp_path: Path, db_url: str) -> None:
    """Two engines (two workers, or replicas) on one database see the same counts."""
    engines = [make_engine(db_url), make_engine(db_url)]
    upgrade(engines[0])
    factories = [make_sessionmaker(e) for e in engines]
    now = 1_000_000 * 60.0 + 5  # second 5 of a minute

    def attempt(i: int, address: str, total: int = 100, at: float = now) -> float | None:
        with factories[i % 2]() as s, s.begin():
            return note_attempt(s, address=address, per_address=3, total=total, now=at)

    try:
        assert [attempt(i, "10.0.0.1") for i in range(3)] == [None] * 3
        wait = attempt(3, "10.0.0.1")
        assert wait is not None and 54 < wait <= 55  # until the minute ends
        assert attempt(4, "10.0.0.2") is None  # another address has its own budget
        assert attempt(5, "2001:db8::1") is None
        assert [attempt(i, f"2001:db8::{i + 2}") for i in range(2)] == [None, None]
        assert attempt(0, "2001:db8::ff") is not None  # one /64 is one budget
        assert attempt(1, "10.0.0.9", total=5) is not None  # in all: over 5 this minute
        assert attempt(0, "10.0.0.1", at=now + 60) is None  # a new minute, and old rows pruned
        with factories[0]() as s:
            assert set(s.scalars(select(EnrollmentCounter.key))) == {"all", "addr:10.0.0.1"}
    finally:
        for e in engines:
            e.dispose()


def test_address_keys() -> None:
    assert address_key("192.0.2.7") == "addr:192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "addr:192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == "addr:2001:db8:1:2::/64"
    assert address_key(None) == address_key("not an address") == "addr:unknown"


@pytest.mark.slow
def test_enrolment_attempts_are_rate_limited_over_http(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        f"sqlite:///{tmp_path / 'c.db'}",
        extra_env={"FEDKEYS_ENROLLMENT_PER_ADDRESS_PER_MINUTE": "3"},
    )
    try:
        (minted,) = _mint(server)
        _fresh_minute()
        with server.client() as c:
            assert [c.post(ENROL, json=_body(f"guess-{i}")).status_code for i in range(3)] == [401] * 3
            r = c.post(ENROL, json=_body(minted["code"]))  # failed attempts counted: even a good code waits
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 61
        assert _codes(server, status="active")[0]["id"] == minted["id"]  # and was not used
    finally:
        stop_server(server)


def test_fuzzed_enrolment_bodies_are_4xx(sqlite_server: Server) -> None:
    with sqlite_server.client() as c:
        for body in ({}, {"enrollment_secret": ""}, _body("x" * 300), _body("x", device_class="A B")):
            assert c.post(ENROL, json=body).status_code == 422
    with sqlite_server.admin() as a:
        for bad in ({"count": 0}, {"count": 1001}, {"expires_in_seconds": 0}, {"device_class": "No Way"}):
            assert a.post(CODES, json=bad).status_code == 422, bad
        assert a.get(CODES, params={"status": "bogus"}).status_code == 422
        assert a.post("/v1/admin/devices/not-hex/revoke").status_code == 422
    with httpx.Client(base_url=sqlite_server.url, verify=sqlite_server.tls()) as anon:
        assert anon.post(CODES, json={}).status_code == 401
        assert anon.get(CODES).status_code == 401
        assert anon.post(f"/v1/admin/devices/{'0' * 32}/revoke").status_code == 401
