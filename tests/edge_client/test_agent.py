"""The real device agent (ExecuTorch training, secure aggregation, HTTPS) against a real
coordinator: rounds complete, only encoded updates and scalars leave the device, and faults
(dropped connection mid-upload, unplugged mid-training, wrong CA, bad token) are handled."""

from __future__ import annotations

import json
import random
import sqlite3
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_client.agent import Agent, AgentConfig, NotEnrolled
from edge_client.datastore import DataStore
from edge_client.device_state import Conditions, StaticProvider
from edge_client.records import RoundRecord
from edge_client.transport import ApiError, Transport, TransportError
from fedkeys.cli import main
from model_export.data import load_chitchat, split_corpus
from tests.coordinator.test_rounds import setup_task, task_config, wait_round
from tests.servers import Server, start_server, stop_server

pytestmark = pytest.mark.slow

READY = Conditions(True, True, True, 90.0, 5000.0, "static")


@pytest.fixture(scope="module")
def user_texts() -> list[list[str]]:
    fed = split_corpus(load_chitchat())["federated"]
    users = sorted((u for u in fed if len(fed[u]) >= 60), key=lambda u: -len(fed[u]))[:6]
    return [[m.text for m in fed[u][:80]] for u in users]


def strings(value: Any) -> list[str]:
    """Every string in a decoded JSON document, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def agent_cfg(server: Server, tmp: Path, name: str) -> AgentConfig:
    return AgentConfig(
        coordinator=server.url,
        state_dir=tmp / name,
        ca=server.ca,
        enroll_secret=server.enroll_secret,
        min_examples=10,
        eval_holdout=10,
    )


class Recorder(httpx.BaseTransport):
    """Forwards to the real network and keeps every request body the device sends."""

    def __init__(self, ca: Path, fail_first_upload: bool = False) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca)))
        self.bodies: list[tuple[str, str, bytes]] = []
        self.status_waits: list[float] = []  # the ``wait`` of every held status poll
        self.fail_first_upload = fail_first_upload

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.bodies.append((request.method, request.url.path, body))
        if request.url.path.endswith("/status") and "wait" in request.url.params:
            self.status_waits.append(float(request.url.params["wait"]))
        response = self.inner.handle_request(request)
        if self.fail_first_upload and request.url.path.endswith("/update"):
            self.fail_first_upload = False
            response.read()
            raise httpx.ReadError("connection dropped after the body was sent")
        return response


@dataclass
class UnplugAfter(StaticProvider):
    """Ready until ``reads_left`` more readings have been taken, then off the charger."""

    reads_left: int | None = None

    def read(self) -> Conditions:
        if self.reads_left is not None:
            self.reads_left -= 1
            if self.reads_left <= 0:
                return replace(self.conditions, charging=False)
        return self.conditions


_MADE: list[Agent] = []
"""The agents a test made with ``make_agent``: closed after it (their kept-alive connections)."""


@pytest.fixture(autouse=True)
def _close_agents() -> Iterator[None]:
    yield
    while _MADE:
        _MADE.pop().close()


def make_agent(
    server: Server,
    tmp: Path,
    name: str,
    texts: list[str],
    rec: Recorder | None = None,
    provider: StaticProvider | None = None,
) -> Agent:
    cfg = agent_cfg(server, tmp, name)
    transport = Transport(cfg.coordinator, ca=cfg.ca, transport=rec, retries=8, backoff=0.2, max_backoff=2)
    store = DataStore(cfg.state_dir / "messages.db")
    store.add(texts)
    agent = Agent(cfg, provider or StaticProvider(READY), store=store, transport=transport)
    _MADE.append(agent)
    return agent


def thread_stacks() -> str:
    """Every thread's Python stack, by name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def unexpected_outcome(server: Server, expect: list[str]) -> str | None:
    """The first finished round of task "kb" whose outcome is not ``expect``'s, described."""
    try:
        with server.admin(timeout=10) as admin:
            rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
    except httpx.HTTPError:
        return None  # asked again on the next poll
    for i, r in enumerate(rounds):
        if r["stage"] == "done" and (i >= len(expect) or r["outcome"] != expect[i]):
            return f"round {r['number']} ended {r['outcome']} ({r['failure_reason']}); expected {expect}"
    return None


def run_agents(
    agents: list[Agent],
    rounds: int,
    timeout: float = 240,
    *,
    server: Server | None = None,
    expect: list[str] | None = None,
) -> None:
    """Run the agents as threads of this process (as the simulator does) until each took part
    in ``rounds`` rounds. Fails at once, with every thread's stack, when an agent raises, when
    one is still running ``timeout + 30`` s after the start, or (given ``server`` and
    ``expect``) when a round of the task ends with another outcome than ``expect`` lists."""
    errors: list[str] = []

    def go(a: Agent) -> None:
        try:
            a.run(max_rounds=rounds, max_seconds=timeout)
        except BaseException as e:
            errors.append(f"{threading.current_thread().name}: {''.join(traceback.format_exception(e))}")

    threads = [
        threading.Thread(target=go, args=(a,), name=f"agent-{i}", daemon=True) for i, a in enumerate(agents)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 30
    problem: str | None = None
    while problem is None:
        alive = [t for t in threads if t.is_alive()]
        if errors:
            problem = "an agent raised:\n" + "\n".join(errors)
        elif server is not None and expect is not None:
            problem = unexpected_outcome(server, expect)
        if problem is None and not alive:
            return
        if problem is None and time.monotonic() > deadline:
            problem = f"{', '.join(t.name for t in alive)} still running {timeout + 30:.0f} s after the start"
        if problem is None:
            alive[0].join(1.0)
    stacks = thread_stacks()
    for a in agents:
        a.stop()
    pytest.fail(f"{problem}\n\nEvery thread's stack:\n{stacks}", pytrace=False)


def test_agents_complete_secure_rounds_and_send_no_text(
    sqlite_server: Server, tiny_bundle_dir: Path, tmp_path: Path, user_texts: list[list[str]]
) -> None:
    server = sqlite_server
    cfg = task_config(
        clients_per_round=3,
        over_selection=1.0,
        min_reports=3,
        max_rounds=2,
        eligibility={"min_examples": 10},
        deadlines={"selection": 10, "upload": 60},
        codec={"keep_fraction": 0.25, "bits": 8, "clip_norm": 1.0},
        training={"local_steps": 3, "lr": 0.1},
    )
    setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    recs = [Recorder(server.ca) for _ in range(3)]
    agents = [make_agent(server, tmp_path, f"dev{i}", user_texts[i], recs[i]) for i in range(3)]
    agents[0].cfg.keep_program = True  # the others unload train.pte after each round
    agents[1].cfg.drop_codec_caches = True  # as `fedkeys client run` does
    run_agents(agents, rounds=2, server=server, expect=["committed", "committed"])
    with server.admin() as admin:
        versions = admin.get("/v1/admin/tasks/kb/versions").json()
        rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
    assert [r["outcome"] for r in rounds] == ["committed", "committed"]
    assert [v["version"] for v in versions] == [0, 1, 2]
    for a in agents:
        assert a.model_version == 2
        assert all(r.completed for r in a.stats.rounds)
        state = a.cfg.state_dir
        assert (state / "device.json").stat().st_mode & 0o777 == 0o600
        assert bool(a._trainers) is a.cfg.keep_program
        # the global weights of both rounds wait on disk (the second came as an XOR delta)
        assert sorted(f.name.split("-")[0] for f in (state / "weights").iterdir()) == ["v0", "v1"]
        assert not list(state.rglob("*.part")) and not (state / "local-weights.f32").exists()
    # the status poll that announced each secure-aggregation stage brought its message: no
    # device asked for a roster, its inbound shares or the unmask request on their own routes
    for rec in recs:
        fetched = [p for m, p, _ in rec.bodies if m == "GET" and "/secagg/" in p]
        posted = [p for m, p, _ in rec.bodies if m == "POST" and "/secagg/" in p]
        assert not fetched and len(posted) == 2 * 3, (fetched, posted)
        # and the training report came in the upload's header, not a request of its own
        assert not [p for _, p, _ in rec.bodies if p.endswith("/report")]
    # polls after the upload are held longer (nothing but a shutdown to check between them)
    waits = [w for rec in recs for w in rec.status_waits]
    assert 25.0 in waits and max(waits) <= 25.0, waits
    for v in versions[1:]:  # every device's report is in the round's metrics
        assert v["metrics"]["reports"] == 3 and v["metrics"]["mean_loss_before"] > 0, v["metrics"]
    # nothing but keys, encrypted shares, the encoded masked update and scalars left the devices
    for rec, texts in zip(recs, user_texts, strict=False):
        words = {w for t in texts for w in t.lower().split() if len(w) >= 6 and w.isalpha()}
        assert len(words) > 10
        for method, path, body in rec.bodies:
            if path.endswith("/update"):
                assert body[:4] == b"FKUP" and body[6] == 1  # binary RING update: masked ring elements
                continue
            if not body:
                continue
            sent = " ".join(strings(json.loads(body))).lower()  # every other body is typed JSON
            leaked = [w for w in words if w in sent.split()]
            assert not leaked, (method, path, leaked[:5])


def test_dropped_connection_mid_upload_is_retried_idempotently(
    sqlite_server: Server, tiny_bundle_dir: Path, tmp_path: Path, user_texts: list[list[str]]
) -> None:
    server = sqlite_server
    cfg = task_config(
        clients_per_round=3,
        over_selection=1.0,
        min_reports=3,  # a secure sum needs at least three
        max_rounds=1,
        eligibility={"min_examples": 10},
        training={"local_steps": 2},
    )
    setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    flaky = Recorder(server.ca, fail_first_upload=True)
    agents = [
        make_agent(server, tmp_path, "a", user_texts[0], flaky),
        make_agent(server, tmp_path, "b", user_texts[1]),
        make_agent(server, tmp_path, "c", user_texts[2]),
    ]
    run_agents(agents, rounds=1, server=server, expect=["committed"])
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed" and rnd["reported"] == 3
    uploads = [b for m, p, b in flaky.bodies if p.endswith("/update")]
    assert len(uploads) == 2 and uploads[0] == uploads[1]  # the same update, sent twice, counted once


def test_unplugged_mid_training_leaves_cleanly(
    sqlite_server: Server, tiny_bundle_dir: Path, tmp_path: Path, user_texts: list[list[str]]
) -> None:
    server = sqlite_server
    cfg = task_config(
        clients_per_round=3,
        over_selection=1.34,  # 4 selected
        min_reports=3,
        max_rounds=1,
        eligibility={"min_examples": 10},
        deadlines={"upload": 8},
        training={"local_steps": 200, "max_seconds": 60},
    )
    setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    unplug = UnplugAfter(READY)
    agents = [make_agent(server, tmp_path, f"d{i}", user_texts[i]) for i in range(3)]
    agents.append(make_agent(server, tmp_path, "victim", user_texts[3], provider=unplug))
    real_train = agents[3].local_train
    calls: dict[str, Any] = {}

    def unplug_after_start(plan: Any, weights: Any) -> Any:
        unplug.reads_left = 20  # the charger comes out some steps into local training
        calls["result"] = real_train(plan, weights)
        return calls["result"]

    agents[3].local_train = unplug_after_start  # type: ignore[method-assign]
    run_agents(agents, rounds=1, timeout=90, server=server, expect=["committed"])
    assert calls["result"].report.aborted
    assert agents[3].stats.rounds and not agents[3].stats.rounds[0].completed
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed" and rnd["reported"] == 3


def test_wrong_ca_is_refused(sqlite_server: Server, tmp_path: Path) -> None:
    from coordinator.security import make_dev_certs

    other = make_dev_certs(tmp_path / "other", ["127.0.0.1"])
    cfg = replace(agent_cfg(sqlite_server, tmp_path, "x"), ca=other.ca_cert)
    transport = Transport(cfg.coordinator, ca=cfg.ca, retries=1, backoff=0.01)
    with (
        Agent(cfg, StaticProvider(READY), transport=transport) as agent,
        pytest.raises(TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"),
    ):
        agent.enroll()
    rc = main(
        [
            "client",
            "--state-dir",
            str(tmp_path / "cli"),
            "enroll",
            "--coordinator",
            sqlite_server.url,
            "--ca",
            str(other.ca_cert),
            "--enroll-secret",
            sqlite_server.enroll_secret,
        ]
    )
    assert rc == 2


def test_bad_token_reenrols_or_fails_clearly(
    sqlite_server: Server, tmp_path: Path, user_texts: list[list[str]]
) -> None:
    agent = make_agent(sqlite_server, tmp_path, "t", user_texts[0])
    first = agent.enroll()
    agent.transport.token = "not-a-valid-token"
    wait, _ = agent.step()  # 401 -> enrols again with the fleet secret
    assert agent.device_id != first and agent.transport.token != "not-a-valid-token" and wait < 5
    # without the secret: a clear error, no traceback
    no_secret = Agent(replace(agent.cfg, enroll_secret=None, state_dir=tmp_path / "n"), StaticProvider(READY))
    with no_secret, pytest.raises(NotEnrolled):
        no_secret.enroll()
    bad = Transport(sqlite_server.url, ca=sqlite_server.ca, token="bogus", retries=0)
    with bad, pytest.raises(ApiError) as e:
        bad.checkin(agent.state(READY))
    assert e.value.status == 401


def test_client_cli_local_data_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "c")
    assert main(["client", "--state-dir", d, "add-text", "hello", "there"]) == 0
    f = tmp_path / "m.txt"
    f.write_text("one\ntwo\n")
    assert main(["client", "--state-dir", d, "import", str(f)]) == 0
    assert main(["client", "--state-dir", d, "status"]) == 0
    out = capsys.readouterr().out
    status = json.loads(out[out.index("{") :])
    assert status["local_data"]["messages"] == 3 and status["enrolled"] is False
    assert main(["client", "--state-dir", d, "import", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["client", "--state-dir", d, "suggest", "hi"]) == 2  # no model yet: clear error


def test_restarted_coordinator_mid_round(
    tmp_path: Path, tiny_bundle_dir: Path, user_texts: list[list[str]]
) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    server = start_server(tmp_path, db)
    port = int(server.url.rsplit(":", 1)[1])
    cfg = task_config(
        clients_per_round=3,
        over_selection=1.0,
        min_reports=3,
        max_rounds=1,
        eligibility={"min_examples": 10},
        deadlines={"upload": 40, "unmask": 30},
        training={"local_steps": 40},
    )
    setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    agents = [make_agent(server, tmp_path, f"r{i}", user_texts[i]) for i in range(3)]
    thread = threading.Thread(target=run_agents, args=(agents, 1, 120), daemon=True)
    thread.start()
    end = time.time() + 60
    with server.admin() as admin:
        while time.time() < end:
            rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
            if rounds and rounds[-1]["stage"] in ("masked_input",):
                break
            time.sleep(0.05)
    stop_server(server)
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
        thread.join(150)
        rnd = wait_round(restarted)
        assert rnd["outcome"] in ("committed", "failed")
        for a in agents:
            assert a.stats.rounds, "agent gave up instead of resuming"
    finally:
        stop_server(restarted)


def test_a_left_round_is_not_started_over(tmp_path: Path) -> None:
    """A coordinator that still counts the device in a round it left (until the stage's
    deadline drops it) must not make the device start that round again, in a hot loop."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/checkin"
        return httpx.Response(200, json={"action": "train", "round_id": 7, "task": "t"})

    store = DataStore(tmp_path / "m.db")
    store.add((f"message {i}", time.time() - 60 * i) for i in range(20))
    transport = Transport("https://coord", token="t", transport=httpx.MockTransport(answer))
    cfg = AgentConfig(coordinator="https://coord", state_dir=tmp_path / "s", min_examples=10)
    agent = Agent(cfg, StaticProvider(READY), store=store, transport=transport)
    started: list[int] = []

    def train_round(round_id: int) -> RoundRecord:
        started.append(round_id)
        return RoundRecord(round_id, "train", completed=False, reason="left")

    agent.train_round = train_round  # type: ignore[method-assign]
    assert agent.step() == (0.0, True)
    wait, took_part = agent.step()
    assert started == [7] and not took_part and wait >= 0.5 * cfg.left_round_wait


def _training_plan(bundle: Any, **training: Any) -> Any:
    from protocol.wire import ArtifactRef, RoundPlan, TrainingPlan

    ref = ArtifactRef(url="/v1/x", sha256="0" * 64, size=1)
    plan = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "max_seconds": 60.0, **training}
    return RoundPlan(
        round_id=1,
        task="kb",
        kind="train",
        model_version=0,
        bundle=ref,
        weights=ref,
        layout_hash=bundle.manifest.train.layout.hash(),
        training=TrainingPlan(**plan),
        stage_deadline=0.0,
    )


def test_local_work_follows_the_devices_data(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """A round draws its messages at random from the whole store (the evaluation holdout
    excepted), makes ``local_epochs`` passes over them within the ``local_steps`` cap, and its
    example count is the distinct messages its steps trained on."""
    from protocol.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    w0 = bundle.initial_weights()

    def device(name: str, n: int, holdout: int) -> Agent:
        store = DataStore(tmp_path / name / "m.db")
        store.add((f"message number {i} of {name}", time.time() - 60 * (n - i)) for i in range(n))
        cfg = AgentConfig(coordinator="https://coord", state_dir=tmp_path / name, eval_holdout=holdout)
        agent = Agent(cfg, StaticProvider(READY), store=store, rng=random.Random(1))
        agent.bundle = lambda plan: bundle  # type: ignore[method-assign]
        return agent

    def trained(agent: Agent) -> list[int]:
        with sqlite3.connect(agent.store.path) as db:
            return [int(t.split()[2]) for (t,) in db.execute("SELECT text FROM messages WHERE trained = 1")]

    # a heavy device stops at the step cap, on messages from all over its history
    heavy = device("heavy", 600, holdout=20)
    res = heavy.local_train(_training_plan(bundle, local_steps=3, max_examples=200), w0.copy())
    assert res.report.steps == 3 and not res.report.aborted
    got = trained(heavy)
    assert res.examples == len(got) > 0
    assert max(got) < 580  # the newest 20 are kept for evaluation
    assert min(got) < 290  # not only the newest: the store's older half is drawn too
    # a light device makes its epochs and stops: one pass over its few messages is one step
    light = device("light", 5, holdout=1)
    res = light.local_train(
        _training_plan(bundle, local_steps=50, max_examples=200, local_epochs=1), w0.copy()
    )
    assert (res.report.steps, res.examples) == (1, 4) and sorted(trained(light)) == [0, 1, 2, 3]
    # epochs multiply a medium device's steps (below the cap)
    steps = []
    for epochs in (1, 2):
        mid = device(f"mid{epochs}", 60, holdout=10)
        plan = _training_plan(bundle, local_steps=50, max_examples=200, local_epochs=epochs)
        res = mid.local_train(plan, w0.copy())
        steps.append(res.report.steps)
        assert res.examples == 50
    assert steps[0] > 1 and steps[1] == 2 * steps[0] <= 50
