"""Several coordinator processes on one PostgreSQL, and kill -9 in the middle of a round."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests.coordinator.scripted import ScriptedDevice, ready_state, run_devices
from tests.coordinator.test_rounds import make_devices, setup_task, task_config, wait_round
from tests.servers import start_server, stop_server

pytestmark = pytest.mark.slow


def _plain_pg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_two_replicas_never_double_select_or_double_count(
    tmp_path: Path, pg_url: str, tiny_bundle_dir: Path
) -> None:
    a = start_server(tmp_path, pg_url)
    b = start_server(
        tmp_path,
        pg_url,
        tls_dir=tmp_path / "tls",
        admin_token=a.admin_token,
        enroll_secret=a.enroll_secret,
        data_dir=a.data_dir,
    )
    try:
        cfg = task_config(
            clients_per_round=6,
            over_selection=1.34,
            min_reports=3,
            max_rounds=2,
            selection_pool=1.0,
            deadlines={"selection": 5, "upload": 8},
        )
        w0 = setup_task(a, tiny_bundle_dir.with_suffix(".tar"), cfg)
        devs = make_devices(a, w0, 24)
        for i, d in enumerate(devs):  # half of the fleet talks to each replica
            d.url = (a if i % 2 else b).url
        # hammer check-ins from all devices at once, on both replicas
        errors: list[BaseException] = []

        def burst(d: ScriptedDevice) -> None:
            try:
                with d.transport() as t:
                    for _ in range(5):
                        t.checkin(ready_state())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=burst, args=(d,)) for d in devs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[:3]
        run_devices(devs)
        first = wait_round(a)
        assert first["outcome"] == "committed", first
        with psycopg.connect(_plain_pg(pg_url)) as conn:
            rows = conn.execute(
                "SELECT r.id, r.selected, r.reported, count(p.device_id), count(DISTINCT p.device_id),"
                " sum(CASE WHEN p.stage IN ('masked_input','unmask','upload') THEN 1 ELSE 0 END)"
                " FROM rounds r JOIN participants p ON p.round_id = r.id GROUP BY r.id ORDER BY r.id"
            ).fetchall()
            versions = conn.execute("SELECT version FROM model_versions ORDER BY version").fetchall()
        for _, selected, reported, parts, distinct, uploads in rows:
            assert selected == parts == distinct <= 9  # ceil(6 * 1.34) = 9 at most
            assert reported == uploads  # every counted upload is one participant's, once
        assert [v[0] for v in versions] == list(range(len(versions)))  # no version committed twice
    finally:
        stop_server(a)
        stop_server(b)


def test_kill_9_mid_round_then_restart(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    db = f"sqlite:///{tmp_path / 'coordinator.db'}"
    server = start_server(tmp_path, db)
    port = int(server.url.rsplit(":", 1)[1])
    cfg = task_config(clients_per_round=4, over_selection=1.0, deadlines={"upload": 30, "unmask": 20})
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    v0_file = server.data_dir / "weights" / "kb" / "v0.f32"
    v0_bytes = v0_file.read_bytes()
    devs = make_devices(server, w0, 4, retries=40)  # ~1 minute of retries: rides out the restart
    threads = [threading.Thread(target=d.run, daemon=True) for d in devs]
    for th in threads:
        th.start()
    # wait until the round is in its upload stage, then kill -9 the coordinator
    deadline = time.time() + 60
    with server.admin() as admin:
        while time.time() < deadline:
            rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
            if rounds and rounds[-1]["stage"] in ("masked_input", "unmask"):
                break
            time.sleep(0.05)
    stop_server(server, signal.SIGKILL)
    time.sleep(1.0)
    restarted = start_server(
        tmp_path,
        db,
        port=port,
        tls_dir=tmp_path / "tls",
        admin_token=server.admin_token,
        enroll_secret=server.enroll_secret,
        data_dir=server.data_dir,
    )
    try:
        for th in threads:
            th.join(timeout=120)
        rnd = wait_round(restarted)
        assert rnd["outcome"] in ("committed", "failed"), rnd
        assert v0_file.read_bytes() == v0_bytes  # committed versions intact
        with restarted.admin() as admin:
            versions = admin.get("/v1/admin/tasks/kb/versions").json()
        if rnd["outcome"] == "committed":
            assert [v["version"] for v in versions] == [0, 1]
            w1 = np.fromfile(restarted.data_dir / "weights" / "kb" / "v1.f32", dtype="<f4")
            assert np.isfinite(w1).all() and not np.array_equal(w1, w0)
        else:
            assert [v["version"] for v in versions] == [0]
    finally:
        stop_server(restarted)


def test_a_held_device_row_lock_gets_503_not_a_stuck_worker(tmp_path: Path, pg_url: str) -> None:
    """A request waiting on a device's row lock fails after the lock timeout (503, retry)
    instead of waiting for ever: such waits once took every thread of a worker (1,000 devices)."""
    import httpx

    server = start_server(tmp_path, pg_url, extra_env={"FEDKEYS_DB_LOCK_TIMEOUT_SECONDS": "1"})
    try:
        dev = ScriptedDevice(server.url, str(server.ca), server.enroll_secret, np.zeros(4, np.float32))
        dev.enroll()
        headers = {"authorization": f"Bearer {dev.token}"}
        body = {"state": ready_state().model_dump(mode="json")}
        with (
            psycopg.connect(_plain_pg(pg_url)) as holder,
            httpx.Client(base_url=server.url, verify=server.tls(), timeout=30) as http,
        ):
            holder.execute("UPDATE devices SET rate_count = rate_count WHERE id = %s", (dev.device_id,))
            for method, path, kw in (
                ("POST", "/v1/checkin", {"json": body}),  # the event loop's own connection
                ("GET", "/v1/rounds/1/plan", {}),  # a request's session (dependency thread)
            ):
                t0 = time.monotonic()
                r = http.request(method, path, headers=headers, **kw)
                took = time.monotonic() - t0
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert "retry" in r.json()["detail"]
                assert took < 10, (path, took)
            holder.rollback()
            assert http.post("/v1/checkin", headers=headers, json=body).status_code == 200
    finally:
        stop_server(server)


def test_sqlite_requests_never_wait_for_a_thread_while_holding_the_write_lock(tmp_path: Path) -> None:
    """More concurrent requests than request threads, on SQLite: each answers in well under
    the busy timeout (30 s).

    Two ways a request held SQLite's write lock while it waited for a request thread, with
    every thread waiting in BEGIN IMMEDIATE for that lock (the worker stalled until the busy
    timeout failed them all; the 1,065-device population run stopped in its first round): a
    device request authenticated in its request's transaction (one thread) and ran its route
    in another; a plain-``def`` route's transaction ended only after FastAPI had validated its
    response in another thread. Device requests (authentication, then a 404) and admin task
    lists (a response model) run together here."""
    import httpx

    server = start_server(
        tmp_path, f"sqlite:///{tmp_path / 'c.db'}", extra_env={"FEDKEYS_REQUEST_THREADS": "2"}
    )
    try:
        devices = [
            ScriptedDevice(server.url, str(server.ca), server.enroll_secret, np.zeros(4, np.float32))
            for _ in range(4)
        ]
        for dev in devices:
            dev.enroll()
        took: list[float] = []
        codes: list[int | str] = []
        calls = [("/v1/tasks/nosuch/current", f"Bearer {d.token}", 404) for d in devices]
        calls += [("/v1/admin/tasks", f"Bearer {server.admin_token}", 200)] * 4

        def hammer(path: str, auth: str, expected: int) -> None:
            with httpx.Client(base_url=server.url, verify=server.tls(), timeout=60) as http:
                for _ in range(4):
                    t0 = time.monotonic()
                    try:
                        r = http.get(path, headers={"authorization": auth})
                    except httpx.HTTPError as e:
                        codes.append(type(e).__name__)
                    else:
                        codes.append("ok" if r.status_code == expected else r.status_code)
                    took.append(time.monotonic() - t0)

        threads = [threading.Thread(target=hammer, args=c) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert codes == ["ok"] * 32, codes
        assert max(took) < 10, sorted(took)[-5:]
    finally:
        stop_server(server)
