"""The round stage machine, driven through the coordinator's service functions (no HTTP, no
clock races): whatever a stored message or a bug does at a stage close, the round moves on
(issue 17.1) without the device that sent it, or fails with a reason, and the task opens its
next round. The devices are the real protocol code (SecAggClient, codec, wire format)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from coordinator.app import create_app, tick
from coordinator.config import Settings
from coordinator.db.models import Candidate, Device, Participant, Round, RoundUpload
from coordinator.schemas import TaskConfig
from coordinator.security import hash_token
from coordinator.services import rounds, tasks
from coordinator.services.aggregate import aggregate
from coordinator.services.rounds import RoundContext
from coordinator.services.rounds.checkin import _join_pool
from coordinator.services.rounds.context import utc
from protocol import codec
from protocol.secagg.client import SecAggClient
from protocol.secagg.server import SecAggServer
from protocol.wire import RoundPlan, Stage, UpdateHeader, UpdateKind, pack_update
from tests.coordinator.scripted import ready_state
from tests.servers import Server

pytestmark = pytest.mark.slow  # builds the tiny bundle (shared, cached)


@dataclass
class Coord:
    sessions: sessionmaker[Session]
    ctx: RoundContext
    data_dir: Path
    app: FastAPI

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session


@pytest.fixture
def coord(tmp_path: Path, tiny_bundle_dir: Path) -> Iterator[Coord]:
    yield from _coord(f"sqlite:///{tmp_path / 'c.db'}", tmp_path, tiny_bundle_dir)


@pytest.fixture
def pg_coord(pg_url: str, tmp_path: Path, tiny_bundle_dir: Path) -> Iterator[Coord]:
    yield from _coord(pg_url, tmp_path, tiny_bundle_dir)


def _coord(url: str, tmp_path: Path, tiny_bundle_dir: Path) -> Iterator[Coord]:
    settings = Settings(
        database_url=url,
        data_dir=tmp_path / "data",
        publish_predict=False,
    )
    app = create_app(settings, background=False)
    c = Coord(app.state.sessions, app.state.ctx, tmp_path / "data", app)
    cfg = TaskConfig.model_validate(
        {
            "clients_per_round": 5,
            "over_selection": 1.0,
            "min_reports": 3,
            "cooldown_rounds": 0,
            "selection_pool": 1.0,
            "eligibility": {"min_examples": 0},
            "codec": {"clip_norm": 10.0, "keep_fraction": 1.0, "bits": 16, "weight_cap": 16},
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
        }
    )
    with c.tx() as s:
        tasks.create_task(s, name="kb", config=cfg)
        tasks.upload_bundle(s, c.ctx.store, name="kb", tarball=tiny_bundle_dir.with_suffix(".tar"))
        tasks.set_status(s, name="kb", status="active")
        for i in range(5):
            s.add(
                Device(
                    id=f"dev{i}",
                    token_hash=hash_token(f"token-{i}"),
                    created_at=c.ctx.now(),
                    platform="test",
                    client_version="0.1.0",
                )
            )
    yield c
    app.state.engine.dispose()
    app.state.soft_engine.dispose()


@dataclass
class SecureRound:
    """One round of five devices driven stage by stage through the service functions."""

    c: Coord
    round_id: int = 0
    plan: RoundPlan | None = None
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    encoded: dict[str, np.ndarray] = field(default_factory=dict)

    def device(self, s: Session, d: str) -> Device:
        dev = s.get(Device, d)
        assert dev is not None
        return dev

    def select(self) -> None:
        with self.c.tx() as s:
            rounds.open_rounds(s, self.c.ctx)
        view = rounds.current_views(self.c.sessions, self.c.ctx).rounds[0]
        for i in range(5):
            r = rounds.join_pool(self.c.sessions, self.c.ctx, view, f"dev{i}", ready_state())
        assert r.action == "train" and r.round_id is not None
        self.round_id = r.round_id
        with self.c.tx() as s:
            rnd = s.get(Round, self.round_id)
            assert rnd is not None and rnd.stage == Stage.ADVERTISE_KEYS
            self.plan = rounds.plan_for(s, self.c.ctx, rnd)
        assert self.plan.secagg is not None
        # issue 17.5: paths, joined by the device to the origin it was configured with
        refs = [self.plan.bundle, self.plan.weights, *([self.plan.predict] if self.plan.predict else [])]
        assert all(ref.url.startswith("/v1/") for ref in refs)
        self.clients = {f"dev{i}": SecAggClient(f"dev{i}", self.plan.secagg) for i in range(5)}

    def close(self) -> str:
        self.c.ctx.forget_views()
        rounds.close_if_complete(self.c.sessions, self.c.ctx, self.round_id, wait=True)
        return self.stage()

    def stage(self) -> str:
        with self.c.tx() as s:
            rnd = s.get(Round, self.round_id)
            assert rnd is not None
            return rnd.stage

    def record(self) -> Round:
        with self.c.tx() as s:
            rnd = s.get(Round, self.round_id)
            assert rnd is not None
            return rnd

    def advertise(self) -> None:
        with self.c.tx() as s:
            for d, cl in self.clients.items():
                rounds.advertise(
                    s, self.c.ctx, round_id=self.round_id, device=self.device(s, d), msg=cl.advertise_keys()
                )
        assert self.close() == Stage.SHARE_KEYS

    def share(self) -> None:
        with self.c.tx() as s:
            for d, cl in self.clients.items():
                roster = rounds.roster(s, self.c.ctx, round_id=self.round_id, device_id=d)
                rounds.share_keys(
                    s, self.c.ctx, round_id=self.round_id, device=self.device(s, d), msg=cl.share_keys(roster)
                )

    def upload(self, devices: list[str]) -> None:
        assert self.plan is not None and self.plan.codec is not None and self.plan.secagg is not None
        dim = self.c.ctx.store.bundle(self.record().plan["bundle_dir"]).manifest.train.layout.size
        rng = np.random.default_rng(7)
        for d in devices:
            delta = rng.normal(0, 0.01, dim).astype(np.float32)
            self.encoded[d] = codec.encode(delta, self.plan.codec, rng, num_examples=16).values
            with self.c.tx() as s:
                shares = rounds.inbound_shares(s, self.c.ctx, round_id=self.round_id, device_id=d)
            masked = self.clients[d].masked_input(self.encoded[d].copy(), shares)
            header = UpdateHeader(
                kind=UpdateKind.RING,
                bits=self.plan.secagg.ring_bits,
                round_id=self.round_id,
                layout_hash=self.plan.layout_hash,
                keep_fraction=self.plan.codec.keep_fraction,
                length=len(masked),
                dim=dim,
            )
            body = pack_update(header, masked)
            with self.c.tx() as s:
                w = rounds.check_upload(s, round_id=self.round_id, device_id=d, body=body, examples=16)
                assert w is not None
            with self.c.tx() as s:
                rounds.upload(s, self.c.ctx, round_id=self.round_id, device_id=d, body=body, weight=w)

    def unmask(self) -> None:
        with self.c.tx() as s:
            req = rounds.unmask_request(s, round_id=self.round_id, device_id="dev0")
            for d in req.survivors:
                msg = self.clients[d].unmask(req.survivors, req.dropped)
                rounds.unmask(s, self.c.ctx, round_id=self.round_id, device=self.device(s, d), msg=msg)

    def to_aggregation(self) -> None:
        """Every stage with all five devices, up to the round waiting for its aggregation."""
        self.select()
        self.advertise()
        self.share()
        assert self.close() == Stage.MASKED_INPUT
        self.upload([f"dev{i}" for i in range(5)])
        assert self.close() == Stage.UNMASK
        self.unmask()
        assert self.close() == Stage.AGGREGATING

    def expected_mean(self, devices: list[str]) -> np.ndarray:
        assert self.plan is not None and self.plan.codec is not None and self.plan.secagg is not None
        dim = self.c.ctx.store.bundle(self.record().plan["bundle_dir"]).manifest.train.layout.size
        total = codec.ring_sum([self.encoded[d] for d in devices], self.plan.secagg.ring_bits)
        return codec.decode_sum(total, self.plan.codec, len(devices), dim)


def _weights(c: Coord, version: int) -> np.ndarray:
    return np.fromfile(c.data_dir / "weights" / "kb" / f"v{version}.f32", dtype="<f4")


def _next_round_opens(c: Coord, after: int) -> None:
    with c.tx() as s:
        opened = rounds.open_rounds(s, c.ctx)
        assert opened and opened[0].id > after and opened[0].stage == Stage.SELECTING


def test_a_damaged_stored_share_message_drops_its_device_not_the_round(coord: Coord) -> None:
    r = SecureRound(coord)
    r.select()
    r.advertise()
    r.share()
    with coord.tx() as s:  # what a damaged row (or a rule that changed under it) looks like
        s.execute(
            update(Participant)
            .where(Participant.round_id == r.round_id, Participant.device_id == "dev4")
            .values(secagg_msg=b'{"round_id": 1')
        )
    assert r.close() == Stage.MASKED_INPUT
    rec = r.record()
    assert "dev4" in rec.metrics["refused"][Stage.SHARE_KEYS]
    # issue 17.10: the selection seed came from a CSPRNG and is kept with the round
    assert len(bytes.fromhex(rec.plan["selection_seed"])) == 32
    honest = ["dev0", "dev1", "dev2", "dev3"]
    r.upload(honest)
    assert r.close() == Stage.UNMASK
    r.unmask()
    assert r.close() == Stage.AGGREGATING
    assert aggregate(coord.sessions, coord.ctx, r.round_id) == 1
    np.testing.assert_allclose(_weights(coord, 1) - _weights(coord, 0), r.expected_mean(honest), atol=1e-6)


def test_a_damaged_stored_upload_drops_its_device_and_the_others_commit(coord: Coord) -> None:
    """Issue 17.1's wedge: a body that fails only when the masked-input stage closes raised out
    of the close (rolled back and retried at every tick). Now its device is dropped there."""
    r = SecureRound(coord)
    r.select()
    r.advertise()
    r.share()
    assert r.close() == Stage.MASKED_INPUT
    everyone = [f"dev{i}" for i in range(5)]
    r.upload(everyone)
    with coord.tx() as s:
        body = s.scalar(
            select(RoundUpload.body).where(
                RoundUpload.round_id == r.round_id, RoundUpload.device_id == "dev2"
            )
        )
        assert body is not None
        tampered = bytearray(body)
        tampered[-1] ^= 0xFF
        s.execute(
            update(RoundUpload)
            .where(RoundUpload.round_id == r.round_id, RoundUpload.device_id == "dev2")
            .values(body=bytes(tampered))
        )
    assert r.close() == Stage.UNMASK
    rec = r.record()
    assert "dev2" in rec.metrics["refused"][Stage.MASKED_INPUT]
    assert rec.plan["unmask"]["dropped"] == ["dev2"]
    r.unmask()
    assert r.close() == Stage.AGGREGATING
    assert aggregate(coord.sessions, coord.ctx, r.round_id) == 1
    kept = [d for d in everyone if d != "dev2"]
    np.testing.assert_allclose(_weights(coord, 1) - _weights(coord, 0), r.expected_mean(kept), atol=1e-6)


def test_an_unexpected_error_at_a_stage_close_fails_the_round_once(
    coord: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = SecureRound(coord)
    r.select()
    r.advertise()
    r.share()

    def boom(self: SecAggServer) -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(SecAggServer, "close_share_keys", boom)
    assert r.close() == Stage.DONE
    rec = r.record()
    assert rec.outcome == "failed" and "RuntimeError: boom" in (rec.failure_reason or "")
    assert rec.stage == Stage.DONE
    _next_round_opens(coord, r.round_id)


def test_an_unexpected_error_in_aggregation_fails_the_round(
    coord: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = SecureRound(coord)
    r.to_aggregation()

    def boom(*a: object, **k: object) -> None:
        raise KeyError("lost")

    monkeypatch.setattr(coord.ctx.store, "load_weights", boom)
    assert aggregate(coord.sessions, coord.ctx, r.round_id) is None
    rec = r.record()
    assert rec.outcome == "failed" and "KeyError" in (rec.failure_reason or "")
    _next_round_opens(coord, r.round_id)


def test_the_admin_can_fail_a_stuck_round_at_any_stage(coord: Coord) -> None:
    r = SecureRound(coord)
    r.to_aggregation()
    with coord.tx() as s:
        rounds.fail_round(s, coord.ctx, round_id=r.round_id, reason="operator says no")
    assert aggregate(coord.sessions, coord.ctx, r.round_id) is None  # the claim sees it is over
    rec = r.record()
    assert rec.outcome == "failed" and rec.failure_reason == "failed by the admin: operator says no"
    assert not (coord.data_dir / "weights" / "kb" / "v1.f32").exists()
    with coord.tx() as s, pytest.raises(rounds.StageConflict):
        rounds.fail_round(s, coord.ctx, round_id=r.round_id, reason="again")
    _next_round_opens(coord, r.round_id)


def test_fail_round_over_the_admin_api_and_cli(sqlite_server: Server, tiny_bundle_dir: Path) -> None:
    from fedkeys.cli import main
    from tests.coordinator.test_rounds import setup_task, task_config

    setup_task(sqlite_server, tiny_bundle_dir.with_suffix(".tar"), task_config(max_rounds=None))
    with sqlite_server.admin() as admin:
        for _ in range(50):
            open_rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
            if open_rounds:
                break
            time.sleep(0.1)
        rid = open_rounds[0]["id"]
        r = admin.post(f"/v1/admin/tasks/kb/rounds/{rid}/fail", json={"reason": "stuck"})
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "failed" and r.json()["failure_reason"] == "failed by the admin: stuck"
        assert admin.post(f"/v1/admin/tasks/kb/rounds/{rid}/fail", json={"reason": "x"}).status_code == 409
        assert admin.post("/v1/admin/tasks/kb/rounds/999999/fail", json={"reason": "x"}).status_code == 404
        assert admin.post(f"/v1/admin/tasks/kb/rounds/{rid}/fail", json={"reason": ""}).status_code == 422
        for _ in range(50):  # the task opens its next round
            newer = [x for x in admin.get("/v1/admin/tasks/kb/rounds").json() if x["id"] > rid]
            if newer:
                break
            time.sleep(0.1)
        assert newer and newer[0]["stage"] == "selecting"
    token = sqlite_server.data_dir.parent / "admin-token"
    token.write_text(sqlite_server.admin_token)
    token.chmod(0o600)
    common = ["--url", sqlite_server.url, "--ca", str(sqlite_server.ca), "--admin-token-file", str(token)]
    args = [
        "coordinator",
        "task",
        "fail-round",
        "kb",
        str(newer[0]["id"]),
        "--reason",
        "from the cli",
        *common,
    ]
    assert main(args) == 0


def _finished_round(s: Session, number: int, created: datetime, seconds: float) -> None:
    from coordinator.db.models import Task

    task = s.scalar(select(Task).where(Task.name == "kb"))
    assert task is not None
    s.add(
        Round(
            task_id=task.id,
            number=number,
            stage=Stage.DONE,
            base_version=1,
            plan={},
            created_at=created,
            stage_started_at=created,
            stage_deadline=created,
            selection_target=5,
            outcome="committed",
            metrics={},
            finished_at=created + timedelta(seconds=seconds),
        )
    )
    task.next_round = number + 1


def _next_selection_seconds(coord: Coord) -> float:
    with coord.tx() as s:
        (rnd,) = rounds.open_rounds(s, coord.ctx)
        return (utc(rnd.stage_deadline) - utc(rnd.created_at)).total_seconds()


def test_a_short_round_keeps_the_next_selection_open_until_the_paced_fleet_is_back(
    coord: Coord,
) -> None:
    """Pace steering sends the devices a round does not need back for when the shortest earlier
    round would have ended. After rounds of 97 s and more, a round of 55 s opened a 30 s
    selection that closed before they were back, and failed with 0-1 devices (population run,
    2026-12-04). The next selection now stays open until they are back."""
    now = coord.ctx.now()
    with coord.tx() as s:
        _finished_round(s, 0, now - timedelta(seconds=400), 120.0)
        _finished_round(s, 1, now - timedelta(seconds=260), 100.0)
        _finished_round(s, 2, now - timedelta(seconds=55), 55.0)  # ended just now, early
    # devices were sent back for 100 s after round 2 opened (45 s from now), over a spread of
    # up to one selection window (30 s): the selection lasts until then, plus a retry's second
    assert _next_selection_seconds(coord) == pytest.approx(45 + 30 + 1, abs=2.0)


def test_a_round_as_long_as_its_history_opens_a_plain_selection_window(coord: Coord) -> None:
    now = coord.ctx.now()
    with coord.tx() as s:
        _finished_round(s, 0, now - timedelta(seconds=300), 60.0)
        _finished_round(s, 1, now - timedelta(seconds=200), 200.0)  # longer than the shortest
    assert _next_selection_seconds(coord) == pytest.approx(30.0, abs=0.5)


def test_a_status_brings_the_message_of_its_stage(coord: Coord) -> None:
    """A status poll with ``payload`` carries what the device fetches next at that stage (its
    roster, its inbound shares, the unmask request), the same as the stage's own route gives;
    a device the round went on without gets none."""
    r = SecureRound(coord)

    def status(device: str) -> Any:
        with coord.tx() as s:
            st = rounds.status_of(s, coord.ctx, round_id=r.round_id, device_id=device)
            return rounds.with_payload(s, coord.ctx, st, device_id=device)

    r.select()
    assert status("dev0").roster is None  # advertising: nothing to bring yet
    r.advertise()
    st = status("dev1")
    with coord.tx() as s:
        assert st.roster == rounds.roster(s, coord.ctx, round_id=r.round_id, device_id="dev1")
    assert st.shares is None and st.unmask is None
    r.share()
    assert r.close() == Stage.MASKED_INPUT
    st = status("dev2")
    with coord.tx() as s:
        assert st.shares == rounds.inbound_shares(s, coord.ctx, round_id=r.round_id, device_id="dev2")
    r.upload(["dev0", "dev1", "dev2", "dev3"])  # dev4 misses the upload
    with coord.tx() as s:
        past = coord.ctx.now() - timedelta(seconds=1)
        s.execute(update(Round).where(Round.id == r.round_id).values(stage_deadline=past))
    assert r.close() == Stage.UNMASK
    st = status("dev0")
    with coord.tx() as s:
        assert st.unmask == rounds.unmask_request(s, round_id=r.round_id, device_id="dev0")
    assert st.unmask is not None and "dev4" in st.unmask.dropped
    late = status("dev4")
    assert late.participant_stage == Stage.DROPPED and late.unmask is None


def test_after_a_first_round_the_selection_waits_three_windows(coord: Coord) -> None:
    """Without a history the first round's idle devices were sent back within two selection
    windows of their check-in, spread over up to one more: the second selection stays open that
    long (a 20 s one found nobody). A full pool still closes it at once."""
    with coord.tx() as s:
        _finished_round(s, 0, coord.ctx.now() - timedelta(seconds=40), 40.0)
    assert _next_selection_seconds(coord) == pytest.approx(90.0, abs=0.5)


def _selection_stage(coord: Coord, round_id: int) -> str:
    with coord.tx() as s:
        rnd = s.get(Round, round_id)
        assert rnd is not None
        return rnd.stage


def test_joins_that_each_saw_the_pool_short_are_closed_by_the_ticker(pg_coord: Coord) -> None:
    """PostgreSQL runs joins at once, each counting the pool (read committed) before the others
    commit: the last two devices of a five-device pool each saw four and neither closed the
    selection, so every candidate was held for the whole hold and sent away (CI, 2026-12-06).
    The ticker closes a full pool too, well before the selection's deadline."""
    c = pg_coord
    with c.tx() as s:
        (rnd,) = rounds.open_rounds(s, c.ctx)
        round_id, deadline = rnd.id, utc(rnd.stage_deadline)
    view = rounds.current_views(c.sessions, c.ctx).rounds[0]
    for i in range(3):
        assert isinstance(
            rounds.join_pool(c.sessions, c.ctx, view, f"dev{i}", ready_state()), rounds.Candidacy
        )
    with c.sessions() as a, a.begin(), c.sessions() as b, b.begin():  # two joins at once
        for session, device in ((a, "dev3"), (b, "dev4")):
            assert isinstance(_join_pool(session, c.ctx, view, device, ready_state()), rounds.Candidacy)
    with c.tx() as s:
        assert s.query(Candidate).filter_by(round_id=round_id).count() == 5
    assert _selection_stage(c, round_id) == Stage.SELECTING  # the race: full, and still open
    tick(c.app)
    assert _selection_stage(c, round_id) == Stage.ADVERTISE_KEYS
    assert c.ctx.now() < deadline


def test_the_ticker_leaves_a_short_pool_selecting(coord: Coord) -> None:
    with coord.tx() as s:
        (rnd,) = rounds.open_rounds(s, coord.ctx)
        round_id = rnd.id
        for i in range(4):  # of the 5 it needs
            s.add(
                Candidate(round_id=round_id, device_id=f"dev{i}", checked_in_at=coord.ctx.now(), examples=9)
            )
    tick(coord.app)
    assert _selection_stage(coord, round_id) == Stage.SELECTING
