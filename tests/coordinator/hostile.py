"""A hostile device for tests (issue 17): it enrols and checks in like any device, and in each
round it is selected for it plays ONE misbehaviour against the real coordinator, with the real
protocol code (codec, secure-aggregation client, wire format) bent where the misbehaviour says,
then drops out (or, where the misbehaviour needs it, behaves to the end of the round).

Each request the misbehaviour is about is a :class:`Probe`: what was sent, the status that came
back and the statuses that are acceptable; the scenario (tests.coordinator.hostile_scenario)
checks them, and checks the round's outcome against :data:`EXPECTED`.

Mangled uploads are checked locally with ``protocol.wire.verify_update`` before they are sent,
so a probe refused by the coordinator was refused for the reason it stands for.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt

from edge_client.transport import Transport
from protocol.codec import encode, kept_count
from protocol.secagg.client import SecAggClient
from protocol.wire import (
    HEADER_SIZE,
    AdvertiseKeys,
    BadBodyError,
    BadHeaderError,
    EnrollRequest,
    LayoutMismatchError,
    LengthMismatchError,
    RevealedShare,
    RoundMismatchError,
    RoundPlan,
    ShareKeys,
    Stage,
    TrainReport,
    UnmaskResponse,
    UpdateHeader,
    UpdateKind,
    WireError,
    pack_update,
    verify_update,
)
from tests.coordinator.scripted import ScriptedDevice, ready_state

__all__ = [
    "EXPECTED",
    "MISBEHAVIOURS",
    "Expected",
    "HostileDevice",
    "Played",
    "Probe",
    "Seen",
    "SeenLog",
    "StatusTap",
]

# ---------------------------------------------------------------------------------------------
# What each misbehaviour should lead to
# ---------------------------------------------------------------------------------------------

Outcome = Literal["committed", "failed"]


@dataclass(frozen=True)
class Expected:
    """The round a misbehaviour is played in: its outcome, whether the hostile device's own
    input belongs in the committed sum, and (failed rounds) what the failure reason says."""

    outcome: Outcome = "committed"
    hostile_in_sum: bool = False
    reasons: tuple[str, ...] = ()  # a failed round's reason contains one of these
    # a committed round may instead fail cleanly for one of these reasons (the model unchanged)
    may_fail_with: tuple[str, ...] = ()


EXPECTED: dict[str, Expected] = {
    # a control round: the hostile device behaves (checks the harness's own sum check)
    "none": Expected(hostile_in_sum=True),
    "low_order_key": Expected(),
    "padding": Expected(),
    "wrong_length": Expected(),
    "wrong_layout": Expected(),
    "ring_bits": Expected(),
    "other_round": Expected(),
    "wrong_stage": Expected(),
    "replay": Expected(),
    "garbage_shares": Expected(),
    # the liar is a survivor: its (valid) input is in the sum; its reveal is not used
    "lying_reveal": Expected(hostile_in_sum=True),
    "huge_counts": Expected(),
    # its first check-in of a selecting round says 2**31 - 1 local examples (the schema's bound):
    # it joins the pool with that count (stored), then behaves
    "bound_checkin": Expected(hostile_in_sum=True),
    # random ring words: the weight slot's sum gives it away (or, rarely, the norm bound)
    "garbage_input": Expected("failed", reasons=("aggregate norm", "summed weight")),
    # every kept coordinate half a ring away from the middle level (weight slot valid): the
    # longest vector the ring holds, which the aggregate norm bound refuses
    "far_input": Expected("failed", reasons=("aggregate norm",)),
    # every kept coordinate at the codec's top level (weight slot valid): the most an encoding
    # can say, but not a clipped one (its norm is range_factor * sqrt(keep_fraction) * clip).
    # Under secure aggregation no check can see one input: it is in the sum, like poisoned
    # training data, and what it can do is bounded by the aggregate's norm check (the mean
    # stays within protocol.codec.mean_norm_bound: the model moves at most one clipped update).
    # Its norm lies close to that bound: with the honest updates of the round the mean lands
    # just inside it (committed) or just outside (refused; measured 1.033 against 1.032), and
    # both bound what it can do
    "saturated_input": Expected(hostile_in_sum=True, may_fail_with=("aggregate norm",)),
    # the accused honest neighbour is dropped; the accuser's valid input stays in
    "false_accusation": Expected(hostile_in_sum=True),
    "huge_bodies": Expected(),
}
MISBEHAVIOURS: tuple[str, ...] = tuple(EXPECTED)

OK = frozenset({200, 204})
REFUSED = frozenset(range(400, 500))
ROUND_NOT_YOURS = frozenset({403, 410})
WRONG_STAGE = frozenset({409, 410})
CONTAINED = OK | REFUSED  # accepted or refused, never a 5xx

# ---------------------------------------------------------------------------------------------
# Every status every device saw
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    who: str
    method: str
    path: str
    status: int
    at: float


class SeenLog:
    """Every response any device of a scenario got (appends are atomic under the GIL)."""

    def __init__(self) -> None:
        self.items: list[Seen] = []

    def add(self, who: str, method: str, path: str, status: int) -> None:
        self.items.append(Seen(who, method, path, status, time.time()))

    def between(self, start: float, end: float) -> list[Seen]:
        return [s for s in self.items if start <= s.at <= end]


class StatusTap(httpx.BaseTransport):
    """Forwards to the real network (TLS with the coordinator's CA) and records each status."""

    def __init__(self, ca: Path, log: SeenLog, who: str) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca)))
        self.log = log
        self.who = who

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.log.add(self.who, request.method, request.url.path, response.status_code)
        return response

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# The hostile device
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One hostile request: what it was, the status it got, the statuses acceptable for it."""

    label: str
    status: int
    allowed: frozenset[int]

    @property
    def ok(self) -> bool:
        return self.status in self.allowed


@dataclass
class Played:
    """What the hostile device did in one round."""

    misbehaviour: str
    round_id: int = 0
    plan: RoundPlan | None = None
    probes: list[Probe] = field(default_factory=list)
    encoding: npt.NDArray[np.uint32] | None = None  # its own valid (unmasked) input, if it sent one
    victim: str | None = None  # false_accusation: the honest neighbour it accused
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. huge_bodies' RSS numbers


class Dropped(Exception):
    """The round went on without the hostile device before the misbehaviour was complete."""


BodyAttack = Callable[["HostileDevice", Played], None]
"""Sends huge bodies to every route (the ``huge_bodies`` misbehaviour); supplied by the
scenario, which knows the coordinator's process (for its RSS)."""


@dataclass
class HostileDevice(ScriptedDevice):
    """A device that misbehaves, one misbehaviour per round (see the module doc).

    ``seen`` records the status of every response it gets; ``body_attack`` runs the
    ``huge_bodies`` misbehaviour. Keeps the messages of its earlier rounds to replay them.
    """

    seen: SeenLog = field(default_factory=SeenLog)
    body_attack: BodyAttack | None = None
    last_round: int = 0
    sybil_id: str = ""  # a second identity, never selected (requests "for a round it is not in")
    sybil_token: str = ""
    old_advertisement: AdvertiseKeys | None = None
    old_share_keys: ShareKeys | None = None
    old_upload: bytes | None = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def http_transport(self) -> httpx.BaseTransport:
        return StatusTap(Path(self.ca), self.seen, "hostile")

    def http(self, token: str | None = None) -> httpx.Client:
        """A raw client (for requests the typed transport would not send)."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=60,
            transport=StatusTap(Path(self.ca), self.seen, "hostile"),
        )

    # -- plumbing ------------------------------------------------------------------------------

    def _probe(
        self, played: Played, label: str, allowed: frozenset[int], request: Callable[[], httpx.Response]
    ) -> int:
        status = request().status_code
        played.probes.append(Probe(label, status, allowed))
        return status

    def _send(
        self,
        played: Played,
        label: str,
        allowed: frozenset[int],
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_text: str | None = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
    ) -> int:
        headers = {}
        if json_text is not None:
            content = json_text.encode()
            headers["Content-Type"] = "application/json"
        elif content is not None:
            headers["Content-Type"] = "application/octet-stream"
        with self.http(token) as c:
            return self._probe(
                played,
                label,
                allowed,
                lambda: c.request(method, path, content=content, params=params, headers=headers),
            )

    def _wait_stage(self, t: Transport, stage: str) -> None:
        got = self._wait(t, stage, timeout=90)
        if got != stage:
            raise Dropped(f"round at {got} instead of {stage}")

    def _assignment(self, played: Played) -> int:
        """Check in until assigned a round after the last one played. ``bound_checkin`` checks
        in with the largest count the schema allows (2**31 - 1 local examples) until that check-in
        lands in a selecting round's pool (a 32-bit column must hold it)."""
        end = time.time() + 120
        bound = played.misbehaviour == "bound_checkin"
        with self.transport() as t:
            while time.time() < end:
                if bound:
                    bound = not self._bound_checkin(played)
                    time.sleep(0.2)
                    continue
                r = t.checkin(ready_state())
                if r.action == "train" and r.round_id is not None and r.round_id > self.last_round:
                    return r.round_id
                time.sleep(min(r.retry_after or 0.2, 0.3))
        raise TimeoutError("the hostile device was not assigned a round")

    def _bound_checkin(self, played: Played) -> bool:
        """A check-in with 2**31 - 1 local examples; True once it was taken into a pool (or refused)."""
        state = {**ready_state().model_dump(mode="json"), "examples": (1 << 31) - 1}
        with self.http() as c:
            r = c.post("/v1/checkin", json={"state": state})
        answer = r.json() if r.status_code == 200 else {}
        assigned = answer.get("action") == "train" and int(answer.get("round_id") or 0) > self.last_round
        pooled = assigned or str(answer.get("reason", "")).startswith("candidate")
        if r.status_code == 200 and not pooled:
            return False  # no round selects now: the count went nowhere; again later
        played.probes.append(Probe("check-in: 2**31 - 1 examples, into the pool", r.status_code, CONTAINED))
        return True

    def _absurd_checkins(self, played: Played) -> None:
        """Check-ins with counts and readings out of the schema's ranges (or at their edges)."""
        base = ready_state().model_dump(mode="json")
        states: list[tuple[str, dict[str, Any], frozenset[int]]] = [
            ("check-in: examples 2**31", {"examples": 1 << 31}, REFUSED),
            ("check-in: examples -1", {"examples": -1}, REFUSED),
            ("check-in: examples 2**64", {"examples": 1 << 64}, REFUSED),
            ("check-in: battery 1e300 %", {"battery_pct": 1e300}, REFUSED),
            # finite and in range for the schema: taken or refused, never a 5xx
            ("check-in: storage 1e308 MB", {"free_storage_mb": 1e308}, CONTAINED),
            ("check-in: model version 2**62", {"model_version": 1 << 62}, CONTAINED),
            ("check-in: model version -1", {"model_version": -1}, REFUSED),
        ]
        for label, change, allowed in states:
            text = json.dumps({"state": {**base, **change}})
            self._send(played, label, allowed, "POST", "/v1/checkin", json_text=text)
        nan = json.dumps({"state": base}).replace('"battery_pct": 90.0', '"battery_pct": NaN')
        assert "NaN" in nan
        self._send(played, "check-in: battery NaN", REFUSED, "POST", "/v1/checkin", json_text=nan)

    # -- the protocol, step by step (the real client code) -------------------------------------

    def _advertise(self, t: Transport, played: Played) -> SecAggClient:
        plan = self._plan(played)
        assert plan.secagg is not None
        client = SecAggClient(self.device_id, plan.secagg)
        adv = client.advertise_keys()
        t.advertise(played.round_id, adv)
        self.old_advertisement = adv
        return client

    def _share(self, t: Transport, played: Played, client: SecAggClient) -> ShareKeys:
        self._wait_stage(t, Stage.SHARE_KEYS)
        return client.share_keys(t.roster(played.round_id))

    def _valid_encoding(self, played: Played) -> npt.NDArray[np.uint32]:
        """A clipped encoding of a synthetic update (as an honest device would send)."""
        plan = self._plan(played)
        assert plan.codec is not None
        d = plan.weights.size // 4
        delta = self.rng.normal(0, 1, d).astype(np.float32)
        delta *= 0.5 * plan.codec.clip_norm / float(np.linalg.norm(delta))
        enc = encode(delta, plan.codec, self.rng, num_examples=plan.codec.weight_cap)
        return np.asarray(enc.values, dtype=np.uint32)

    def _masked(
        self,
        t: Transport,
        played: Played,
        client: SecAggClient,
        values: npt.NDArray[np.uint32],
        *,
        without: str = "",
    ) -> npt.NDArray[np.uint32]:
        self._wait_stage(t, Stage.MASKED_INPUT)
        req = t.inbound_shares(played.round_id)
        shares = [s for s in req.shares if s.sender != without]
        return client.masked_input(values, shares)

    def _frame(self, played: Played, values: npt.NDArray[np.uint32]) -> bytes:
        plan = self._plan(played)
        assert plan.codec is not None and plan.secagg is not None
        header = UpdateHeader(
            kind=UpdateKind.RING,
            bits=plan.secagg.ring_bits,
            round_id=played.round_id,
            layout_hash=plan.layout_hash,
            keep_fraction=plan.codec.keep_fraction,
            length=len(values),
            dim=plan.weights.size // 4,
        )
        return pack_update(header, values)

    def _upload(self, t: Transport, played: Played, body: bytes, omit: tuple[str, ...] = ()) -> None:
        plan = self._plan(played)
        assert plan.codec is not None
        t.upload(played.round_id, body, plan.codec.weight_cap, omit=omit)
        t.report(
            played.round_id,
            TrainReport(loss_before=3.0, loss_after=2.5, examples=16, steps=2, seconds=1.0),
        )
        self.old_upload = body

    def _unmask(self, t: Transport, played: Played, client: SecAggClient) -> UnmaskResponse:
        self._wait_stage(t, Stage.UNMASK)
        req = t.unmask_request(played.round_id)
        return client.unmask(req.survivors, req.dropped)

    def _plan(self, played: Played) -> RoundPlan:
        assert played.plan is not None
        return played.plan

    def _checked(self, played: Played, frame: bytes, error: type[WireError]) -> bytes:
        """``frame`` after making sure ``verify_update`` refuses it with ``error``."""
        plan = self._plan(played)
        assert plan.secagg is not None
        try:
            verify_update(
                frame,
                expected_round=played.round_id,
                expected_layout_hash=plan.layout_hash,
                expected_bits=plan.secagg.ring_bits,
                expected_length=plan.secagg.vector_length,
            )
        except error:
            return frame
        except WireError as e:
            raise AssertionError(f"mangled frame fails with {type(e).__name__}, not {error.__name__}") from e
        raise AssertionError(f"mangled frame passes verify_update (expected {error.__name__})")

    def _put(
        self,
        played: Played,
        label: str,
        allowed: frozenset[int],
        frame: bytes,
        round_id: int = 0,
        token: str | None = None,
        examples: int = 16,
    ) -> int:
        return self._send(
            played,
            label,
            allowed,
            "PUT",
            f"/v1/rounds/{round_id or played.round_id}/update",
            token=token,
            content=frame,
            params={"examples": examples},
        )

    # -- the round -----------------------------------------------------------------------------

    def play(self, misbehaviour: str) -> Played:
        """Take part in the next round assigned to this device, playing ``misbehaviour``."""
        if misbehaviour not in EXPECTED:
            raise ValueError(f"unknown misbehaviour {misbehaviour!r}")
        played = Played(misbehaviour)
        played.round_id = self.round_id = self._assignment(played)
        try:
            with self.transport() as t:
                played.plan = t.plan(played.round_id)
                getattr(self, f"_play_{misbehaviour}")(t, played)
        except Dropped as e:
            played.notes.append(f"dropped: {e}")
        finally:
            self.last_round = played.round_id
        return played

    def _honest_to_the_end(self, t: Transport, played: Played, client: SecAggClient) -> None:
        values = self._valid_encoding(played)
        played.encoding = values
        self._upload(t, played, self._frame(played, self._masked(t, played, client, values)))
        t.unmask(played.round_id, self._unmask(t, played, client))

    def _play_none(self, t: Transport, played: Played) -> None:
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        self.old_share_keys = msg
        self._honest_to_the_end(t, played, client)

    def _play_low_order_key(self, t: Transport, played: Played) -> None:
        plan = self._plan(played)
        assert plan.secagg is not None
        adv = SecAggClient(self.device_id, plan.secagg).advertise_keys()
        path = f"/v1/rounds/{played.round_id}/secagg/advertise"
        # u = 0 and u = 1 have order 1 and 4; the third is a point of order 8
        order8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
        for name, key in (("zero", bytes(32)), ("one", b"\x01" + bytes(31)), ("order 8", order8)):
            for slot in ("cipher_public_key", "mask_public_key"):
                bad = adv.model_copy(update={slot: key})
                self._send(
                    played,
                    f"advertise: {slot} {name}",
                    frozenset({422}),
                    "POST",
                    path,
                    json_text=bad.model_dump_json(),
                )
        # then it drops: the round goes on without it

    def _mangled_upload(self, t: Transport, played: Played) -> bytes:
        """Shares keys honestly, then returns the valid masked frame it will bend."""
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        self.old_share_keys = msg
        values = self._valid_encoding(played)
        return self._frame(played, self._masked(t, played, client, values))

    def _play_padding(self, t: Transport, played: Played) -> None:
        frame = bytearray(self._mangled_upload(t, played))
        frame[-1] |= 0x80  # the top bit of the last byte: padding when length * bits % 8 != 0
        bad = self._checked(played, _recrc(frame), BadBodyError)
        self._put(played, "upload: a padding bit set (valid CRC)", frozenset({422}), bad)

    def _play_wrong_length(self, t: Transport, played: Played) -> None:
        frame = self._mangled_upload(t, played)
        (length,) = struct.unpack_from("<I", frame, 56)
        for change in (-1, 1):
            bad = bytearray(frame)
            struct.pack_into("<I", bad, 56, length + change)
            checked = self._checked(played, _recrc(bad), LengthMismatchError)
            self._put(played, f"upload: header length {change:+d} (valid CRC)", REFUSED, checked)
        self._put(played, "upload: one byte short", REFUSED, frame[:-1])
        self._put(played, "upload: one byte more", REFUSED, frame + b"\0")

    def _play_wrong_layout(self, t: Transport, played: Played) -> None:
        bad = bytearray(self._mangled_upload(t, played))
        bad[16:48] = bytes(b ^ 0xFF for b in bad[16:48])
        checked = self._checked(played, _recrc(bad), LayoutMismatchError)
        self._put(played, "upload: another layout hash (valid CRC)", REFUSED, checked)

    def _play_ring_bits(self, t: Transport, played: Played) -> None:
        frame = self._mangled_upload(t, played)
        for bits in (frame[7] + 1, frame[7] - 1, 32):
            bad = bytearray(frame)
            bad[7] = bits
            checked = self._checked(played, _recrc(bad), BadHeaderError)
            self._put(played, f"upload: {bits}-bit ring (valid CRC)", REFUSED, checked)

    def _play_other_round(self, t: Transport, played: Played) -> None:
        if not self.sybil_token:  # a second identity of the same hostile party, never selected
            with Transport(self.url, ca=Path(self.ca), retries=2) as anon:
                r = anon.enroll(
                    EnrollRequest(enrollment_secret=self.secret, platform="test", client_version="0.1.0")
                )
            self.sybil_id, self.sybil_token = r.device_id, r.token
        plan = self._plan(played)
        assert plan.secagg is not None
        rid = played.round_id
        frame = self._frame(played, np.zeros(plan.secagg.vector_length, dtype=np.uint32))
        self._put(
            played, "upload as a device not in this round", frozenset({403}), frame, token=self.sybil_token
        )
        keys = SecAggClient(self.sybil_id, plan.secagg).advertise_keys()
        self._send(
            played,
            "advertise in a round it is not in",
            frozenset({403}),
            "POST",
            f"/v1/rounds/{rid}/secagg/advertise",
            token=self.sybil_token,
            json_text=keys.model_dump_json(),
        )
        if self.last_round:
            self._put(
                played,
                "upload for its previous round (over)",
                ROUND_NOT_YOURS,
                frame,
                round_id=self.last_round,
            )
        if self.old_share_keys is not None:
            self._send(
                played,
                "share keys in an earlier round (over)",
                ROUND_NOT_YOURS,
                "POST",
                f"/v1/rounds/{self.old_share_keys.round_id}/secagg/shares",
                json_text=self.old_share_keys.model_dump_json(),
            )
        self._put(
            played, "upload for a round that does not exist", ROUND_NOT_YOURS, frame, round_id=rid + 10_000
        )
        # then it drops without advertising in its own round

    def _play_wrong_stage(self, t: Transport, played: Played) -> None:
        client = self._advertise(t, played)
        self._wait_stage(t, Stage.SHARE_KEYS)
        plan = self._plan(played)
        assert plan.secagg is not None
        rid = played.round_id
        frame = self._frame(played, np.zeros(plan.secagg.vector_length, dtype=np.uint32))
        self._put(played, "upload while the round shares keys", WRONG_STAGE, frame)
        self._send(
            played,
            "shares inbox while the round shares keys",
            WRONG_STAGE,
            "GET",
            f"/v1/rounds/{rid}/secagg/shares",
        )
        self._send(
            played,
            "unmask request while the round shares keys",
            WRONG_STAGE,
            "GET",
            f"/v1/rounds/{rid}/secagg/unmask",
        )
        reveal = UnmaskResponse(
            round_id=rid,
            sender=self.device_id,
            self_mask_shares=(RevealedShare(owner=self.device_id, value=os.urandom(66)),),
            key_shares=(),
        )
        self._send(
            played,
            "reveal while the round shares keys",
            WRONG_STAGE,
            "POST",
            f"/v1/rounds/{rid}/secagg/unmask",
            json_text=reveal.model_dump_json(),
        )
        del client  # then it drops without sharing keys

    def _play_replay(self, t: Transport, played: Played) -> None:
        rid = played.round_id
        if self.old_advertisement is not None:
            self._send(
                played,
                "replay: an earlier round's advertisement",
                REFUSED,
                "POST",
                f"/v1/rounds/{rid}/secagg/advertise",
                json_text=self.old_advertisement.model_dump_json(),
            )
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        if self.old_share_keys is not None:
            self._send(
                played,
                "replay: an earlier round's share keys",
                REFUSED,
                "POST",
                f"/v1/rounds/{rid}/secagg/shares",
                json_text=self.old_share_keys.model_dump_json(),
            )
        t.share_keys(rid, msg)
        self._wait_stage(t, Stage.MASKED_INPUT)
        if self.old_upload is not None:
            checked = self._checked(played, self.old_upload, RoundMismatchError)
            self._put(played, "replay: an earlier round's masked input", REFUSED, checked)
        self.old_share_keys = msg
        # then it drops without a masked input of this round

    def _play_garbage_shares(self, t: Transport, played: Played) -> None:
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        garbage = msg.model_copy(
            update={
                "shares": tuple(
                    s.model_copy(update={"ciphertext": os.urandom(len(s.ciphertext))}) for s in msg.shares
                )
            }
        )
        # the coordinator relays shares it cannot read: the recipients find them out
        self._send(
            played,
            "share keys: random ciphertexts",
            OK,
            "POST",
            f"/v1/rounds/{played.round_id}/secagg/shares",
            json_text=garbage.model_dump_json(),
        )
        values = self._valid_encoding(played)
        frame = self._frame(played, self._masked(t, played, client, values))
        # accepted on arrival; the recipients' omissions drop it when the stage closes
        self._put(played, "upload after garbage shares", OK, frame)

    def _play_lying_reveal(self, t: Transport, played: Played) -> None:
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        self.old_share_keys = msg
        values = self._valid_encoding(played)
        played.encoding = values
        self._upload(t, played, self._frame(played, self._masked(t, played, client, values)))
        truth = self._unmask(t, played, client)
        lie = truth.model_copy(
            update={
                "self_mask_shares": tuple(
                    s.model_copy(update={"value": s.value[:-1] + bytes([s.value[-1] ^ 1])})
                    for s in truth.self_mask_shares
                )
            }
        )
        path = f"/v1/rounds/{played.round_id}/secagg/unmask"
        self._send(
            played,
            "reveal: altered share values",
            frozenset({422}),
            "POST",
            path,
            json_text=lie.model_dump_json(),
        )
        # then it drops: the others' shares must do

    def _play_bound_checkin(self, t: Transport, played: Played) -> None:
        self._play_none(t, played)

    def _play_huge_counts(self, t: Transport, played: Played) -> None:
        self._absurd_checkins(played)
        rid = played.round_id
        plan = self._plan(played)
        assert plan.secagg is not None
        frame = self._frame(played, np.zeros(plan.secagg.vector_length, dtype=np.uint32))
        for examples in ((1 << 31) + 1, 1 << 64, -1):
            self._put(played, f"upload: examples={examples}", frozenset({422}), frame, examples=examples)
        good = TrainReport(loss_before=3.0, loss_after=2.5, examples=16, steps=2, seconds=1.0).model_dump()
        reports: list[tuple[str, dict[str, Any], frozenset[int]]] = [
            ("report: examples -1", {"examples": -1}, REFUSED),
            ("report: steps 2**64", {"steps": 1 << 64}, REFUSED),
            ("report: seconds -1", {"seconds": -1.0}, REFUSED),
            ("report: loss 1e400", {"loss_before": "1e400"}, REFUSED),
            # finite and in range for the schema: taken or refused, never a 5xx
            (
                "report: examples 2**62, loss 1e308",
                {"examples": 1 << 62, "steps": 1 << 62, "loss_before": 1e308},
                CONTAINED,
            ),
        ]
        for label, change, allowed in reports:
            text = json.dumps({**good, **change}).replace('"1e400"', "1e400")
            self._send(played, label, allowed, "POST", f"/v1/rounds/{rid}/report", json_text=text)
        counts: list[tuple[str, dict[str, Any]]] = [
            ("evaluation: 2**40 words", {"words": 1 << 40, "top1": 0, "top3": 0, "loss_sum": 0, "tokens": 1}),
            (
                "evaluation: negative counts",
                {"words": -5, "top1": -1, "top3": -1, "loss_sum": -1.0, "tokens": -1},
            ),
            ("evaluation: top1 > words", {"words": 1, "top1": 9, "top3": 9, "loss_sum": 0, "tokens": 1}),
        ]
        for label, body in counts:
            self._send(
                played, label, REFUSED, "POST", f"/v1/rounds/{rid}/evaluation", json_text=json.dumps(body)
            )
        self._send(
            played,
            "status: wait 1e9 s",
            REFUSED,
            "GET",
            f"/v1/rounds/{rid}/status",
            params={"since": "x", "wait": 1e9},
        )
        # then it drops without advertising

    def _play_garbage_input(self, t: Transport, played: Played) -> None:
        plan = self._plan(played)
        assert plan.secagg is not None
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        words = self.rng.integers(0, 1 << plan.secagg.ring_bits, plan.secagg.vector_length, dtype=np.uint32)
        self._garbage_to_the_end(t, played, client, words)

    def _play_saturated_input(self, t: Transport, played: Played) -> None:
        plan = self._plan(played)
        assert plan.codec is not None
        self._top_values(t, played, (1 << plan.codec.bits) - 1)

    def _play_far_input(self, t: Transport, played: Played) -> None:
        plan = self._plan(played)
        assert plan.codec is not None and plan.secagg is not None
        far = (1 << (plan.codec.bits - 1)) + (1 << (plan.secagg.ring_bits - 1))
        self._top_values(t, played, far % (1 << plan.secagg.ring_bits))

    def _top_values(self, t: Transport, played: Played, top: int) -> None:
        """A valid encoding whose kept coordinates all say ``top`` (the weight slot, after
        them, stays what an honest device sends)."""
        plan = self._plan(played)
        assert plan.codec is not None
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        values = self._valid_encoding(played)
        values[: kept_count(plan.codec, plan.weights.size // 4)] = top
        played.encoding = values  # what it put into the sum (the scenario shows a commit of it)
        self._garbage_to_the_end(t, played, client, values)

    def _garbage_to_the_end(
        self, t: Transport, played: Played, client: SecAggClient, values: npt.NDArray[np.uint32]
    ) -> None:
        """A well-formed masked input of ``values`` (nothing on the wire can tell), then an
        honest reveal: the round reaches aggregation, where the decoded sum gives it away."""
        frame = self._frame(played, self._masked(t, played, client, values))
        self._put(played, "upload: a well-formed input that is no clipped encoding", OK, frame)
        t.unmask(played.round_id, self._unmask(t, played, client))

    def _play_false_accusation(self, t: Transport, played: Played) -> None:
        client = self._advertise(t, played)
        msg = self._share(t, played, client)
        t.share_keys(played.round_id, msg)
        self._wait_stage(t, Stage.MASKED_INPUT)
        inbox = t.inbound_shares(played.round_id)
        played.victim = sorted(s.sender for s in inbox.shares)[0]
        values = self._valid_encoding(played)
        played.encoding = values
        masked = self._masked(t, played, client, values, without=played.victim)
        frame = self._frame(played, masked)
        plan = self._plan(played)
        assert plan.codec is not None
        with self.http() as c:
            self._probe(
                played,
                "upload naming an honest neighbour as omitted",
                OK,
                lambda: c.put(
                    f"/v1/rounds/{played.round_id}/update",
                    content=frame,
                    params={"examples": plan.codec.weight_cap if plan.codec else 1, "omit": [played.victim]},
                    headers={"Content-Type": "application/octet-stream"},
                ),
            )
        t.unmask(played.round_id, self._unmask(t, played, client))

    def _play_huge_bodies(self, t: Transport, played: Played) -> None:
        if self.body_attack is None:
            raise RuntimeError("huge_bodies needs a body_attack")
        self.body_attack(self, played)
        # and it never advertises: the round went on without it meanwhile


def _recrc(frame: bytearray) -> bytes:
    """The frame with its header CRC32 recomputed over the (altered) header and body."""
    crc = zlib.crc32(bytes(frame[HEADER_SIZE:]), zlib.crc32(bytes(frame[: HEADER_SIZE - 4])))
    struct.pack_into("<I", frame, HEADER_SIZE - 4, crc)
    return bytes(frame)


def thread_stacks() -> str:
    """Every thread's stack (for a stalled round's failure message)."""
    import sys
    import traceback

    frames = sys._current_frames()
    out = []
    for th in threading.enumerate():
        frame = frames.get(th.ident or -1)
        if frame is not None:
            out.append(f"--- {th.name} ---\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(out)


def iter_probes(played: list[Played]) -> Iterator[tuple[str, Probe]]:
    for p in played:
        for probe in p.probes:
            yield p.misbehaviour, probe
