"""Full rounds against a real coordinator (uvicorn over TLS) on SQLite and PostgreSQL, with
scripted devices running the real protocol code, including drop-outs at every stage."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.secagg.client import SecAggClient
from tests.coordinator.scripted import ScriptedDevice, ready_state, run_devices
from tests.servers import Server

pytestmark = pytest.mark.slow


def task_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "clients_per_round": 4,
        "over_selection": 1.25,
        "min_reports": 3,
        "cooldown_rounds": 0,
        "selection_pool": 1.0,
        "eligibility": {"min_examples": 0},
        "codec": {"compress": True, "clip_norm": 10.0, "keep_fraction": 1.0, "bits": 16, "weight_cap": 16},
        "secagg": {"enabled": True},
        "server_optimizer": {"name": "fedavg", "lr": 1.0},
        "deadlines": {"selection": 20, "advertise": 6, "share": 6, "upload": 10, "unmask": 6},
        "max_rounds": 1,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


def setup_task(server: Server, tarball: Path, cfg: dict[str, Any], name: str = "kb") -> np.ndarray:
    with server.admin() as admin:
        assert admin.post("/v1/admin/tasks", json={"name": name, "config": cfg}).status_code == 201
        r = admin.post(f"/v1/admin/tasks/{name}/bundle", content=tarball.read_bytes())
        assert r.status_code == 201, r.text
        assert admin.post(f"/v1/admin/tasks/{name}/start").status_code == 200
    return np.fromfile(server.data_dir / "weights" / name / "v0.f32", dtype="<f4")


def wait_round(server: Server, name: str = "kb", timeout: float = 90) -> dict[str, Any]:
    end = time.time() + timeout
    with server.admin() as admin:
        while time.time() < end:
            rounds = admin.get(f"/v1/admin/tasks/{name}/rounds").json()
            if rounds and rounds[-1]["stage"] == "done":
                return rounds[-1]
            time.sleep(0.3)
    raise TimeoutError(rounds)


def wait_task(server: Server, pred: Any, timeout: float = 30, name: str = "kb") -> dict[str, Any]:
    end = time.time() + timeout
    with server.admin() as admin:
        while time.time() < end:
            task = admin.get(f"/v1/admin/tasks/{name}").json()
            if pred(task):
                return task
            time.sleep(0.3)
    raise TimeoutError(task)


def make_devices(server: Server, w0: np.ndarray, n: int, seed: int = 0, **kw: Any) -> list[ScriptedDevice]:
    rng = np.random.default_rng(seed)
    devs = []
    for i in range(n):
        delta = (rng.normal(0, 1, w0.shape) * (0.5 / np.sqrt(w0.size))).astype(np.float32)
        d = ScriptedDevice(server.url, str(server.ca), server.enroll_secret, delta, examples=4 + 3 * i, **kw)
        d.enroll()
        devs.append(d)
    return devs


def expected(w0: np.ndarray, devs: list[ScriptedDevice], cap: int) -> np.ndarray:
    ws = np.array([min(d.examples, cap) for d in devs], dtype=np.float64)
    mean = sum(w * d.delta.astype(np.float64) for w, d in zip(ws, devs, strict=True)) / ws.sum()
    return (w0 + mean).astype(np.float32)


@pytest.mark.parametrize("secagg", [True, False])
def test_round_commits_the_weighted_mean(server: Server, tiny_bundle_dir: Path, secagg: bool) -> None:
    # long deadlines: every stage must close as soon as its last message arrives
    slow = {"advertise": 90, "share": 90, "upload": 90, "unmask": 90}
    # a weight cap below the largest example count (4 .. 16): float32 updates honour it too
    cfg = task_config(
        secagg={"enabled": secagg}, codec={"compress": secagg, "weight_cap": 10}, deadlines=slow
    )
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 5)
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd["failure_reason"]
    stages = rnd["metrics"]["stage_seconds"]
    # and devices hear of each close at once (their status long polls are held up to 25 s)
    assert all(seconds < 10 for name, seconds in stages.items() if name != "selecting"), stages
    assert rnd["new_version"] == 1
    w1 = np.fromfile(server.data_dir / "weights" / "kb" / "v1.f32", dtype="<f4")
    reporters = [d for d in devs if d.uploaded][: rnd["reported"]]
    assert len(reporters) == rnd["reported"] >= 4
    want = expected(w0, reporters, 10)
    # 16-bit stochastic quantization over a range of 4 C / sqrt(D): errors far below the update
    step = np.abs(w1 - w0).max()
    assert np.abs(w1 - want).max() < 0.02 * step, (np.abs(w1 - want).max(), step)
    with server.admin() as admin:
        versions = admin.get("/v1/admin/tasks/kb/versions").json()
    assert [v["version"] for v in versions] == [0, 1]
    assert versions[1]["metrics"]["reports"] == rnd["reported"]


@pytest.mark.parametrize("stage", ["advertise", "share", "upload", "unmask"])
def test_dropouts_at_each_stage_leave_the_sum_exact(
    sqlite_server: Server, tiny_bundle_dir: Path, stage: str
) -> None:
    server = sqlite_server
    cfg = task_config(clients_per_round=5, over_selection=1.2, min_reports=3)
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 6)
    devs[0].drop_before = stage
    devs[3].drop_before = stage
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd["failure_reason"]
    w1 = np.fromfile(server.data_dir / "weights" / "kb" / "v1.f32", dtype="<f4")
    # the sum holds exactly the devices whose masked input the coordinator accepted
    included = [d for d in devs if d.uploaded]
    assert rnd["reported"] == len(included)
    # the two drop-outs never upload, except when they vanish only after uploading
    assert len(included) == (5 if stage == "unmask" else 4)
    want = expected(w0, included, 16)
    step = np.abs(w1 - w0).max()
    assert np.abs(w1 - want).max() < 0.02 * step


def test_too_few_devices_fail_the_round_and_keep_the_model(
    sqlite_server: Server, tiny_bundle_dir: Path
) -> None:
    server = sqlite_server
    cfg = task_config(clients_per_round=4, min_reports=4, over_selection=1.0, deadlines={"upload": 3})
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 4)
    devs[1].drop_before = "upload"
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "failed"
    assert "updates" in rnd["failure_reason"]
    with server.admin() as admin:
        task = admin.get("/v1/admin/tasks/kb").json()
    assert task["current_version"] == 0
    assert not (server.data_dir / "weights" / "kb" / "v1.f32").exists()


def test_oort_selection_with_a_stratum_cap_and_the_selection_view(
    sqlite_server: Server, tiny_bundle_dir: Path
) -> None:
    server = sqlite_server
    cfg = task_config(
        clients_per_round=4,
        over_selection=1.0,
        min_reports=2,  # the stratum cap lets 2 in: too few for secure aggregation (>= 3)
        secagg={"enabled": False},
        selection={"strategy": "oort", "stratum": "data_bucket", "max_share": 0.5},
    )
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 6)
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd["failure_reason"]
    with server.admin() as admin:
        view = admin.get("/v1/admin/tasks/kb/selection").json()
    assert view["strategy"] == "oort" and view["rounds"] >= 1
    buckets = [b for b in view["buckets"] if b["stratum"] == "data_bucket"]
    assert sum(b["selections"] for b in buckets) == rnd["selected"]
    assert sum(b["devices"] for b in buckets) == 6
    # the scripted devices all report 100 examples at check-in: one data bucket, so the cap
    # (half of the 4 slots) lets at most 2 of them in
    assert rnd["selected"] <= 2
    by_class = [b for b in view["buckets"] if b["stratum"] == "device_class"]
    assert sum(b["selections"] for b in by_class) == rnd["selected"]


def test_status_long_poll_is_held_until_the_stage_changes(server: Server, tiny_bundle_dir: Path) -> None:
    """A device that knows the round's stage is answered when the stage closes (here: when the
    last device advertises its keys), not after its ``wait``; without a change, after ``wait``;
    with an outdated ``since``, at once."""
    # no straggler rule: 4 of 5 answers would otherwise close the stage after 2 quiet seconds
    slow = {"advertise": 60, "share": 60, "upload": 60, "unmask": 60, "quiet_seconds": 0}
    cfg = task_config(deadlines=slow)
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 5)
    threads = [threading.Thread(target=d.wait_assignment, daemon=True) for d in devs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    rid = devs[0].round_id
    assert rid is not None and all(d.round_id == rid for d in devs)
    ts = [d.transport() for d in devs]
    plans = [t.plan(rid) for t in ts]
    clients = [SecAggClient(d.device_id, p.secagg) for d, p in zip(devs, plans, strict=True) if p.secagg]
    assert len(clients) == 5
    for t, c in zip(ts[:4], clients[:4], strict=True):
        t.advertise(rid, c.advertise_keys())
    stage = ts[4].status(rid).stage
    assert stage == "advertise_keys"
    t0 = time.monotonic()
    st = ts[4].status(rid, since="share_keys", wait=20)  # outdated: answered at once
    assert st.stage == "advertise_keys" and time.monotonic() - t0 < 2
    t0 = time.monotonic()
    st = ts[4].status(rid, since=stage, wait=1.5)  # nothing changes: held for the wait
    assert st.stage == stage and 1.4 <= time.monotonic() - t0 < 6
    got: dict[str, Any] = {}

    def poll() -> None:
        start = time.monotonic()
        got["stage"] = ts[3].status(rid, since=stage, wait=25).stage
        got["seconds"] = time.monotonic() - start

    watcher = threading.Thread(target=poll)
    watcher.start()
    time.sleep(1.0)
    assert "seconds" not in got  # still held
    ts[4].advertise(rid, clients[4].advertise_keys())  # the last one: the stage closes
    watcher.join(timeout=30)
    assert got["stage"] == "share_keys" and 1.0 <= got["seconds"] < 10, got
    for t in ts:
        t.close()


def test_a_candidate_check_in_is_held_until_its_selection_ends(server: Server, tiny_bundle_dir: Path) -> None:
    """A device that joins a selecting round's pool gets its answer when the pool fills (here
    4 seconds later, by the other devices' check-ins), not a come-back-in-a-second: one
    check-in for the whole selection, and the chosen device learns of it at once."""
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), task_config(over_selection=1.0))
    devs = make_devices(server, w0, 4)
    got: dict[int, dict[str, Any]] = {i: {} for i in range(4)}

    def check_in(i: int) -> None:
        with devs[i].transport() as t:
            start = time.monotonic()
            r = t.checkin(ready_state())
            got[i].update(seconds=time.monotonic() - start, action=r.action, round_id=r.round_id)

    first = threading.Thread(target=check_in, args=(0,))
    first.start()
    time.sleep(4.0)
    assert not got[0]  # held while the pool (4 devices) is not full
    others = [threading.Thread(target=check_in, args=(i,)) for i in (1, 2, 3)]
    for th in others:  # the last of them fills the pool and closes the selection
        th.start()
    for th in [first, *others]:
        th.join(timeout=30)
    assert all(g["action"] == "train" and g["round_id"] is not None for g in got.values()), got
    assert 4.0 <= got[0]["seconds"] < 12, got  # answered at the close, not after the 20 s hold


def test_key_agreement_stages_close_without_quiet_stragglers(
    sqlite_server: Server, tiny_bundle_dir: Path
) -> None:
    """A device that never advertises does not hold the round for the stage's 60 s deadline:
    once 4 of the 5 live participants answered (quorum 0.8) and a second passed quietly, the
    stage closes without it, and the round still sums the others exactly."""
    server = sqlite_server
    slow = {"advertise": 60, "share": 60, "upload": 60, "unmask": 60, "quorum": 0.8, "quiet_seconds": 1.0}
    cfg = task_config(deadlines=slow)
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 5)
    devs[2].drop_before = "advertise"
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd["failure_reason"]
    stages = rnd["metrics"]["stage_seconds"]
    assert 1.0 <= stages["advertise_keys"] < 15, stages
    included = [d for d in devs if d.uploaded]
    assert rnd["reported"] == len(included) == 4
    w1 = np.fromfile(server.data_dir / "weights" / "kb" / "v1.f32", dtype="<f4")
    step = np.abs(w1 - w0).max()
    assert np.abs(w1 - expected(w0, included, 16)).max() < 0.02 * step


def test_a_failed_round_does_not_count_towards_max_rounds(
    sqlite_server: Server, tiny_bundle_dir: Path
) -> None:
    """max_rounds counts the rounds that trained the model: a round that failed for want of
    devices moved nothing (runs compared over the same max_rounds take as many server steps)."""
    server = sqlite_server
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), task_config(deadlines={"selection": 2}))
    first = wait_round(server)  # nobody checks in: its selection runs out
    assert first["outcome"] == "failed", first
    devs = make_devices(server, w0, 5)
    run_devices(devs)
    wait_task(server, lambda t: t["status"] == "paused", timeout=60)
    with server.admin() as admin:
        rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
        versions = admin.get("/v1/admin/tasks/kb/versions").json()
    assert [r["outcome"] for r in sorted(rounds, key=lambda r: r["number"])] == ["failed", "committed"]
    assert [v["version"] for v in versions] == [0, 1]
