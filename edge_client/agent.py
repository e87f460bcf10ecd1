"""The device agent (``fedkeys client run``): enrol once, check in, take part in rounds.

Loop: read the device state; if there are enough local messages, check in; obey
``retry_after`` (pace steering) or, on errors, back off exponentially with jitter. On a
training assignment: fetch the bundle (cached by sha256) and the round's weights, run the
secure-aggregation stages around local ExecuTorch training on messages drawn at random from
the local store (re-checking eligibility between steps), upload the encoded, masked update,
answer the unmask stage. On an evaluation assignment: score the round's model on recent
messages never trained on and report counts only. SIGTERM (``stop``) ends the loop at the next
safe point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.batching import Batch, encode_messages, epoch_batches
from edge_client.datastore import DataStore
from edge_client.device_state import Conditions, StateProvider
from edge_client.errors import Aborted
from edge_client.memory import peak_rss_mb, release_pages, trim
from edge_client.participation import LocalResult, RoundOutcome, drop_codec_caches, run_round
from edge_client.policy import DevicePolicy, bucket_eval_counts
from edge_client.records import RoundHistory, RoundRecord
from edge_client.transport import ApiError, FileSink, Transport, TransportError
from edge_client.weights_cache import WeightsCache
from protocol.bundle import Bundle, BundleError, extract_bundle, load_bundle
from protocol.layout import FloatVec
from protocol.version import __version__
from protocol.wire import Action, DeviceState, EnrollRequest, EvalCounts, RoundKind, RoundPlan, TrainReport

__all__ = ["CLIENT_VERSION", "Agent", "AgentConfig", "NotEnrolled"]

log = logging.getLogger(__name__)

CLIENT_VERSION = __version__  # what check-ins report (the package metadata)


class NotEnrolled(Exception):
    """No token yet and no enrolment secret to get one."""


def _platform_name() -> str:
    return f"{platform.system()}-{platform.machine()}".lower()


@dataclass
class AgentConfig:
    coordinator: str
    state_dir: Path
    ca: Path | None = None
    enroll_secret: str | None = None
    device_class: str = "unknown"
    min_examples: int = 20  # fewer local messages: the device does not volunteer
    eval_holdout: int = 20  # newest messages kept out of training (for federated evaluation)
    max_backoff: float = 900.0
    # seconds (jittered) before checking in again when assigned a round this device already left
    left_round_wait: float = 10.0
    threads: int = 1  # ExecuTorch threadpool size
    # Keep train.pte loaded between rounds: saves reloading it (a fraction of a second) but
    # keeps its planned memory (45 MB for the demo student) resident while the device idles
    # and while it encodes and uploads.
    keep_program: bool = False
    # Forget the codec's cached per-round randomness after each round (11 MB per round for the
    # demo model; the codec keeps two rounds). Off where one process encodes for many devices.
    drop_codec_caches: bool = False
    # Download new global weights as XOR deltas from the held version (fewer bytes; decoding
    # one holds about 50 MB of temporaries for the demo model) or whole (streamed to disk).
    weight_deltas: bool = True
    platform: str = field(default_factory=_platform_name)
    # What this device lets leave it whatever a plan asks (strict for real devices)
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    # plain http to the coordinator (a loopback lab only: the token would travel in clear text)
    allow_http: bool = False


@dataclass
class AgentStats:
    rounds: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        provider: StateProvider,
        *,
        store: DataStore | None = None,
        transport: Transport | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        # owner-only: the token, the local messages and the weights live here
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg.state_dir.chmod(0o700)
        self.store = store or DataStore(cfg.state_dir / "messages.db")
        self._stop = threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self.stats = AgentStats()
        self.transport = transport or Transport(
            cfg.coordinator,
            ca=cfg.ca,
            token=self._load_token(),
            sleep=self._sleep,
            on_bytes=self._count,
            allow_http=cfg.allow_http,
        )
        if self.transport.on_bytes is None:
            self.transport.on_bytes = self._count
        self.rng = rng or random.Random()
        self.weights = WeightsCache(directory=cfg.state_dir / "weights", deltas=cfg.weight_deltas)
        self.history = RoundHistory(cfg.state_dir / "history.jsonl")
        self._bundles: dict[str, Bundle] = {}
        self._attempted: set[int] = set()  # rounds this process already took part in (or left)
        self._finished: set[int] = set()  # of those, rounds it saw end (committed or failed)
        self._trainers: dict[str, Any] = {}
        self._failures = 0
        self.model_version: int | None = None
        self.last_training: TrainReport | None = None  # of the round in progress (history)

    # -- identity -------------------------------------------------------------------------

    @property
    def token_file(self) -> Path:
        return self.cfg.state_dir / "device.json"

    def _load_token(self) -> str | None:
        try:
            return str(json.loads(self.token_file.read_text())["token"])
        except (OSError, ValueError, KeyError):
            return None

    @property
    def device_id(self) -> str | None:
        try:
            return str(json.loads(self.token_file.read_text())["device_id"])
        except (OSError, ValueError, KeyError):
            return None

    def enroll(self, force: bool = False) -> str:
        """Enrol with the fleet secret (once); the token goes to a 0600 file."""
        if self.transport.token and not force and self.device_id:
            return self.device_id
        if not self.cfg.enroll_secret:
            raise NotEnrolled("this device is not enrolled: pass the fleet's enrolment secret")
        r = self.transport.enroll(
            EnrollRequest(
                enrollment_secret=self.cfg.enroll_secret,
                platform=self.cfg.platform[:64],
                client_version=CLIENT_VERSION,
                device_class=self.cfg.device_class,
            )
        )
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"device_id": r.device_id, "token": r.token, "coordinator": self.cfg.coordinator}, f)
        self.transport.token = r.token
        return r.device_id

    # -- main loop ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end at the next safe point (signal handlers call this)."""
        self._stop.set()

    def close(self) -> None:
        """Close the agent's connections to the coordinator (kept alive between requests)."""
        self.transport.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stop.wait(max(seconds, 0.0))

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    def state(self, c: Conditions) -> DeviceState:
        return DeviceState(
            charging=c.charging,
            idle=c.idle,
            unmetered=c.unmetered,
            battery_pct=min(max(c.battery_pct, 0.0), 100.0),
            free_storage_mb=max(c.free_storage_mb, 0.0),
            client_version=CLIENT_VERSION,
            model_version=self.model_version,
            examples=self.store.count(),
            device_class=self.cfg.device_class,
        )

    def run(self, max_rounds: int | None = None, max_seconds: float = math.inf) -> None:
        """Check in until stopped (or until ``max_rounds`` rounds or ``max_seconds`` passed)."""
        self.enroll()
        t0 = time.time()
        done = 0
        while (
            not self.stopped and (max_rounds is None or done < max_rounds) and time.time() - t0 < max_seconds
        ):
            wait, took_part = self.step()
            done += took_part
            if not self.stopped and wait > 0:
                self._sleep(wait)

    def step(self) -> tuple[float, bool]:
        """One check-in (and the round it leads to). Returns (seconds to wait, took part)."""
        c = self.provider.read()
        if self.store.count() < self.cfg.min_examples:
            return 600.0, False
        try:
            r = self.transport.checkin(self.state(c))
        except ApiError as e:
            if e.status == 401 and self.cfg.enroll_secret:
                log.warning("token refused (%s): enrolling again", e.reason)
                self.enroll(force=True)
                return 0.5, False
            raise
        except TransportError as e:
            self._failures += 1
            wait = min(self.cfg.max_backoff, 2.0**self._failures) * (0.5 + self.rng.random())
            log.warning("coordinator unreachable (%s); retrying in %.0f s", e, wait)
            return wait, False
        self._failures = 0
        if r.action == Action.RETRY or r.round_id is None:
            return float(r.retry_after or 60.0), False
        if r.round_id in self._attempted:
            # The coordinator still counts this device in a round it already left (its keys and
            # state for that round are gone): wait for the round to drop it, do not start over.
            # A round the device saw end is only in a coordinator's round view that predates
            # the end (refreshed within a second): ask again soon, the next round may be
            # selecting.
            wait = 1.0 if r.round_id in self._finished else self.cfg.left_round_wait
            return wait * (0.5 + self.rng.random()), False
        self._attempted.add(r.round_id)
        record = self.train_round(r.round_id) if r.action == Action.TRAIN else self.eval_round(r.round_id)
        if record.outcome is not None:
            self._finished.add(r.round_id)
        if self.cfg.drop_codec_caches:
            drop_codec_caches()
        trim()  # the round's large temporaries are gone: give their pages back
        record.peak_rss_mb = round(peak_rss_mb(), 1)  # of the process so far (NaN without /proc)
        self.stats.rounds.append(record)
        self.history.append(record)
        return 0.0, True

    # -- rounds ---------------------------------------------------------------------------

    def bundle(self, plan: RoundPlan) -> Bundle:
        sha = plan.bundle.sha256
        if sha in self._bundles:
            return self._bundles[sha]
        root = self.cfg.state_dir / "bundles" / sha
        try:
            b = load_bundle(root)
        except BundleError:
            # streamed to disk, hashed on the way, cut off past its declared size
            sink = FileSink(root.with_suffix(".tar"), limit=plan.bundle.size)
            try:
                self.transport.fetch(plan.bundle, sink)
                sink.close()
                b = extract_bundle(sink.tmp, root)
            except ValueError as e:
                raise Aborted(f"downloaded bundle: {e}") from None
            finally:
                sink.discard()
        if b.manifest.train.layout.hash() != plan.layout_hash:
            raise Aborted("the bundle's layout does not match the round's")
        self._bundles[sha] = b
        return b

    def trainer(self, bundle: Bundle) -> Any:
        from edge_client.runtime import Trainer, set_threads

        key = bundle.root.name
        if key not in self._trainers:
            self.release_trainer()  # one program in memory at a time
            set_threads(self.cfg.threads)
            self._trainers = {key: Trainer.from_bundle(bundle)}
        return self._trainers[key]

    def release_trainer(self) -> None:
        """Unload the training program (and its planned memory); the next round reloads it."""
        for t in self._trainers.values():
            t.close()
        self._trainers = {}

    def local_train(self, plan: RoundPlan, weights: FloatVec) -> LocalResult:
        """Local ExecuTorch training on this device's messages (never sent anywhere).

        The round draws ``max_examples`` messages uniformly at random from the store (the
        newest ``eval_holdout``, kept for evaluation, excepted) and makes ``local_epochs``
        passes over them, at most ``local_steps`` steps: a device with little data does little
        work, one with much data stops at the cap. The update's example count is the number of
        distinct messages its steps trained on (its weight is that, capped by the codec)."""
        from edge_client.runtime import OptimizerConfig
        from edge_client.tokenizer import Tokenizer

        assert plan.training is not None
        t = plan.training
        bundle = self.bundle(plan)
        trainer = self.trainer(bundle)
        msgs = self.store.training_sample(t.max_examples, self.cfg.eval_holdout, self.rng)
        if not msgs:
            raise Aborted("no local messages to train on")
        spec = bundle.manifest.train
        tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
        seqs: list[Any] = []
        owners: list[int] = []  # the message each sequence (a window of it) comes from
        for i, m in enumerate(msgs):
            for seq in encode_messages(tok, [m.text], spec.seq_len):
                seqs.append(seq)
                owners.append(i)
        held: list[list[int]] = []  # the sequences of each batch handed to the trainer

        def batches() -> Iterator[Batch]:
            rng = np.random.default_rng(self.rng.randrange(1 << 30))
            for batch, idx in epoch_batches(seqs, spec.batch_size, spec.seq_len, rng, t.local_epochs):
                held.append(idx)
                yield batch

        # the global vector is read from its file, never resident as a whole
        trainer.set_weights(self.weights.file(plan.weights.sha256) or weights)
        stats = trainer.train(
            batches(),
            OptimizerConfig(name=t.optimizer, lr=t.lr, momentum=t.momentum),
            max_steps=t.local_steps,
            max_seconds=t.max_seconds,
            should_continue=lambda: self.provider.read().eligible and not self.stopped,
        )
        report = TrainReport(
            loss_before=stats.first_loss if math.isfinite(stats.first_loss) else 0.0,
            loss_after=stats.last_loss if math.isfinite(stats.last_loss) else 0.0,
            examples=stats.examples,
            steps=stats.steps,
            seconds=stats.seconds,
            aborted=stats.aborted,
        )
        self.last_training = report
        if stats.aborted or stats.steps == 0:
            if not self.cfg.keep_program:
                self.release_trainer()
            return LocalResult(np.zeros_like(weights), 0, report.model_copy(update={"aborted": True}))
        # the trainer may have drawn one batch past its last step: only the stepped ones count
        trained = sorted({owners[j] for idx in held[: stats.steps] for j in idx})
        self.store.mark_trained(msgs[i].id for i in trained)
        delta = None
        if not self.cfg.keep_program and any(t is trainer for t in self._trainers.values()):
            # Encoding, masking and uploading do not need the program: free its memory before
            # the delta exists. The local weights wait on disk meanwhile (they never leave it).
            spill = self.cfg.state_dir / "local-weights.f32"
            try:
                trainer.save_weights(spill)
            except OSError as e:  # no room on disk: keep the program until the delta exists
                log.warning("cannot write %s (%s): computing the delta in memory", spill, e)
            else:
                self.release_trainer()  # closes the trainer: frees the program's memory
                delta = np.fromfile(spill, dtype="<f4").astype(np.float32, copy=False)
            finally:
                spill.unlink(missing_ok=True)
        if delta is None:
            delta = trainer.get_weights()
            if not self.cfg.keep_program:
                self.release_trainer()
        delta -= weights  # in place: the delta is the only vector this round allocates
        release_pages(weights)
        return LocalResult(delta, len(trained), report)

    def bundle_weights(self, plan: RoundPlan) -> tuple[int, FloatVec]:
        """The weights the round's bundle ships with (configuration fetches the bundle first:
        a device new to the task then downloads a delta from them, not the whole vector)."""
        b = self.bundle(plan)
        return b.manifest.model_version, b.initial_weights()

    def train_round(self, round_id: int) -> RoundRecord:
        up, down = self.stats.bytes_up, self.stats.bytes_down
        record = self._train_round(round_id)
        record.bytes_up = self.stats.bytes_up - up
        record.bytes_down = self.stats.bytes_down - down
        return record

    def _train_round(self, round_id: int) -> RoundRecord:
        device = self.device_id or ""
        self.last_training = None
        try:
            out: RoundOutcome = run_round(
                self.transport,
                device,
                round_id,
                self.local_train,
                weights_cache=self.weights,
                bundle_weights=self.bundle_weights,
                sleep=self._sleep,
                should_continue=lambda: not self.stopped and self.provider.read().eligible,
                stopping=lambda: self.stopped,
                policy=self.cfg.policy,
                report_rng=self.rng,
            )
        except Aborted as e:
            log.info("round %d: left (%s)", round_id, e)
            return RoundRecord(round_id, RoundKind.TRAIN, completed=False, reason=str(e))
        except (ApiError, TransportError) as e:
            # a refusal after a coordinator restart (the round failed or moved on meanwhile) or a
            # coordinator still unreachable after the transport's retries: leave the round
            # cleanly and go back to checking in (evaluation rounds leave on refusals too)
            log.warning("round %d: left after a coordinator error (%s)", round_id, e)
            return RoundRecord(round_id, RoundKind.TRAIN, completed=False, reason=str(e))
        except Exception as e:
            # A message that breaks the protocol (a neighbour's bad share or key, a roster below
            # the safety floors, an unsafe URL, a malformed answer) ends this round for this
            # device, never the agent: the next check-in starts afresh.
            log.warning("round %d: left after a protocol error", round_id, exc_info=True)
            return RoundRecord(round_id, RoundKind.TRAIN, completed=False, reason=f"protocol error: {e}")
        if out.new_version is not None:
            self.model_version = out.new_version
        return RoundRecord(
            round_id,
            RoundKind.TRAIN,
            completed=out.completed,
            reason=out.reason,
            outcome=out.outcome,
            new_version=out.new_version,
            seconds=out.stage_seconds,
            marks=out.marks,
            training=self.last_training,
        )

    def predictor_for(self, plan: RoundPlan) -> Any:
        """The predictor of ``plan.model_version`` (its published predict.pte, cached)."""
        from edge_client.runtime import Predictor

        bundle = self.bundle(plan)
        program = None
        if plan.predict is not None:
            program = self.cfg.state_dir / "programs" / f"{plan.predict.sha256}.pte"
            if not program.exists():
                sink = FileSink(program, limit=plan.predict.size)
                try:
                    self.transport.fetch(plan.predict, sink)
                    sink.commit()
                except ValueError as e:
                    raise Aborted(f"downloaded predict.pte: {e}") from None
                finally:
                    sink.discard()
        return Predictor.from_bundle(bundle, program)

    def eval_round(self, round_id: int) -> RoundRecord:
        from edge_client.evaluation import evaluate_messages

        try:
            plan = self.transport.plan(round_id)
            predictor = self.predictor_for(plan)
            msgs = self.store.evaluation_texts(self.cfg.eval_holdout)
            counts: EvalCounts = evaluate_messages(predictor, [m.text for m in msgs])
            if self.cfg.policy.private_metrics:
                counts = bucket_eval_counts(counts, self.rng)
            self.transport.evaluation(round_id, counts)
        except (Aborted, ApiError, TransportError) as e:
            return RoundRecord(round_id, RoundKind.EVALUATE, completed=False, reason=str(e))
        except Exception as e:  # as for training rounds: the round ends, the agent goes on
            log.warning("round %d: left the evaluation after an error", round_id, exc_info=True)
            return RoundRecord(round_id, RoundKind.EVALUATE, completed=False, reason=f"error: {e}")
        return RoundRecord(round_id, RoundKind.EVALUATE, completed=True, words=counts.words)

    def status(self) -> dict[str, Any]:
        c = self.provider.read()
        return {
            "coordinator": self.cfg.coordinator,
            "device_id": self.device_id,
            "enrolled": self.transport.token is not None,
            "conditions": {
                "charging": c.charging,
                "idle": c.idle,
                "unmetered": c.unmetered,
                "battery_pct": c.battery_pct,
                "source": c.source,
                "notes": list(c.notes),
            },
            "local_data": self.store.counts(),
            "recent_rounds": self.history.recent(10),
        }
