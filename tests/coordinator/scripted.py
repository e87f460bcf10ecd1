"""Scripted devices: the real protocol code (codec, secure aggregation, wire format, HTTPS
transport) driving a real coordinator, with a synthetic update instead of training and the
option to drop out at any stage."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from edge_client.transport import ApiError, Transport
from protocol.codec import encode, ring_bits
from protocol.secagg.client import SecAggClient
from protocol.wire import (
    DeviceState,
    EnrollRequest,
    RoundPlan,
    Stage,
    TrainReport,
    UpdateHeader,
    UpdateKind,
    pack_dense_update,
    pack_update,
)

STAGES = ("advertise", "share", "upload", "unmask")


def ready_state(examples: int = 100) -> DeviceState:
    return DeviceState(
        charging=True,
        idle=True,
        unmetered=True,
        battery_pct=90,
        free_storage_mb=4000,
        client_version="0.1.0",
        examples=examples,
    )


@dataclass
class ScriptedDevice:
    url: str
    ca: str
    secret: str
    delta: np.ndarray
    examples: int = 10
    drop_before: str | None = None  # one of STAGES: the device vanishes before that stage
    retries: int = 3  # transport retries (raise it to ride out a coordinator restart)
    device_id: str = ""
    token: str = ""
    round_id: int | None = None
    uploaded: bool = False
    error: BaseException | None = None
    log: list[str] = field(default_factory=list)

    def transport(self) -> Transport:
        from pathlib import Path

        return Transport(
            self.url,
            ca=Path(self.ca),
            token=self.token or None,
            retries=self.retries,
            backoff=0.2,
            max_backoff=2.0,
            transport=self.http_transport(),
        )

    def http_transport(self) -> httpx.BaseTransport | None:
        """The httpx transport under this device's requests (None: httpx's own)."""
        return None

    def enroll(self) -> None:
        with self.transport() as t:
            r = t.enroll(
                EnrollRequest(enrollment_secret=self.secret, platform="test", client_version="0.1.0")
            )
        self.device_id, self.token = r.device_id, r.token

    def wait_assignment(self, timeout: float = 60) -> int | None:
        """The round this device is assigned to; None once no task needs devices any more
        (the round it hoped to join finished without it)."""
        end = time.time() + timeout
        with self.transport() as t:
            while time.time() < end:
                r = t.checkin(ready_state())
                if r.action == "train" and r.round_id is not None:
                    self.round_id = r.round_id
                    return r.round_id
                if r.reason == "no active task":
                    self.log.append("not selected")
                    return None
                time.sleep(min(r.retry_after or 0.2, 0.5))
        raise TimeoutError("no assignment")

    def _wait(self, t: Transport, stage: str, timeout: float = 60) -> str:
        assert self.round_id is not None
        end = time.time() + timeout
        order = ["selecting", *[s.value for s in Stage], "aggregating", "done"]
        since = None
        while time.time() < end:
            # long polls (held until the stage changes): a hold that outlived the stage change
            # would show in the round's stage durations
            st = t.status(self.round_id, since=since, wait=25.0 if since else 0.0)
            if st.participant_stage == "dropped" or st.stage == "done":
                return "gone"
            if st.stage == stage or (st.stage in order and order.index(st.stage) > order.index(stage)):
                return st.stage
            since = st.stage
        raise TimeoutError(f"stage {stage}")

    def run(self) -> None:
        try:
            self._run()
        except ApiError as e:
            if e.status in (409, 410):  # over-selection: the round went on without this device
                self.log.append(f"late: {e.reason}")
            else:
                self.error = e
        except BaseException as e:  # surfaced by the test
            self.error = e

    def _run(self) -> None:
        rid = self.wait_assignment()
        if rid is None:
            return
        with self.transport() as t:
            plan: RoundPlan = t.plan(rid)
            client = None
            if plan.secagg is not None:
                client = SecAggClient(self.device_id, plan.secagg)
                if self.drop_before == "advertise":
                    return
                t.advertise(rid, client.advertise_keys())
                if self._wait(t, Stage.SHARE_KEYS) != Stage.SHARE_KEYS:
                    self.log.append("missed share")
                    return
                if self.drop_before == "share":
                    return
                t.share_keys(rid, client.share_keys(t.roster(rid)))
            if self.drop_before == "upload":
                return
            common = {"round_id": rid, "layout_hash": plan.layout_hash, "dim": len(self.delta)}
            if plan.codec is not None:
                enc = encode(self.delta, plan.codec, np.random.default_rng(), num_examples=self.examples)
                values = enc.values
                if client is not None:
                    if self._wait(t, Stage.MASKED_INPUT) != Stage.MASKED_INPUT:
                        self.log.append("missed upload")
                        return
                    values = client.masked_input(values, t.inbound_shares(rid))
                bits = plan.secagg.ring_bits if plan.secagg else ring_bits(plan.codec)
                body = pack_update(
                    UpdateHeader(
                        kind=UpdateKind.RING,
                        bits=bits,
                        keep_fraction=plan.codec.keep_fraction,
                        length=len(values),
                        **common,
                    ),
                    values,
                )
            else:
                body = pack_dense_update(
                    UpdateHeader(
                        kind=UpdateKind.DENSE_F32,
                        bits=32,
                        keep_fraction=1.0,
                        length=len(self.delta),
                        **common,
                    ),
                    self.delta,
                )
            try:
                t.upload(rid, body, self.examples)
            except ApiError as e:
                if e.status in (409, 410):  # the round closed before this device's upload
                    self.log.append(f"late: {e.reason}")
                    return
                raise
            self.uploaded = True
            t.report(
                rid,
                TrainReport(loss_before=3.0, loss_after=2.5, examples=self.examples, steps=5, seconds=0.1),
            )
            if client is not None:
                if self.drop_before == "unmask":
                    return
                if self._wait(t, Stage.UNMASK) != Stage.UNMASK:
                    self.log.append("missed unmask")
                    return
                req = t.unmask_request(rid)
                t.unmask(rid, client.unmask(req.survivors, req.dropped))


def run_devices(devices: list[ScriptedDevice]) -> None:
    threads = [threading.Thread(target=d.run, daemon=True) for d in devices]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=180)
    for d in devices:
        if d.error is not None:
            raise d.error
