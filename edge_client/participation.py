"""One device's part in one round, stage by stage, against the coordinator.

The training itself is a callback, so the same code drives the real agent (ExecuTorch
training on local messages), the simulator's devices and scripted test devices. What leaves
the device: public keys, encrypted shares, the encoded (masked) update and scalar metrics.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_client.errors import Aborted
from edge_client.policy import DevicePolicy, PolicyRefusal, bucket_train_report
from edge_client.transport import ApiError, Transport
from edge_client.weights_cache import WeightsCache
from protocol.codec import encode
from protocol.layout import FloatVec
from protocol.secagg.client import SecAggClient
from protocol.wire import (
    SECURE_ROUND,
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
    "LocalResult",
    "RoundOutcome",
    "TrainFn",
    "drop_codec_caches",
    "run_round",
]

log = logging.getLogger(__name__)


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


def drop_codec_caches() -> None:
    """Forget what the codec cached for the rounds this process encoded (the rotation signs and
    the kept subset: 11 MB per round of the demo model, and a new round has a new seed).

    A device encodes once per round, so nothing of it is used again; processes that encode for
    many devices of the same round (the simulator's) keep the caches instead. The caches are
    the functools caches defined in ``protocol.codec`` and its modules, wherever they sit.
    """
    for name, module in list(sys.modules.items()):
        if name != "protocol.codec" and not name.startswith("protocol.codec."):
            continue
        for obj in list(vars(module).values()):
            clear = getattr(obj, "cache_clear", None)
            if callable(clear) and getattr(obj, "__module__", None) == name:  # defined there
                clear()


def _stage_index(stage: Stage) -> int:
    return SECURE_ROUND.index(stage) if stage in SECURE_ROUND else -1


LONG_POLL = 10.0  # seconds the coordinator may hold one status poll
# After its upload a device waits for the round's other uploads (a minute or more in a
# population round) and checks nothing but a shutdown between polls: longer polls there (the
# coordinator holds one up to 30 s) cut a round's status requests without slowing anything
# but a shutdown at that point.
LONG_POLL_AFTER_UPLOAD = 25.0


def _wait_for(
    transport: Transport,
    round_id: int,
    stage: Stage,
    *,
    sleep: Callable[[float], None],
    should_continue: Callable[[], bool],
    deadline: float,
    longest: float = LONG_POLL,
) -> RoundStatus:
    """Wait until the round reaches ``stage`` (or passes it, or ends): long polls of its
    status, each held by the coordinator until the stage changes or ``longest`` seconds
    pass (eligibility is re-checked between polls). The answer that reports a stage with a
    message for the device carries it (``payload``); a coordinator that leaves it out is
    asked for it by its own route."""
    since: Stage | None = None
    while True:
        asked = time.time()
        hold = 0.0 if since is None else min(longest, max(deadline - asked, 0.0))
        st = transport.status(round_id, since=since, wait=hold, payload=True)
        if st.participant_stage == Stage.DROPPED or st.stage == Stage.DONE:
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
            if st.participant_stage == Stage.DROPPED or st.stage != Stage.SHARE_KEYS:
                return left(f"missed key sharing (round at {st.stage})", st)
            roster = st.roster or transport.roster(round_id)
            transport.share_keys(round_id, secagg.share_keys(roster))
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
                if st.participant_stage == Stage.DROPPED or st.stage != Stage.MASKED_INPUT:
                    return left(f"missed the upload (round at {st.stage})", st)
                values = secagg.masked_input(values, st.shares or transport.inbound_shares(round_id))
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
        report = result.report
        if policy.private_metrics:
            report = bucket_train_report(report, report_rng)
        if secagg is not None:  # the weight travels inside the masked vector: no count in the clear
            transport.upload(round_id, body, 0, omit=secagg.omitted, report=report)
        else:
            transport.upload(round_id, body, result.examples, report=report)
        marks["uploaded"] = time.time()
        # After the upload the device only answers small messages: it stays in the round even
        # if it stops being eligible for training (only a shutdown makes it leave).
        wait["should_continue"] = lambda: not stopping()
        wait["longest"] = LONG_POLL_AFTER_UPLOAD
        if secagg is not None:
            st = _wait_for(transport, round_id, Stage.UNMASK, **wait)  # type: ignore[arg-type]
            if st.participant_stage == Stage.DROPPED or st.stage != Stage.UNMASK:
                return left(f"round moved on before unmasking ({st.stage})", st)
            req = st.unmask or transport.unmask_request(round_id)
            transport.unmask(round_id, secagg.unmask(req.survivors, req.dropped))
            marks["unmasked"] = time.time()
        st = _wait_for(transport, round_id, Stage.DONE, **wait)  # type: ignore[arg-type]
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
