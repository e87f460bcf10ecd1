"""Device and admin API behaviour over TLS: enrolment, auth, rate limits, body limits, bad
updates, stage and ownership checks, artifacts with ETag/Range and deltas, health and metrics."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from protocol.delta import xor_undelta
from protocol.wire import UpdateHeader, UpdateKind, pack_dense_update
from tests.coordinator.scripted import ready_state
from tests.coordinator.test_rounds import setup_task, task_config
from tests.servers import Server, start_server, stop_server

pytestmark = pytest.mark.slow


def enroll(server: Server) -> tuple[str, str]:
    with server.client() as c:
        r = c.post(
            "/v1/devices/enroll",
            json={"enrollment_secret": server.enroll_secret, "platform": "t", "client_version": "0.1.0"},
        )
    assert r.status_code == 201, r.text
    return r.json()["device_id"], r.json()["token"]


def test_enrolment_needs_the_secret_and_creates_nothing_without_it(sqlite_server: Server) -> None:
    with sqlite_server.client() as c:
        r = c.post(
            "/v1/devices/enroll",
            json={"enrollment_secret": "wrong", "platform": "t", "client_version": "0.1.0"},
        )
        assert r.status_code == 401 and "secret" in r.json()["detail"]
    with sqlite_server.admin() as a:
        assert a.get("/v1/admin/devices/summary").json()["devices"] == 0
    _, token = enroll(sqlite_server)
    assert len(token) >= 43  # 256 bits, URL-safe base64
    with sqlite_server.admin() as a:
        assert a.get("/v1/admin/devices/summary").json()["devices"] == 1
    import sqlite3

    db = sqlite_server.db_url.removeprefix("sqlite:///")
    stored = sqlite3.connect(db).execute("SELECT token_hash FROM devices").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored


def test_auth_errors(server: Server) -> None:
    """On both databases (PostgreSQL check-ins run on the event loop's own connections)."""
    with server.client("nope") as c:
        r = c.post("/v1/checkin", json={"state": ready_state().model_dump()})
        assert r.status_code == 401 and "token" in r.json()["detail"]
    with server.client() as c:
        assert c.post("/v1/checkin", json={"state": ready_state().model_dump()}).status_code == 401
        assert c.get("/v1/admin/tasks").status_code == 401
    _, token = enroll(server)
    with server.client(token) as c:
        assert c.post("/v1/checkin", json={"state": ready_state().model_dump()}).status_code == 200
        assert c.get("/v1/admin/tasks").status_code == 401  # a device token is not an admin token


def test_checkins_survive_dropped_database_connections(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL ends the coordinator's connections (a restart, a failover): a check-in on a
    dead connection gets a 503 with Retry-After, never a 500, and the next ones reconnect."""
    import psycopg

    from tests.servers import PG_ADMIN

    server = start_server(tmp_path, pg_url)
    try:
        _, token = enroll(server)
        body = {"state": ready_state().model_dump()}
        with server.client(token) as c:
            assert all(c.post("/v1/checkin", json=body).status_code == 200 for _ in range(20))
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                ended = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                    (pg_url.rsplit("/", 1)[1],),
                ).fetchone()
            assert ended is not None and ended[0] >= 1
            codes = [c.post("/v1/checkin", json=body) for _ in range(30)]
        failed = [r for r in codes if r.status_code != 200]
        assert all(r.status_code == 503 and r.headers.get("Retry-After") for r in failed), [
            (r.status_code, r.text) for r in failed
        ]
        assert [r.status_code for r in codes[-10:]] == [200] * 10  # reconnected
    finally:
        stop_server(server)


def test_validation_is_4xx(sqlite_server: Server) -> None:
    _, token = enroll(sqlite_server)
    with sqlite_server.client(token) as c:
        bad = ready_state().model_dump() | {"battery_pct": 250}
        assert c.post("/v1/checkin", json={"state": bad}).status_code == 422
        assert (
            c.post(
                "/v1/checkin", content=b"{not json", headers={"Content-Type": "application/json"}
            ).status_code
            == 422
        )
        assert c.get("/v1/rounds/999999999999/status").status_code == 422
        assert c.get("/v1/rounds/12345/status").status_code in (403, 410)


def test_rate_limit(tmp_path: Path, db_url: str) -> None:
    server = start_server(tmp_path, db_url, extra_env={"FEDKEYS_RATE_LIMIT_PER_MINUTE": "5"})
    try:
        _, token = enroll(server)
        with server.client(token) as c:
            codes = [
                c.post("/v1/checkin", json={"state": ready_state().model_dump()}).status_code
                for _ in range(8)
            ]
        if codes[-1] != 429:  # a minute boundary fell in the middle: try once more
            with server.client(token) as c:
                codes = [
                    c.post("/v1/checkin", json={"state": ready_state().model_dump()}).status_code
                    for _ in range(8)
                ]
        assert codes[:5] == [200] * 5 and codes[-1] == 429
    finally:
        stop_server(server)


def test_body_limit_and_bad_updates(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    server = start_server(
        tmp_path, f"sqlite:///{tmp_path / 'c.db'}", extra_env={"FEDKEYS_MAX_BODY_BYTES": "200000"}
    )
    try:
        cfg = task_config(
            secagg={"enabled": False},
            codec={"compress": False},
            clients_per_round=2,
            min_reports=2,
            over_selection=1.0,
        )
        w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
        tokens = [enroll(server)[1] for _ in range(3)]
        rid = None
        for _ in range(40):
            for t in tokens[:2]:
                with server.client(t) as c:
                    r = c.post("/v1/checkin", json={"state": ready_state().model_dump()}).json()
                    rid = r.get("round_id") or rid
            if rid:
                break
            time.sleep(0.3)
        assert rid is not None
        with server.client(tokens[0]) as c:
            plan = c.get(f"/v1/rounds/{rid}/plan").json()
            big = c.put(f"/v1/rounds/{rid}/update", content=b"\0" * 300_000, params={"examples": 5})
            assert big.status_code == 413
            garbage = c.put(f"/v1/rounds/{rid}/update", content=b"FKUP" + b"\1" * 100, params={"examples": 5})
            assert garbage.status_code == 422
            head = {"round_id": rid, "layout_hash": plan["layout_hash"], "dim": w0.size}
            nan = np.zeros(w0.size, np.float32)
            body = bytearray(
                pack_dense_update(
                    UpdateHeader(
                        kind=UpdateKind.DENSE_F32, bits=32, keep_fraction=1.0, length=w0.size, **head
                    ),
                    nan,
                )
            )
            body[100:104] = np.float32("nan").tobytes()  # corrupt after packing: CRC or NaN check
            assert (
                c.put(f"/v1/rounds/{rid}/update", content=bytes(body), params={"examples": 5}).status_code
                == 422
            )
            wrong = pack_dense_update(
                UpdateHeader(
                    kind=UpdateKind.DENSE_F32,
                    bits=32,
                    keep_fraction=1.0,
                    length=w0.size,
                    **{**head, "layout_hash": "0" * 64},
                ),
                nan,
            )
            r = c.put(f"/v1/rounds/{rid}/update", content=wrong, params={"examples": 5})
            assert r.status_code == 422 and "layout" in r.json()["detail"].lower()
            other_round = pack_dense_update(
                UpdateHeader(
                    kind=UpdateKind.DENSE_F32,
                    bits=32,
                    keep_fraction=1.0,
                    length=w0.size,
                    **{**head, "round_id": rid + 1},
                ),
                nan,
            )
            assert (
                c.put(f"/v1/rounds/{rid}/update", content=other_round, params={"examples": 5}).status_code
                == 422
            )
            # a training report in the upload's header is checked before the body is read
            good = pack_dense_update(
                UpdateHeader(kind=UpdateKind.DENSE_F32, bits=32, keep_fraction=1.0, length=w0.size, **head),
                nan,
            )
            for bad, why in (("{", "not a training report"), ('{"pad": "' + "x" * 2000 + '"}', "longer")):
                r = c.put(
                    f"/v1/rounds/{rid}/update",
                    content=good,
                    params={"examples": 5},
                    headers={"X-Fedkeys-Report": bad},
                )
                assert r.status_code == 422 and why in r.json()["detail"], r.text
            # secure-aggregation stages do not exist in this round: 409 with the stage named
            r = c.get(f"/v1/rounds/{rid}/secagg/roster")
            assert r.status_code == 409 and "stage" in r.json()["detail"]
        with server.client(tokens[2]) as c:  # not selected
            assert c.get(f"/v1/rounds/{rid}/plan").status_code == 403
            assert c.put(f"/v1/rounds/{rid}/update", content=b"x", params={"examples": 1}).status_code in (
                403,
                422,
            )
    finally:
        stop_server(server)


def bundle_with_weights(src: Path, flat: np.ndarray, dest: Path) -> Path:
    """A copy of the bundle at ``src`` whose trainable weights are ``flat`` (as a tarball)."""
    from safetensors.numpy import save_file

    from protocol.bundle import MANIFEST_NAME, FileEntry, load_bundle, pack_bundle, sha256_file

    work = dest.with_suffix("")
    shutil.copytree(src, work)
    manifest = load_bundle(work).manifest
    weights = work / manifest.weights.file
    save_file(manifest.train.layout.unflatten(flat), str(weights))
    entry = FileEntry(file=weights.name, sha256=sha256_file(weights), size=weights.stat().st_size)
    (work / MANIFEST_NAME).write_text(manifest.model_copy(update={"weights": entry}).model_dump_json())
    return pack_bundle(work, dest)


def test_artifacts_etag_range_and_delta(sqlite_server: Server, tiny_bundle_dir: Path, tmp_path: Path) -> None:
    server = sqlite_server
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), task_config())
    w1 = w0.copy()
    w1[: w0.size // 10] += np.float32(1e-3)  # a sparse change: the XOR delta compresses well
    # a second version through the admin API: the same bundle with new weights
    tar = bundle_with_weights(tiny_bundle_dir, w1, tmp_path / "v1.tar")
    _, token = enroll(server)
    with server.admin() as a:
        assert a.post("/v1/admin/tasks/kb/bundle", content=tar.read_bytes()).status_code == 201
    with server.client(token) as c:
        r = c.get("/v1/tasks/kb/versions/0/weights")
        assert r.status_code == 200 and np.array_equal(np.frombuffer(r.content, "<f4"), w0)
        etag = r.headers["etag"]
        assert c.get("/v1/tasks/kb/versions/0/weights", headers={"If-None-Match": etag}).status_code == 304
        part = c.get("/v1/tasks/kb/versions/0/weights", headers={"Range": "bytes=4-11"})
        assert part.status_code == 206 and part.content == w0.tobytes()[4:12]
        d = c.get("/v1/tasks/kb/versions/1/weights", params={"base": 0})
        assert d.status_code == 200 and len(d.content) < w0.nbytes / 2
        assert np.array_equal(xor_undelta(d.content, w0), w1)
        assert c.get("/v1/tasks/kb/versions/9/weights").status_code == 404
        assert c.get("/v1/tasks/kb/current").json()["current_version"] == 1


def test_health_metrics_and_docs(sqlite_server: Server) -> None:
    with sqlite_server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        assert "fedkeys_checkins" in c.get("/metrics").text
        assert c.get("/docs").status_code == 200
        assert "/v1/checkin" in c.get("/openapi.json").json()["paths"]


def test_plain_http_is_refused_by_default(sqlite_server: Server) -> None:
    import httpx

    with pytest.raises(httpx.HTTPError):
        httpx.get(sqlite_server.url.replace("https://", "http://") + "/healthz", timeout=3)


def test_an_idle_device_connection_outlives_the_usual_five_seconds(sqlite_server: Server) -> None:
    """Idle devices check in every 30-120 s: with httpx's and uvicorn's 5 s keep-alive, every
    check-in paid a new TLS handshake (bench/RESULTS.md, round overhead). Both sides now keep
    an idle connection for minutes: a request 6 s after the last goes over the same one."""
    from edge_client.transport import Transport

    t = Transport(sqlite_server.url, ca=sqlite_server.ca)
    try:
        ports = []
        for pause in (0.0, 6.0):
            time.sleep(pause)
            r = t._http.get("/healthz")
            assert r.status_code == 200
            ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        assert ports[0] == ports[1], ports
    finally:
        t.close()
