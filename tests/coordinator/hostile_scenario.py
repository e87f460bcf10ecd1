"""The hostile-device scenario (issue 17): one real coordinator over TLS, a task with secure
aggregation and compression, real honest agents (ExecuTorch training on the tiny bundle, in
threads, for as many rounds as it takes) and one :class:`~tests.coordinator.hostile.HostileDevice`
that plays one misbehaviour per round, in sequence.

After each round the scenario judges it (:meth:`Scenario.judge`): done in time (a stalled round
is failed by the admin and reported with every thread's stack), the outcome the misbehaviour
should have (:data:`~tests.coordinator.hostile.EXPECTED`), the next round opened, and for a
committed round the exact sum: the new model must equal the old one plus the decoded mean of
exactly the survivors' encodings (FedAvg with lr 1). The honest agents' encodings are captured
by wrapping ``edge_client.participation.encode`` (keyed by the round's codec seed and the
agent's thread); the survivors come from the coordinator's database (participants whose
masked input went into the sum).

Used by tests/coordinator/test_hostile.py and bench/hostile_rounds.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text

from edge_client.agent import Agent
from protocol.codec import CodecParams, EncodedUpdate, decode_mean, encode, ring_bits
from tests.coordinator.hostile import (
    EXPECTED,
    MISBEHAVIOURS,
    HostileDevice,
    Played,
    SeenLog,
    StatusTap,
    thread_stacks,
)
from tests.coordinator.hostile import Probe as HostileProbe
from tests.coordinator.test_rounds import setup_task, task_config
from tests.edge_client.test_agent import Recorder, make_agent
from tests.servers import Server, start_server, stop_server

__all__ = ["RoundResult", "Scenario", "ScenarioConfig", "ScenarioResult", "honest_texts", "run_scenario"]

TASK = "kb"
GB = 1_000_000_000


class ScenarioConfig(BaseModel):
    """The scenario's knobs (the defaults keep a run of every misbehaviour under 4 minutes)."""

    misbehaviours: tuple[str, ...] = MISBEHAVIOURS
    honest: int = Field(default=3, ge=3)
    round_limit: float = Field(default=120.0, gt=0)
    """Seconds a round may take from the hostile device's assignment to its end."""
    body_bytes: int = Field(default=GB, ge=1)
    """Size of each huge body (``huge_bodies``)."""
    rss_growth_limit_mb: float = 50.0
    deadlines: dict[str, float] = Field(
        default_factory=lambda: {
            "selection": 30.0,
            "advertise": 6.0,
            "share": 6.0,
            "upload": 8.0,
            "unmask": 4.0,
            "quiet_seconds": 0.0,  # no straggler rule: a stage waits for every live device
        }
    )

    def task(self) -> dict[str, Any]:
        """Every device of the scenario is selected in every round (target = devices, the pool
        closes when full); the upload stage closes when all of them uploaded."""
        devices = self.honest + 1
        return task_config(
            clients_per_round=devices,
            over_selection=1.0,
            min_reports=3,
            selection_pool=1.0,
            max_rounds=None,
            eligibility={"min_examples": 10},
            codec={"keep_fraction": 0.25, "bits": 8, "clip_norm": 1.0, "weight_cap": 16},
            training={"local_steps": 1, "lr": 0.1},
            server_optimizer={"name": "fedavg", "lr": 1.0},
            deadlines=self.deadlines,
        )


@dataclass
class RoundResult:
    misbehaviour: str
    round_id: int = 0
    number: int = 0
    outcome: str = ""
    reason: str = ""
    survivors: list[str] = field(default_factory=list)
    sum_error: float | None = None  # max |new - expected| of a committed round
    sum_exact: bool = False  # sum_error within float32 rounding
    probes: list[HostileProbe] = field(default_factory=list)
    statuses_4xx: int = 0
    statuses_5xx: int = 0
    seconds: float = 0.0
    stalled: bool = False
    next_opened: bool = False
    problems: list[str] = field(default_factory=list)
    stacks: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ScenarioResult:
    database: str
    rounds: list[RoundResult] = field(default_factory=list)
    agents_alive: int = 0
    agents_total: int = 0
    agent_rounds_completed: list[int] = field(default_factory=list)
    agent_errors: list[str] = field(default_factory=list)
    statuses_5xx: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        out = [f"{r.misbehaviour}: {p}" for r in self.rounds for p in r.problems]
        if self.agents_alive != self.agents_total:
            out.append(f"only {self.agents_alive} of {self.agents_total} honest agents still run")
        out += [f"agent error: {e}" for e in self.agent_errors]
        out += [f"5xx: {s}" for s in self.statuses_5xx]
        out += [f"coordinator traceback ({_exception_line(t)}): ...{t[-1500:]}" for t in self.tracebacks]
        return out


def _exception_line(trace: str) -> str:
    """The line of a traceback that names the exception (the last such line)."""
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    named = (line for line in reversed(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line))
    return next(named, lines[-1] if lines else "")


def honest_texts(n: int) -> list[list[str]]:
    """Local messages of ``n`` honest users (the federated split of the chitchat corpus)."""
    from model_export.data import load_chitchat, split_corpus

    fed = split_corpus(load_chitchat())["federated"]
    users = sorted((u for u in fed if len(fed[u]) >= 60), key=lambda u: -len(fed[u]))[:n]
    return [[m.text for m in fed[u][:80]] for u in users]


class StatusRecorder(Recorder):
    """An agent's transport (``make_agent`` takes a Recorder): records statuses, not bodies."""

    def __init__(self, ca: Path, log: SeenLog, who: str) -> None:
        super().__init__(ca)
        self.tap = StatusTap(ca, log, who)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.tap.handle_request(request)


class EncodingTap:
    """The honest agents' encodings, by (round codec seed, thread name)."""

    def __init__(self) -> None:
        self.values: dict[tuple[bytes, str], npt.NDArray[np.uint32]] = {}

    @contextmanager
    def installed(self) -> Iterator[EncodingTap]:
        from edge_client import participation

        real = encode  # what participation imported

        def recording(delta: Any, params: CodecParams, rng: Any, **kw: Any) -> EncodedUpdate:
            enc = real(delta, params, rng, **kw)
            key = (bytes(params.seed), threading.current_thread().name)
            self.values[key] = np.array(enc.values, dtype=np.uint32)
            return enc

        with mock.patch.object(participation, "encode", recording):
            yield self


class Scenario:
    """One coordinator, its task, the honest agents and the hostile device (see the module doc)."""

    def __init__(
        self, server: Server, bundle_dir: Path, workdir: Path, texts: list[list[str]], cfg: ScenarioConfig
    ) -> None:
        self.server = server
        self.bundle_dir = bundle_dir
        self.workdir = workdir
        self.texts = texts
        self.cfg = cfg
        self.seen = SeenLog()
        self.encodings = EncodingTap()
        self.engine = create_engine(server.db_url)
        self.agents: list[Agent] = []
        self.threads: list[threading.Thread] = []
        self.agent_errors: list[str] = []
        self.hostile = HostileDevice(
            server.url,
            str(server.ca),
            server.enroll_secret,
            np.zeros(0, dtype=np.float32),
            seen=self.seen,
            body_attack=self.huge_bodies,
        )

    # -- set-up --------------------------------------------------------------------------------

    def start(self) -> None:
        setup_task(self.server, self.bundle_dir.with_suffix(".tar"), self.cfg.task(), name=TASK)
        for i in range(self.cfg.honest):
            who = f"honest-{i}"
            rec = StatusRecorder(self.server.ca, self.seen, who)
            agent = make_agent(self.server, self.workdir, who, self.texts[i], rec)
            agent.cfg.keep_program = True  # no reload of train.pte every round
            agent.enroll()
            self.agents.append(agent)
            self.threads.append(
                threading.Thread(target=self._run_agent, args=(agent,), name=who, daemon=True)
            )
        self.hostile.enroll()
        for th in self.threads:
            th.start()

    def _run_agent(self, agent: Agent) -> None:
        try:
            agent.run(max_seconds=3600)
        except BaseException as e:  # reported: an honest agent must never die
            self.agent_errors.append(f"{threading.current_thread().name}: {type(e).__name__}: {e}")
            raise

    def stop(self) -> tuple[int, list[int]]:
        """Stop the agents; (how many were still running, rounds each completed)."""
        alive = sum(th.is_alive() for th in self.threads)
        for a in self.agents:
            a.stop()
        for th in self.threads:
            th.join(60)
        done = [sum(r.completed for r in a.stats.rounds) for a in self.agents]
        return alive, done

    # -- huge bodies -----------------------------------------------------------------------------

    def huge_bodies(self, hostile: HostileDevice, played: Played) -> None:
        """A body of ``body_bytes`` to every route the coordinator serves, with and without a
        Content-Length, with the hostile device's token, while its round runs; the coordinator's
        RSS (VmRSS of its processes, sampled every 20 ms) must grow by less than the limit."""
        from bench import hostile_bodies as hb

        assert self.server.proc is not None
        pid = self.server.proc.pid
        before = hb.rss_kb(pid)["VmRSS"]
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], hb.rss_kb(pid)["VmRSS"])
                except OSError:
                    return
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        sent = requests = 0
        try:
            with mock.patch.dict(hb.PATH_PARAMS, {"round_id": str(played.round_id), "name": TASK}):
                for method, template in hb.routes(self.server):
                    for chunked in (False, True):
                        probe = hb.Probe(method, template, "device", chunked)
                        out = hb.send(self.server, probe, hostile.token, self.cfg.body_bytes)
                        sent += out.sent
                        requests += 1
                        framing = "chunked" if chunked else "with length"
                        label = f"{self.cfg.body_bytes / GB:g} GB {framing}: {method} {template}"
                        status = out.status if out.status is not None else 0  # 0: no answer
                        if status:  # raw sockets: not through the device's status tap
                            self.seen.add("hostile", method, template, status)
                        played.probes.append(HostileProbe(label, status, frozenset(range(400, 500))))
        finally:
            stop.set()
            sampler.join()
        played.extra["rss"] = {
            "before_mb": round(before / 1024, 1),
            "peak_mb": round(peak[0] / 1024, 1),
            "growth_mb": round((peak[0] - before) / 1024, 1),
            "requests": requests,
            "sent_mb": round(sent / 1e6, 1),
        }

    # -- one round -------------------------------------------------------------------------------

    def _admin(self, path: str) -> Any:
        with self.server.admin(timeout=30) as admin:
            r = admin.get(path)
            r.raise_for_status()
            return r.json()

    def _round(self, round_id: int) -> dict[str, Any] | None:
        for r in self._admin(f"/v1/admin/tasks/{TASK}/rounds"):
            if r["id"] == round_id:
                return dict(r)
        return None

    def play(self, misbehaviour: str) -> RoundResult:
        res = RoundResult(misbehaviour)
        start = time.time()
        end = start + self.cfg.round_limit
        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["played"] = self.hostile.play(misbehaviour)
            except BaseException as e:
                box["error"] = e

        th = threading.Thread(target=go, name=f"hostile-{misbehaviour}", daemon=True)
        th.start()
        th.join(self.cfg.round_limit)
        if th.is_alive():
            res.stalled = True
            res.stacks = thread_stacks()
            res.problems.append(f"the hostile device is stuck after {self.cfg.round_limit:.0f} s")
            res.seconds = time.time() - start
            return res
        if "error" in box:
            import traceback

            err = box["error"]
            trace = "".join(traceback.format_exception(err))
            res.problems.append(f"hostile device error: {type(err).__name__}: {err}\n{trace}")
            res.seconds = time.time() - start
            return res
        played: Played = box["played"]
        res.round_id, res.probes = played.round_id, played.probes
        res.extra.update(played.extra)
        rnd = self._round(played.round_id)
        while (rnd is None or rnd["stage"] != "done") and time.time() < end:
            time.sleep(0.2)
            rnd = self._round(played.round_id)
        res.seconds = time.time() - start
        assert rnd is not None
        res.number = rnd["number"]
        if rnd["stage"] != "done":
            res.stalled = True
            res.stacks = thread_stacks()
            res.problems.append(
                f"round {played.round_id} still at {rnd['stage']} after {self.cfg.round_limit:.0f} s"
            )
            with self.server.admin() as admin:  # let the next rounds be played
                admin.post(
                    f"/v1/admin/tasks/{TASK}/rounds/{played.round_id}/fail",
                    json={"reason": "stalled (harness)"},
                )
        res.outcome, res.reason = rnd["outcome"] or rnd["stage"], rnd["failure_reason"] or ""
        res.extra["stage_seconds"] = rnd["metrics"].get("stage_seconds", {})
        opened = time.time() + 10
        while time.time() < opened and not res.next_opened:
            res.next_opened = any(
                r["number"] > rnd["number"] for r in self._admin(f"/v1/admin/tasks/{TASK}/rounds")
            )
            time.sleep(0.2)
        seen = self.seen.between(start, time.time())
        res.statuses_4xx = sum(400 <= s.status < 500 for s in seen)
        res.statuses_5xx = sum(s.status >= 500 for s in seen)
        if not res.stalled:
            self.judge(res, played, rnd)
        return res

    # -- judging ---------------------------------------------------------------------------------

    def _participants(self, round_id: int) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT device_id, stage FROM participants WHERE round_id = :r"), {"r": round_id}
            ).all()
        return {str(d): str(s) for d, s in rows}

    def _weights(self, version: int) -> npt.NDArray[np.float32]:
        return np.fromfile(self.server.data_dir / "weights" / TASK / f"v{version}.f32", dtype="<f4")

    def judge(self, res: RoundResult, played: Played, rnd: dict[str, Any]) -> None:
        want = EXPECTED[res.misbehaviour]
        problems = res.problems
        for p in played.probes:
            if not p.ok:
                problems.append(f"probe {p.label!r} got {p.status or 'no answer'}")
        if res.statuses_5xx:
            problems.append(f"{res.statuses_5xx} responses were 5xx")
        if not res.next_opened:
            problems.append("no next round opened")
        rss = played.extra.get("rss")
        if rss is not None and rss["growth_mb"] >= self.cfg.rss_growth_limit_mb:
            problems.append(f"coordinator RSS grew {rss['growth_mb']} MB under huge bodies")
        tolerated = res.outcome == "failed" and any(r in res.reason for r in want.may_fail_with)
        if res.outcome != want.outcome and not tolerated:
            problems.append(f"round {res.outcome} ({res.reason}), expected {want.outcome}")
        if res.outcome == "failed":
            if want.outcome != "failed" and not tolerated:
                return
            reasons = want.reasons + want.may_fail_with
            if not any(r in res.reason for r in reasons):
                problems.append(f"failure reason {res.reason!r} names none of {reasons}")
            task = self._admin(f"/v1/admin/tasks/{TASK}")
            if rnd["new_version"] is not None or task["current_version"] != rnd["base_version"]:
                problems.append("a failed round changed the model")
            return
        parts = self._participants(res.round_id)
        res.survivors = sorted(d for d, s in parts.items() if s in ("masked_input", "unmask"))
        hostile = self.hostile.device_id
        if want.outcome != "committed":  # committed against expectation: show what went in
            self._check_sum(res, played, rnd)
            return
        norm = rnd["metrics"].get("aggregate_norm")
        if norm is None or not norm["kept"] <= norm["bound"]:
            problems.append(f"the committed aggregate is not within its norm bound: {norm}")
        if (hostile in res.survivors) != want.hostile_in_sum:
            problems.append(f"the hostile device is {'' if hostile in res.survivors else 'not '}in the sum")
        if played.victim is not None and played.victim in res.survivors:
            problems.append("the falsely accused device is still in the sum")
        if res.misbehaviour == "garbage_shares":
            refused = rnd["metrics"].get("refused", {}).get("masked_input", {})
            if hostile not in refused:
                problems.append(f"the hostile device was not refused at the upload close: {refused}")
        self._check_sum(res, played, rnd)

    def _check_sum(self, res: RoundResult, played: Played, rnd: dict[str, Any]) -> None:
        plan = played.plan
        assert plan is not None and plan.codec is not None
        seed = bytes(plan.codec.seed)
        thread_of = {a.device_id: th.name for a, th in zip(self.agents, self.threads, strict=True)}
        encodings = []
        for device in res.survivors:
            if device == self.hostile.device_id:
                enc = played.encoding
            else:
                enc = self.encodings.values.get((seed, thread_of.get(device, "?")))
            if enc is None:
                res.problems.append(f"no captured encoding of survivor {device}")
                return
            encodings.append(enc.astype(np.uint64))
        modulus = np.uint64(1 << ring_bits(plan.codec))
        total = (np.sum(encodings, axis=0) % modulus).astype(np.uint32)
        d = plan.weights.size // 4
        mean = decode_mean(total, plan.codec, len(encodings), d).mean
        old = self._weights(rnd["base_version"])
        new = self._weights(rnd["new_version"])
        expected = (old + np.float32(1.0) * mean).astype(np.float32)
        res.sum_error = float(np.abs(new - expected).max())
        tolerance = 1e-6 * max(1.0, float(np.abs(expected).max()))
        res.sum_exact = res.sum_error <= tolerance
        if not res.sum_exact:
            res.problems.append(f"new model is off the survivors' exact mean by {res.sum_error:.3g}")

    # -- the whole scenario ----------------------------------------------------------------------

    def tracebacks(self) -> list[str]:
        """Tracebacks in the coordinator's log: a JSON record that carries one, or a plain-text
        block (uvicorn's "Exception in ASGI application"), up to the next JSON record."""
        log = self.server.log
        if log is None or not log.exists():
            return []
        out: list[str] = []
        block: list[str] | None = None
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                if block:
                    out.append("\n".join(block))
                block = None
                if "Traceback" in line:
                    out.append(line)
            elif line.startswith("Traceback") and block is None:
                block = [line]
            elif block is not None:
                block.append(line)
        if block:
            out.append("\n".join(block))
        return out


def run_scenario(
    workdir: Path, db_url: str, bundle_dir: Path, texts: list[list[str]], cfg: ScenarioConfig | None = None
) -> ScenarioResult:
    """Start a coordinator on ``db_url``, play every misbehaviour, stop everything."""
    cfg = cfg or ScenarioConfig()
    result = ScenarioResult(database="postgres" if db_url.startswith("postgresql") else "sqlite")
    t0 = time.time()
    server = start_server(workdir, db_url)
    with ExitStack() as stack:
        stack.callback(stop_server, server)
        scenario = Scenario(server, bundle_dir, workdir, texts, cfg)
        stack.callback(scenario.engine.dispose)
        stack.enter_context(scenario.encodings.installed())
        scenario.start()
        try:
            for name in cfg.misbehaviours:
                r = scenario.play(name)
                result.rounds.append(r)
                if r.stalled and not r.round_id:
                    break  # the hostile device itself is stuck: nothing more can be played
        finally:
            result.agents_alive, result.agent_rounds_completed = scenario.stop()
            result.agents_total = len(scenario.agents)
            result.agent_errors = scenario.agent_errors
        result.statuses_5xx = [
            f"{s.who} {s.method} {s.path} -> {s.status}" for s in scenario.seen.items if s.status >= 500
        ]
        result.tracebacks = scenario.tracebacks()
    result.seconds = time.time() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def rounds_table(results: list[ScenarioResult]) -> str:
    """One row per round played: what the hostile device did and what became of the round."""
    lines = [
        "| misbehaviour | database | round | outcome | as expected | reason | 4xx seen | 5xx seen | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res.rounds:
            outcome = "stalled" if r.stalled else r.outcome
            reason = r.reason
            if not reason and r.sum_error is not None:
                exact = "exact" if r.sum_exact else f"off the survivors' mean by {r.sum_error:.2g}"
                reason = f"{len(r.survivors)} inputs summed, {exact}"
            lines.append(
                f"| {r.misbehaviour} | {res.database} | {r.number} | {outcome} | {'yes' if r.ok else 'NO'} "
                f"| {_cell(reason)} | {r.statuses_4xx} | {r.statuses_5xx} | {r.seconds:.1f} |"
            )
    return "\n".join(lines)


def summary_table(results: list[ScenarioResult]) -> str:
    """The issue's table: per database, rounds committed / failed cleanly / stalled, honest
    agents lost, 5xx, and the coordinator's RSS under huge bodies."""
    lines = [
        "| database | misbehaviours tried | committed | failed cleanly | stalled | not as expected "
        "| honest agents lost | 5xx | RSS before / peak / growth under 1 GB bodies (MB) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        rounds = res.rounds
        committed = sum(r.outcome == "committed" and not r.stalled for r in rounds)
        failed = sum(r.outcome == "failed" and bool(r.reason) and not r.stalled for r in rounds)
        stalled = sum(r.stalled for r in rounds)
        wrong = [r.misbehaviour for r in rounds if not r.ok]
        lost = res.agents_total - res.agents_alive
        rss = next((r.extra["rss"] for r in rounds if "rss" in r.extra), None)
        rss_text = f"{rss['before_mb']} / {rss['peak_mb']} / +{rss['growth_mb']}" if rss else "-"
        lines.append(
            f"| {res.database} | {len(rounds)} | {committed} | {failed} | {stalled} "
            f"| {len(wrong)}{': ' + ', '.join(wrong) if wrong else ''} | {lost} "
            f"| {len(res.statuses_5xx)} | {rss_text} | {res.seconds:.0f} |"
        )
    return "\n".join(lines)


def describe(result: ScenarioResult) -> str:
    """Everything a failed test should show: the rounds, the problems, stalled rounds' stacks."""
    parts = [rounds_table([result]), *result.problems]
    parts += [f"--- stacks when {r.misbehaviour} stalled ---\n{r.stacks}" for r in result.rounds if r.stacks]
    parts.append(f"honest agents' completed rounds: {result.agent_rounds_completed}")
    return "\n".join(parts)
