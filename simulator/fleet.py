"""A fleet of virtual devices, each a real ``edge_client`` agent with one real participant's
messages, a simulated availability trace, a speed factor and random drop-outs.

Devices run as threads inside worker processes (one per core by default, or Ray tasks): a
device mostly waits (check-in intervals, stage deadlines), and the devices of one worker share
one ExecuTorch training program behind a lock, as one core trains one model at a time.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.records import RoundRecord

if TYPE_CHECKING:
    from simulator.config import SimConfig

__all__ = [
    "EVAL_HOLDOUT",
    "MIN_TOKENIZER_COVERAGE",
    "DeviceSpec",
    "FleetError",
    "FleetSpec",
    "SharedRuntime",
    "TraceProvider",
    "availability_note",
    "check_tokenizer",
    "eval_holdout",
    "fleet_specs",
    "fleet_users",
    "make_specs",
    "population_specs",
    "run_worker",
    "tokenizer_coverage",
]

log = logging.getLogger(__name__)

EVAL_HOLDOUT = 20
"""Newest messages a device keeps out of training for federated evaluation (at most a fifth
of its messages: :func:`eval_holdout`)."""


def eval_holdout(messages: int, cap: int = EVAL_HOLDOUT) -> int:
    """How many of a device's ``messages`` (its newest) stay out of local training."""
    return min(cap, messages // 5)


@dataclass(frozen=True)
class DeviceSpec:
    index: int
    user: str
    texts: tuple[str, ...]  # the participant's messages, oldest first (they stay in the worker)
    speed: float  # >= 1: local training takes this many times the measured time
    device_class: str


@dataclass(frozen=True)
class FleetSpec:
    """Everything a worker needs to run its devices (picklable for processes and Ray)."""

    coordinator: str
    ca: str
    enroll_secret: str
    seed: int
    day_seconds: float
    start_hour: float
    t0: float
    dropout: float  # probability that a selected device vanishes at a random point of a round
    round_seconds: float  # a round's length until measured (drop-outs fall uniformly within it)
    stop_after: float  # real seconds
    state_root: str
    noop_training: bool = False  # skip training (measures coordinator/protocol overhead)
    min_examples: int = 20
    stop_file: str = ""  # the run ends when this file exists
    # or when this Ray actor (StopFlag) is set: a cluster's other machines do not see the file
    stop_flag: Any = None
    start_spread: float = 0.0  # seconds over which the worker starts its devices
    # the worker process's stderr (the runtime's native lines, device warnings, fatal stacks)
    # goes to a file here unless FEDKEYS_NATIVE_LOGS=1 (edge_client.native); "" keeps it
    log_dir: str = ""


class StopFlag:
    """The end of a run, told to workers on any machine of a Ray cluster (as a Ray actor)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


class TraceProvider:
    """Device conditions from the availability trace on the compressed clock, plus drop-outs:
    ``vanish(seconds)`` makes the device ineligible (unplugged) for a while."""

    def __init__(self, trace: Any, clock: Any) -> None:
        from edge_client.device_state import Conditions

        self.trace, self.clock = trace, clock
        self._until = 0.0
        self._on = Conditions(True, True, True, 90.0, 8000.0, "trace")
        self._off = Conditions(False, False, True, 60.0, 8000.0, "trace")

    def vanish(self, seconds: float) -> None:
        self._until = time.time() + seconds

    def read(self) -> Any:
        now = time.time()
        if now < self._until:
            return self._off
        return self._on if self.trace.eligible(self.clock.sim_seconds(now)) else self._off


class SharedRuntime:
    """One training program and predictor per worker process, used under a lock, and one copy
    of each model bundle: the devices of a worker stand for separate phones, but fetching and
    unpacking the same 30 MB bundle once per simulated device would only measure this machine's
    loopback (a real fleet downloads it once per device, outside any round's deadline). Round
    weights are still downloaded by every device."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._trainer: tuple[str, Any] | None = None
        self._predictors: dict[str, Any] = {}
        self._bundles: dict[str, Any] = {}
        self._bundle_lock = threading.Lock()
        self.weights = SharedWeights()
        # how long this worker's devices took over their recent rounds (selected to done):
        # drop-outs fall uniformly within it, so they hit every stage however long rounds are
        self.round_spans: deque[float] = deque(maxlen=64)

    def typical_round(self, default: float) -> float:
        """Median span of the recent completed rounds (``default`` before the first)."""
        return float(statistics.median(self.round_spans)) if self.round_spans else default

    def bundle(self, plan: Any, fetch: Any) -> Any:
        """The plan's bundle: fetched by the first device of the worker that needs it."""
        sha = plan.bundle.sha256
        with self._bundle_lock:
            got = self._bundles.get(sha)
            if got is None:
                got = self._bundles[sha] = fetch(plan)
            return got

    def bundle_weights(self, plan: Any, fetch: Any) -> tuple[int, Any]:
        """The weights the plan's bundle ships with, read once per worker (read-only: each
        device keeps its own copy in its weights cache, as a phone would)."""
        bundle = self.bundle(plan, fetch)
        key = f"weights:{plan.bundle.sha256}"
        with self._bundle_lock:
            got = self._bundles.get(key)
            if got is None:
                vec = bundle.initial_weights()
                vec.setflags(write=False)
                got = self._bundles[key] = (bundle.manifest.model_version, vec)
            return got

    def trainer(self, bundle: Any) -> Any:
        from edge_client.runtime import Trainer

        key = bundle.root.name
        if self._trainer is None or self._trainer[0] != key:
            self._trainer = (key, Trainer.from_bundle(bundle))
        return self._trainer[1]


class SharedWeights:
    """One copy of each global weight vector for the devices of a worker process.

    Every device still downloads its round's weights (an XOR delta from the version it holds)
    and decodes and checks them itself; only the decoded vector, identical for all devices at
    that version, is kept once (weakly: a version goes when no device holds it). Per-device
    files (as ``fedkeys client run`` keeps) would write 10 MB per selected device and round to
    this machine's disk: 1.3 GB a round for a 1,000-device fleet, measuring the host's disk
    rather than the protocol."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vectors: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._digests: dict[tuple[int, int], tuple[Any, str]] = {}  # the bundle's vectors

    def intern(self, sha: str, vec: Any) -> Any:
        with self._lock:
            got = self._vectors.get(sha)
            if got is None:
                self._vectors[sha] = got = vec
            return got

    def digest(self, vec: Any, compute: Any) -> str:
        """sha256 of a read-only vector the runtime shares (the bundle's weights): once."""
        if vec.flags.writeable:
            return str(compute(vec))
        key = (vec.__array_interface__["data"][0], vec.shape[0])
        with self._lock:
            hit = self._digests.get(key)
            if hit is None:  # the entry holds the vector: its memory cannot be reused meanwhile
                hit = self._digests[key] = (vec, str(compute(vec)))
            return hit[1]


def fleet_weights_cache(shared: SharedWeights) -> Any:
    """A device's :class:`edge_client.weights_cache.WeightsCache` (in memory) whose vectors are
    the worker's shared copies."""
    from edge_client.weights_cache import WeightsCache

    class FleetWeightsCache(WeightsCache):
        def _intern(self, sha: str, vec: Any) -> Any:
            return shared.intern(sha, vec)

        def _digest(self, vec: Any) -> str:
            return shared.digest(vec, super()._digest)

    return FleetWeightsCache()


class FleetError(ValueError):
    """A corpus or bundle the simulator cannot make a fleet of: one line that says why."""


def fleet_users(corpus: str | Path | None = None) -> dict[str, list[str]]:
    """The messages of every participant of the corpus's federated split, by user (oldest
    first): the people the simulated devices stand for. ``corpus`` as
    ``model_export.data.load_corpus`` takes it (None: chitchat); the split is the exporter's
    (``split_corpus``), so the heldout participants are never in a fleet."""
    from model_export.data import load_corpus, split_corpus

    parts = split_corpus(load_corpus(corpus))
    fed = parts["federated"]
    if not fed:
        total = sum(len(p) for p in parts.values())
        raise FleetError(
            f"{corpus or 'chitchat'}: none of its {total} participants falls in the federated split "
            "(about 80% of user ids do): a fleet needs more participants"
        )
    return {u: [m.text for m in msgs] for u, msgs in fed.items()}


_DEVICE_CLASSES = ("phone", "phone", "phone", "tablet", "rpi")


def _device(i: int, user: str, texts: list[str], rng: random.Random, speed_sigma: float) -> DeviceSpec:
    speed = max(1.0, math.exp(rng.gauss(0.3, speed_sigma)))
    return DeviceSpec(i, user, tuple(texts), speed, _DEVICE_CLASSES[i % len(_DEVICE_CLASSES)])


def make_specs(users: dict[str, list[str]], n: int, seed: int, speed_sigma: float = 0.5) -> list[DeviceSpec]:
    """``n`` devices from the users with the most messages-per-seed draw (real, skewed sizes):
    users are sampled uniformly among those with at least 25 messages (473 of them in the
    federated split; beyond that a person has several devices); speeds are log-normal
    (``exp(N(0.3, speed_sigma))``, at least 1: with 0.5 the slowest tenth take 2.6x as long, with
    1.0 about 5x, closer to the spread of phone compute speeds in FedScale's traces)."""
    rng = random.Random(seed)
    eligible = sorted(u for u, t in users.items() if len(t) >= 25)
    if not eligible:
        raise FleetError("no participant has 25 messages or more: use --population for small corpora")
    chosen = rng.sample(eligible, min(n, len(eligible)))
    while len(chosen) < n:  # larger fleets than participants: several devices per person
        chosen += rng.sample(eligible, min(n - len(chosen), len(eligible)))
    if n > len(eligible):
        log.warning("%d devices from %d participants: some people have several devices", n, len(eligible))
    return [_device(i, user, users[user], rng, speed_sigma) for i, user in enumerate(chosen)]


def population_specs(users: dict[str, list[str]], seed: int, speed_sigma: float = 0.5) -> list[DeviceSpec]:
    """One device per participant, each with all of its messages, in a seeded order (workers
    take every n-th device, so heavy and light devices mix across workers); speeds and device
    classes as :func:`make_specs` draws them. Devices with fewer messages than the task's
    ``min_examples`` are in the fleet but never volunteer, as such phones would not."""
    rng = random.Random(seed)
    order = sorted(users)
    rng.shuffle(order)
    return [_device(i, user, users[user], rng, speed_sigma) for i, user in enumerate(order)]


def fleet_specs(cfg: SimConfig) -> list[DeviceSpec]:
    """The devices of a run: every federated participant of ``cfg.corpus`` with
    ``cfg.population``, else ``cfg.devices`` drawn by :func:`make_specs`."""
    users = fleet_users(cfg.corpus)
    if cfg.population:
        return population_specs(users, cfg.seed, cfg.speed_sigma)
    return make_specs(users, cfg.devices, cfg.seed, cfg.speed_sigma)


MIN_TOKENIZER_COVERAGE = 0.5
"""Share of a corpus's characters (spaces aside) that the bundle's tokenizer must spell with
pieces of its own rather than byte-fallback pieces or ``<unk>``. A tokenizer built on the corpus
keeps its most frequent characters (``model_export.tokenizer``: well above this even for a
corpus of thousands of CJK characters); one built on another corpus, in other scripts, falls far
below it, and a model trained on byte spellings it never saw only adds noise."""


def tokenizer_coverage(tokenizer_file: Path, texts: Sequence[str]) -> float:
    """Share of the (normalised) texts' non-space characters that the tokenizer's ordinary
    pieces spell (1.0 for no text)."""
    from edge_client.text import normalize
    from edge_client.tokenizer import WORD_MARK, Tokenizer

    tok = Tokenizer(tokenizer_file)
    covered = total = 0
    for raw in texts:
        text = normalize(raw)
        total += sum(1 for c in text if not c.isspace())
        for i in tok.encode(text):
            if not (tok.sp.is_byte(i) or tok.sp.is_unknown(i) or tok.sp.is_control(i)):
                covered += len(tok.piece(i).replace(WORD_MARK, ""))
    return covered / total if total else 1.0


def check_tokenizer(bundle_dir: Path, users: dict[str, list[str]], sample: int = 2000) -> float:
    """The bundle's :func:`tokenizer_coverage` of a seeded sample of the fleet's messages;
    raises :class:`FleetError` below :data:`MIN_TOKENIZER_COVERAGE`."""
    from protocol.bundle import load_bundle

    texts = [t for u in sorted(users) for t in users[u]]
    if len(texts) > sample:
        texts = random.Random(0).sample(texts, sample)
    bundle = load_bundle(bundle_dir)
    share = tokenizer_coverage(bundle.path(bundle.manifest.tokenizer), texts)
    if share < MIN_TOKENIZER_COVERAGE:
        raise FleetError(
            f"the bundle's tokenizer ({bundle_dir}) has pieces for only {100 * share:.0f}% of this "
            "corpus's characters (the rest are spelled byte by byte): build a bundle for the corpus "
            "with `fedkeys export build --corpus`"
        )
    return share


def availability_note(cfg: SimConfig, ready: Sequence[int]) -> str | None:
    """A plain sentence when the fleet's availability at the run's start cannot fill rounds
    back to back, else None.

    A training round selects ``clients_per_round * over_selection`` devices among those that
    are eligible then (charging, idle, on Wi-Fi: :class:`simulator.availability.DeviceTrace`,
    with enough messages), and its devices sit out the next round (the task's one-round
    cooldown): rounds in a row need about twice that many eligible devices, or every other
    round fails for want of devices. ``ready``: the indices of the devices with enough messages
    to volunteer (``cfg.min_examples``)."""
    from simulator.availability import DeviceTrace, FleetClock

    need = cfg.task_config().selection_size
    start = FleetClock(cfg.day_seconds, cfg.start_hour, 0.0).sim_seconds(0.0)
    eligible = sum(DeviceTrace(cfg.seed, i).eligible(start) for i in ready)
    if eligible >= 2 * need:
        return None
    hour = cfg.start_hour % 24
    return (
        f"at {int(hour):02d}:{int(hour % 1 * 60):02d} (simulated) {eligible} of {cfg.devices} devices are "
        f"eligible (charging, idle, on Wi-Fi, at least {cfg.min_examples} messages); a round selects "
        f"{need} and they sit out the next one, so rounds will fail for want of devices until more "
        "devices charge: start later in the night (--start-hour 1), simulate more devices, or fewer "
        "per round"
    )


@dataclass
class DeviceResult:
    index: int
    rounds: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    error: str = ""
    node: str = ""  # where the device ran: the Ray node id, or host:pid of the worker process


def _device_thread(
    spec: DeviceSpec, fleet: FleetSpec, runtime: SharedRuntime, out: DeviceResult, stop: threading.Event
) -> None:
    import numpy as np

    from edge_client.agent import Agent, AgentConfig
    from edge_client.datastore import DataStore
    from edge_client.participation import LocalResult
    from edge_client.policy import DevicePolicy
    from edge_client.transport import Transport
    from protocol.wire import TrainReport
    from simulator.availability import DeviceTrace, FleetClock

    clock = FleetClock(fleet.day_seconds, fleet.start_hour, fleet.t0)
    provider = TraceProvider(DeviceTrace(fleet.seed, spec.index), clock)
    state = Path(fleet.state_root) / f"device-{spec.index:05d}"
    rng = random.Random(f"{fleet.seed}:{spec.index}")
    store = DataStore(state / "messages.db")
    if store.count() == 0:  # the participant's messages, re-dated into the last weeks
        now = time.time()
        n = len(spec.texts)
        store.add((t, now - (n - i) * 600.0) for i, t in enumerate(spec.texts))
    cfg = AgentConfig(
        coordinator=fleet.coordinator,
        state_dir=state,
        ca=Path(fleet.ca),
        enroll_secret=fleet.enroll_secret,
        device_class=spec.device_class,
        min_examples=fleet.min_examples,
        eval_holdout=eval_holdout(len(spec.texts)),
        # the comparisons run unmasked (float32, compressed without secure aggregation) too;
        # metrics stay rounded as real devices send them
        policy=DevicePolicy(require_secure_aggregation=False),
    )
    transport = Transport(cfg.coordinator, ca=cfg.ca, retries=8, backoff=0.5, max_backoff=10)

    def pause(seconds: float) -> None:
        stop.wait(seconds)

    agent = Agent(cfg, provider, store=store, transport=transport, sleep=pause, rng=rng)
    agent.trainer = runtime.trainer  # type: ignore[method-assign]
    agent.weights = fleet_weights_cache(runtime.weights)
    real_bundle = agent.bundle
    agent.bundle = lambda plan: runtime.bundle(plan, real_bundle)  # type: ignore[method-assign]
    agent.bundle_weights = lambda plan: runtime.bundle_weights(plan, real_bundle)  # type: ignore[method-assign]
    real_train = agent.local_train

    real_round = agent.train_round

    def train_round(round_id: int) -> RoundRecord:
        if rng.random() < fleet.dropout:  # vanish at a random point of this round (any stage)
            at = rng.uniform(0, runtime.typical_round(fleet.round_seconds))
            timer = threading.Timer(at, provider.vanish, args=(120.0,))
            timer.daemon = True
            timer.start()
        rec = real_round(round_id)
        marks = rec.marks or {}
        if rec.completed and "done" in marks and "start" in marks:
            runtime.round_spans.append(marks["done"] - marks["start"])
        return rec

    agent.train_round = train_round  # type: ignore[method-assign]

    def train(plan: Any, weights: Any) -> Any:
        if fleet.noop_training:
            report = TrainReport(loss_before=1.0, loss_after=1.0, examples=10, steps=1, seconds=0.0)
            delta = np.zeros_like(weights)
            return LocalResult(delta, 10, report)
        with runtime.lock:
            t0 = time.time()
            result = real_train(plan, weights)
            took = time.time() - t0
        if spec.speed > 1 and not result.report.aborted:  # a slower phone: it takes longer
            stop.wait(took * (spec.speed - 1))
        return result

    agent.local_train = train  # type: ignore[method-assign]

    def stop_on() -> bool:
        return stop.is_set() or bool(fleet.stop_file and os.path.exists(fleet.stop_file))

    try:
        # a phone with fewer messages than a task asks for never checks in (Agent.step), so it
        # has no reason to enrol yet: half of chitchat's participants, whose enrolments would
        # only add to the coordinator's load at the start of a population run
        if store.count() >= fleet.min_examples:
            agent.enroll()
        end = time.time() + fleet.stop_after
        while not stop_on() and time.time() < end:
            try:
                wait, _ = agent.step()
            except Exception as e:  # a device error must not end the fleet
                log.warning("device %d: %s", spec.index, e)
                wait = 5.0
            stop.wait(min(wait, max(end - time.time(), 0)))
    except Exception as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        agent.close()
    out.rounds = agent.stats.rounds
    out.bytes_up, out.bytes_down = agent.stats.bytes_up, agent.stats.bytes_down


def _log_to_file(log_dir: str) -> None:
    """Point this worker process's stderr (fd 2) at a file in ``log_dir``: what the ExecuTorch
    runtime prints natively (outside the Python capture of ``edge_client.native``), device
    warnings and fatal stacks (faulthandler) stay readable there instead of interleaving with
    the run's console. ``FEDKEYS_NATIVE_LOGS=1`` (``fedkeys simulate --native-logs``) keeps it."""
    import faulthandler

    from edge_client.native import native_logs_shown

    if not log_dir or native_logs_shown():
        return
    root = Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(
        root / f"worker-{socket.gethostname()}-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
    )
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # sys.stderr writes to fd 2: the file


def _where() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(specs: list[DeviceSpec], fleet: FleetSpec) -> list[dict[str, Any]]:
    """Run these devices as threads until ``stop_after`` seconds, the stop file appears or the
    stop flag is set."""
    _log_to_file(fleet.log_dir)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.ERROR)
    from edge_client.native import quiet_python_logs
    from edge_client.runtime import set_threads

    quiet_python_logs()

    set_threads(1)
    runtime = SharedRuntime()
    stop = threading.Event()
    node = _where()
    results = [DeviceResult(s.index, node=node) for s in specs]
    threads = [
        threading.Thread(target=_device_thread, args=(s, fleet, runtime, r, stop), daemon=True)
        for s, r in zip(specs, results, strict=True)
    ]
    gap = fleet.start_spread / len(threads) if threads else 0.0
    for t in threads:  # devices come up over start_spread: enrolments and first check-ins spread
        t.start()
        if fleet.stop_file and os.path.exists(fleet.stop_file):
            stop.set()  # the rest start and end at once
        stop.wait(max(gap, 0.01))
    deadline = time.time() + fleet.stop_after + 5
    flag_checked = 0.0
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        if fleet.stop_file and os.path.exists(fleet.stop_file):
            stop.set()
        if fleet.stop_flag is not None and time.time() - flag_checked >= 1.0:
            import ray

            flag_checked = time.time()
            try:
                if ray.get(fleet.stop_flag.is_set.remote(), timeout=10):
                    stop.set()
            except Exception as e:  # the driver (and its flag) gone: the run is over
                log.warning("stop flag unreachable (%s): stopping", e)
                stop.set()
        if stop.is_set():
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    return [r.__dict__ for r in results]
