"""One device's part in one round, stage by stage, against the coordinator.

The training itself is a callback, so the same code drives the real agent (ExecuTorch
training on local messages), the simulator's devices and scripted test devices. What leaves
the device: public keys, encrypted shares, the encoded (masked) update and scalar metrics.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_client.memory import release_pages
from edge_client.policy import DevicePolicy, PolicyRefusal, bucket_train_report
from edge_client.transport import ApiError, ArraySink, FileSink, Transport
from protocol.bundle import sha256_file
from protocol.codec import encode
from protocol.delta import DeltaError, XorUndelta
from protocol.layout import FloatVec
from protocol.secagg.client import SecAggClient
from protocol.wire import (
    RoundPlan,
    RoundStatus,
    Stage,
    TrainReport,
    UpdateHeader,
    UpdateKind,
    pack_dense_update,
    pack_update,
)

__all__ = [
    "Aborted",
    "LocalResult",
    "RoundOutcome",
    "TrainFn",
    "WeightsCache",
    "drop_codec_caches",
    "run_round",
]

log = logging.getLogger(__name__)

_ORDER = [
    "selecting",
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.UNMASK,
    "aggregating",
    "done",
]


class Aborted(Exception):
    """The device stopped taking part (no longer eligible, shutting down, dropped)."""


@dataclass
class LocalResult:
    """What local training produced: the new weights' delta and scalar metrics only."""

    delta: FloatVec
    examples: int
    report: TrainReport


class TrainFn(Protocol):
    def __call__(self, plan: RoundPlan, weights: FloatVec) -> LocalResult: ...


@dataclass
class RoundOutcome:
    round_id: int
    completed: bool  # the device did every stage it was asked to
    outcome: str | None  # the round's: committed | failed | None (unknown, device left)
    new_version: int | None
    reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # wall-clock time (epoch seconds) of the start and of each step's end: plan, advertised, shared,
    # weights, trained, uploaded, unmasked, done (for the simulator's latency breakdowns)
    marks: dict[str, float] = field(default_factory=dict)


_FILE_RE = re.compile(r"^v(\d+)-([0-9a-f]{64})\.f32$")


class WeightsCache:
    """Global weight vectors by sha256; downloads deltas from a held version when it can.

    Vectors are read-only. Without ``directory`` they are held in memory (simulated devices).
    With it, each vector is a file there (``v<version>-<sha256>.f32``, streamed to disk as it
    downloads) and :meth:`get` returns a read-only memory map of it: a device holds no private
    copy of the global weights, only the pages it is reading (see :func:`release_pages`), and
    the cache survives restarts. ``deltas=False`` always downloads whole vectors: more bytes,
    but no decoding temporaries (an XOR delta decodes into a new vector as it arrives).
    """

    def __init__(self, max_items: int = 2, directory: Path | None = None, *, deltas: bool = True) -> None:
        self.max_items = max_items
        self.directory = directory
        self.deltas = deltas  # ask for XOR deltas against a held older version
        self._by_sha: dict[str, tuple[int, FloatVec]] = {}
        self._files: dict[str, tuple[int, Path]] = {}
        if directory is not None and directory.is_dir():
            for f in directory.iterdir():
                m = _FILE_RE.match(f.name)
                if m:
                    self._files[m.group(2)] = (int(m.group(1)), f)
                elif f.name.endswith(".part"):
                    f.unlink(missing_ok=True)

    def _held(self) -> list[tuple[int, str]]:
        if self.directory is None:
            return [(v, sha) for sha, (v, _) in self._by_sha.items()]
        return [(v, sha) for sha, (v, _) in self._files.items()]

    def _load(self, sha: str) -> FloatVec | None:
        if self.directory is None:
            hit = self._by_sha.get(sha)
            return None if hit is None else hit[1]
        if sha not in self._files:
            return None
        version, path = self._files[sha]
        if sha not in self._by_sha:  # first use in this process: check the file once
            if sha256_file(path) != sha:
                log.warning("cached weights %s are corrupt; fetching them again", path.name)
                path.unlink(missing_ok=True)
                del self._files[sha]
                return None
            self._by_sha[sha] = (version, _map(path))
        return self._by_sha[sha][1]

    def file(self, sha: str) -> Path | None:
        """The file holding the vector ``sha`` (directory mode, once it is held), else None."""
        hit = self._files.get(sha) if self.directory is not None else None
        return None if hit is None else hit[1]

    def _digest(self, vec: FloatVec) -> str:
        return hashlib.sha256(vec.data).hexdigest()

    def _intern(self, sha: str, vec: FloatVec) -> FloatVec:
        """The vector to keep for ``sha`` in memory mode (a hook: simulated devices of one
        process share one copy of each version)."""
        return vec

    def _store(self, sha: str, version: int, vec: FloatVec) -> FloatVec:
        """Keep a vector that is not yet on disk (memory mode, or a delta-decoded vector)."""
        if self.directory is None:
            vec.setflags(write=False)
            self._by_sha[sha] = (version, self._intern(sha, vec))
        else:
            path = self.directory / f"v{version}-{sha}.f32"
            tmp = path.with_name(f".{path.name}.part")
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                vec.astype("<f4", copy=False).tofile(f)
            tmp.replace(path)
            self._files[sha] = (version, path)
            self._by_sha[sha] = (version, _map(path))
        self._evict()
        return self._by_sha[sha][1]

    def _evict(self) -> None:
        while len(self._held()) > self.max_items:
            _, sha = min(self._held())
            self._by_sha.pop(sha, None)
            if self.directory is not None:
                self._files.pop(sha)[1].unlink(missing_ok=True)

    def get(
        self,
        transport: Transport,
        plan: RoundPlan,
        bundle_weights: Callable[[], tuple[int, FloatVec]] | None = None,
    ) -> FloatVec:
        """The plan's global weights. ``bundle_weights`` gives the (version, vector) the model
        bundle ships with: a device that holds no version yet starts from it, so its first
        round downloads a delta (or nothing, while the task is still at that version)."""
        sha = plan.weights.sha256
        hit = self._load(sha)
        if hit is not None:
            return hit
        if bundle_weights is not None and not self._held():
            version, vec = bundle_weights()
            vec = np.ascontiguousarray(vec, dtype="<f4")
            if vec.shape[0] * 4 == plan.weights.size and version <= plan.model_version:
                digest = self._digest(vec)
                stored = self._store(digest, version, vec)
                if digest == sha:
                    return stored
            del vec
        held = sorted(self._held(), key=lambda x: -x[0])
        if self.deltas and held and held[0][0] < plan.model_version:
            base_version, base_sha = held[0]
            base = self._load(base_sha)
            try:
                if base is None:
                    raise DeltaError("the held base vector is gone")
                decoder = XorUndelta(base)  # decodes as the delta arrives: never held whole
                transport.download_to(plan.weights.url, decoder, params={"base": base_version})
                candidate = decoder.finish()
                del decoder
                release_pages(base)
            except (DeltaError, ApiError) as e:
                log.info("delta download failed (%s); fetching the whole vector", e)
            else:
                if hashlib.sha256(candidate.astype("<f4", copy=False).data).hexdigest() == sha:
                    return self._store(sha, plan.model_version, candidate)
        if self.directory is None:
            buf = ArraySink(plan.weights.size)
            try:
                transport.download_to(plan.weights.url, buf)
            except ValueError as e:  # longer than announced
                raise Aborted(f"downloaded weights: {e}") from None
            if buf.size != plan.weights.size or buf.size % 4 or buf.hexdigest() != sha:
                raise Aborted("downloaded weights do not match their sha256")
            return self._store(sha, plan.model_version, buf.buffer.view("<f4").astype(np.float32, copy=False))
        path = self.directory / f"v{plan.model_version}-{sha}.f32"
        sink = FileSink(path, limit=plan.weights.size)  # streamed to disk: never whole in memory
        try:
            transport.download_to(plan.weights.url, sink)
            if sink.size != plan.weights.size or sink.size % 4 or sink.hexdigest() != sha:
                raise Aborted("downloaded weights do not match their size and sha256")
            sink.commit()
        except ValueError as e:  # longer than announced
            raise Aborted(f"downloaded weights: {e}") from None
        finally:
            sink.discard()
        self._files[sha] = (plan.model_version, path)
        self._by_sha[sha] = (plan.model_version, _map(path))
        self._evict()
        return self._by_sha[sha][1]


def _map(path: Path) -> FloatVec:
    """A read-only float32 view of a whole file (memory-mapped: pages load on access)."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            return np.empty(0, dtype=np.float32)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype="<f4").astype(np.float32, copy=False)


def drop_codec_caches() -> None:
    """Forget what the codec cached for the rounds this process encoded (the rotation signs and
    the kept subset: 11 MB per round of the demo model, and a new round has a new seed).

    A device encodes once per round, so nothing of it is used again; processes that encode for
    many devices of the same round (the simulator's) keep the caches instead.
    """
    from protocol import codec

    for obj in vars(codec).values():
        clear = getattr(obj, "cache_clear", None)  # the functools caches of the module
        if callable(clear):
            clear()


def _stage_index(stage: str) -> int:
    return _ORDER.index(stage) if stage in _ORDER else -1


LONG_POLL = 10.0  # seconds the coordinator may hold one status poll


def _wait_for(
    transport: Transport,
    round_id: int,
    stage: str,
    *,
    sleep: Callable[[float], None],
    should_continue: Callable[[], bool],
    deadline: float,
) -> RoundStatus:
    """Wait until the round reaches ``stage`` (or passes it, or ends): long polls of its
    status, each held by the coordinator until the stage changes or ``LONG_POLL`` seconds
    pass (eligibility is re-checked between polls)."""
    since: str | None = None
    while True:
        asked = time.time()
        hold = 0.0 if since is None else min(LONG_POLL, max(deadline - asked, 0.0))
        st = transport.status(round_id, since=since, wait=hold)
        if st.participant_stage == "dropped" or st.stage == "done":
            return st
        if st.stage == stage or _stage_index(st.stage) > _stage_index(stage) >= 0:
            return st
        if not should_continue():
            raise Aborted("device stopped while waiting for the round")
        if time.time() > deadline:
            raise Aborted(f"round {round_id} did not reach {stage} in time")
        answered_at_once = since is not None and time.time() - asked < 0.5 * hold
        since = st.stage
        if answered_at_once:  # a coordinator that does not hold polls: keep to its pace
            sleep(max(st.retry_after, 0.05))


def run_round(
    transport: Transport,
    device_id: str,
    round_id: int,
    train: TrainFn,
    *,
    weights_cache: WeightsCache | None = None,
    bundle_weights: Callable[[RoundPlan], tuple[int, FloatVec]] | None = None,
    rng: np.random.Generator | None = None,
    sleep: Callable[[float], None] = time.sleep,
    should_continue: Callable[[], bool] = lambda: True,
    stopping: Callable[[], bool] = lambda: False,
    max_wait: float = 3600.0,
    policy: DevicePolicy,
    report_rng: random.Random | None = None,
) -> RoundOutcome:
    """Take part in a training round from plan to result. Network faults are retried by the
    transport; a stage the device missed ends its part cleanly (the round goes on without it).
    ``bundle_weights(plan)`` gives the weights the plan's bundle ships with (see
    :meth:`WeightsCache.get`). ``policy`` is checked against the plan before anything is sent
    (:class:`Aborted` on a refusal) and decides how the training report is rounded."""
    rng = rng or np.random.default_rng()
    report_rng = report_rng or random.Random()
    cache = weights_cache or WeightsCache()
    t0 = time.time()
    deadline = t0 + max_wait
    times: dict[str, float] = {}
    marks: dict[str, float] = {"start": t0}
    plan = transport.plan(round_id)
    try:
        policy.check_plan(plan)
    except PolicyRefusal as e:
        raise Aborted(str(e)) from None
    marks["plan"] = time.time()
    secagg: SecAggClient | None = None
    wait = {"sleep": sleep, "should_continue": should_continue, "deadline": deadline}

    def left(reason: str, st: RoundStatus | None = None) -> RoundOutcome:
        return RoundOutcome(
            round_id,
            False,
            st.outcome if st else None,
            st.new_version if st else None,
            reason,
            times,
            marks,
        )

    try:
        if plan.secagg is not None:
            t = time.time()
            secagg = SecAggClient(device_id, plan.secagg)
            transport.advertise(round_id, secagg.advertise_keys())
            marks["advertised"] = time.time()
            st = _wait_for(transport, round_id, Stage.SHARE_KEYS, **wait)  # type: ignore[arg-type]
            if st.participant_stage == "dropped" or st.stage != Stage.SHARE_KEYS:
                return left(f"missed key sharing (round at {st.stage})", st)
            transport.share_keys(round_id, secagg.share_keys(transport.roster(round_id)))
            marks["shared"] = time.time()
            times["key_setup"] = marks["shared"] - t
        # The weights are needed only for training: fetched after the key-agreement stages,
        # whose short deadlines a 10 MB download (or an XOR-delta decode) would eat into.
        t = time.time()
        weights = cache.get(transport, plan, None if bundle_weights is None else lambda: bundle_weights(plan))
        marks["weights"] = time.time()
        times["download"] = marks["weights"] - t
        if not should_continue():
            raise Aborted("no longer eligible before training")
        t = time.time()
        result = train(plan, weights)
        marks["trained"] = time.time()
        times["train"] = marks["trained"] - t
        if result.report.aborted:
            raise Aborted("training aborted: device no longer eligible")
        t = time.time()
        header_common = {
            "round_id": round_id,
            "layout_hash": plan.layout_hash,
            "dim": int(weights.shape[0]),
        }
        if plan.codec is not None:
            enc = encode(result.delta, plan.codec, rng, num_examples=result.examples)
            values: npt.NDArray[np.uint32] = enc.values
            bits = plan.secagg.ring_bits if plan.secagg is not None else _ring_bits(plan)
            if secagg is not None:
                st = _wait_for(transport, round_id, Stage.MASKED_INPUT, **wait)  # type: ignore[arg-type]
                if st.participant_stage == "dropped" or st.stage != Stage.MASKED_INPUT:
                    return left(f"missed the upload (round at {st.stage})", st)
                values = secagg.masked_input(values, transport.inbound_shares(round_id))
            header = UpdateHeader(
                kind=UpdateKind.RING,
                bits=bits,
                keep_fraction=plan.codec.keep_fraction,
                length=len(values),
                **header_common,
            )
            body = pack_update(header, values)
        else:
            header = UpdateHeader(
                kind=UpdateKind.DENSE_F32,
                bits=32,
                keep_fraction=1.0,
                length=len(result.delta),
                **header_common,
            )
            body = pack_dense_update(header, result.delta)
        times["encode"] = time.time() - t
        if secagg is not None:  # the weight travels inside the masked vector: no count in the clear
            transport.upload(round_id, body, 0, omit=secagg.omitted)
        else:
            transport.upload(round_id, body, result.examples)
        report = result.report
        if policy.private_metrics:
            report = bucket_train_report(report, report_rng)
        transport.report(round_id, report)
        marks["uploaded"] = time.time()
        # After the upload the device only answers small messages: it stays in the round even
        # if it stops being eligible for training (only a shutdown makes it leave).
        wait["should_continue"] = lambda: not stopping()
        if secagg is not None:
            st = _wait_for(transport, round_id, Stage.UNMASK, **wait)  # type: ignore[arg-type]
            if st.participant_stage == "dropped" or st.stage != Stage.UNMASK:
                return left(f"round moved on before unmasking ({st.stage})", st)
            req = transport.unmask_request(round_id)
            transport.unmask(round_id, secagg.unmask(req.survivors, req.dropped))
            marks["unmasked"] = time.time()
        st = _wait_for(transport, round_id, "done", **wait)  # type: ignore[arg-type]
        marks["done"] = time.time()
        times["total"] = marks["done"] - t0
        return RoundOutcome(round_id, True, st.outcome, st.new_version, "", times, marks)
    except ApiError as e:
        if e.status in (409, 410):
            return left(f"coordinator: {e.reason}")
        raise


def _ring_bits(plan: RoundPlan) -> int:
    from protocol.codec import ring_bits

    assert plan.codec is not None
    return ring_bits(plan.codec)
