"""The coordinator side of secure aggregation: one method per stage, O(d) memory.

Usage per round::

    server = SecAggServer(params)
    server.add_advertisement(adv)                  # stage 1, per device
    roster = server.close_advertise()              # -> every device (ShareKeysRequest)
    server.add_share_keys(msg)                     # stage 2, per device
    server.close_share_keys()
    req = server.masked_input_request(device)      # -> that device
    server.add_masked_input(device, values)        # stage 3: added into the running sum
    unmask_req = server.close_masked_input()       # -> every survivor
    total = server.unmask(responses)               # stage 4: the exact modular sum

Masked vectors are never stored: each is added into one running sum as it arrives. The rest
(keys, relayed shares packed per recipient by :mod:`protocol.secagg.inbox`, revealed shares)
serialises with :meth:`SecAggServer.to_bytes`: the coordinator keeps it in its database.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol._encoding import Bytes32
from protocol.codec import CodecError, unpack_bits_add
from protocol.secagg import crypto, shamir
from protocol.secagg.common import (
    DuplicateInputError,
    SecAggError,
    StageError,
    UnrecoverableError,
    check_ring_vector,
    resolve_graph,
)
from protocol.secagg.graph import neighbour_graph
from protocol.secagg.inbox import inbox_digests, pack_inbox, read_inboxes, unpack_inbox, write_inboxes
from protocol.wire import (
    AdvertiseKeys,
    BadBodyError,
    EncryptedShare,
    MaskedInputRequest,
    SecAggParams,
    ShareKeys,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    UpdateHeader,
    verify_update,
)

__all__ = ["STATE_MAGIC", "STATE_VERSION", "SecAggServer"]

STATE_MAGIC = b"FKSA"
STATE_VERSION = 2
_STATE_HEAD = struct.Struct("<4sHI")  # magic, version, JSON length


class _ServerState(BaseModel):
    """Everything but the running sum (see :meth:`SecAggServer.to_bytes`)."""

    model_config = ConfigDict(extra="forbid")

    params: SecAggParams
    stage: Stage = Stage.ADVERTISE_KEYS
    advertised: dict[str, AdvertiseKeys] = Field(default_factory=dict)
    roster: ShareKeysRequest | None = None
    commitments: dict[str, Bytes32] = Field(default_factory=dict)
    """Devices that completed stage 2 (U2) -> their self-mask commitments."""
    own_digests: dict[str, Bytes32] = Field(default_factory=dict)
    """Devices in U2 -> the digest of the self-mask share each keeps for itself."""
    excluded: list[str] = Field(default_factory=list)
    """Devices that shared keys but had fewer than t - 1 neighbours that did: left out."""
    share_messages: dict[str, ShareKeys] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)
    """Devices whose masked input is in the running sum (U3), in arrival order."""
    omissions: dict[str, list[str]] = Field(default_factory=dict)
    """Device -> neighbours whose relayed share it could not use (undecryptable, or not what
    their digests say): it masked without them. Each one is dropped from the round."""
    unmask_request: UnmaskRequest | None = None
    responses: dict[str, UnmaskResponse] = Field(default_factory=dict)
    refused: list[str] = Field(default_factory=list)
    """Survivors whose unmask response failed its checks at reconstruction: left out of it."""


class _ServerStateV1(_ServerState):  # version 1 kept the relayed shares in the JSON
    mailbox: dict[str, list[EncryptedShare]] = Field(default_factory=dict)


class SecAggServer:
    """Honest-but-curious aggregator of one round (see :mod:`protocol.secagg`)."""

    def __init__(self, params: SecAggParams) -> None:
        self._s = _ServerState(params=params)
        self._dtype = crypto.ring_dtype(params.ring_bits)
        self._sum = np.zeros(params.vector_length, dtype=self._dtype)
        self._graph: dict[str, frozenset[str]] | None = None
        self._index: dict[str, int] = {}
        # recipient -> its relayed shares (stage 3 on), packed; decoded for a call that needs them
        self._packed: dict[str, bytes | memoryview] = {}
        self._inboxes: dict[str, tuple[EncryptedShare, ...]] = {}
        self._digests: dict[str, dict[str, tuple[bytes, bytes]]] = {}

    # -- state -----------------------------------------------------------------------------

    @property
    def params(self) -> SecAggParams:
        return self._s.params

    @property
    def stage(self) -> Stage:
        return self._s.stage

    @property
    def roster(self) -> ShareKeysRequest | None:
        return self._s.roster

    @property
    def survivors(self) -> list[str]:
        """Devices whose masked input has been added (U3)."""
        return list(self._s.inputs)

    @property
    def excluded(self) -> list[str]:
        return list(self._s.excluded)

    @property
    def refused(self) -> list[str]:
        """Survivors whose unmask response was left out of the reconstruction."""
        return list(self._s.refused)

    def has_masked_input(self, device: str) -> bool:
        return device in self._s.inputs

    def to_bytes(self) -> bytes:
        """Binary state (little-endian): ``b"FKSA"``, uint16 version, uint32 JSON length, the
        JSON of the small state, the relayed shares (:func:`.inbox.write_inboxes`), then the
        running sum: ``vector_length`` words of the ring word width (:func:`crypto.ring_dtype`)."""
        meta = self._s.model_dump_json().encode()
        return b"".join(
            (
                _STATE_HEAD.pack(STATE_MAGIC, STATE_VERSION, len(meta)),
                meta,
                write_inboxes(self._packed),
                self._sum.astype(self._dtype.newbyteorder("<")).tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggServer:
        """Inverse of :meth:`to_bytes` (also of version 1's); anything malformed raises
        :class:`SecAggError` (a relayed share when its recipient's inbox is first used)."""
        buf = memoryview(data)
        if len(buf) < _STATE_HEAD.size:
            raise SecAggError("server state truncated")
        magic, version, n = _STATE_HEAD.unpack(buf[: _STATE_HEAD.size])
        if magic != STATE_MAGIC or version not in (1, STATE_VERSION):
            raise SecAggError(f"not a version-{STATE_VERSION} server state")
        end = _STATE_HEAD.size + n
        model = _ServerState if version == STATE_VERSION else _ServerStateV1
        try:
            state = model.model_validate_json(bytes(buf[_STATE_HEAD.size : end]))
        except ValidationError as e:
            raise SecAggError(f"invalid server state: {e}") from e
        packed: dict[str, bytes | memoryview] = {}
        if isinstance(state, _ServerStateV1):
            packed = {v: pack_inbox(shares) for v, shares in state.mailbox.items()}
            state = _ServerState.model_validate(state.model_dump(exclude={"mailbox"}))
        else:
            packed, end = read_inboxes(buf, end)
        self = cls(state.params)
        vec = buf[end:]
        if len(vec) != state.params.vector_length * self._dtype.itemsize:
            raise SecAggError("server state: running sum has the wrong length")
        self._s = state
        self._packed = packed
        self._sum = np.frombuffer(vec, dtype=self._dtype.newbyteorder("<")).astype(self._dtype)
        if state.roster is not None:
            self._build_graph(state.roster)
        return self

    # -- helpers ---------------------------------------------------------------------------

    def _inbox(self, device: str) -> tuple[EncryptedShare, ...]:
        """The shares relayed to ``device`` (decoded once; empty if it has no inbox)."""
        if device not in self._inboxes and device in self._packed:
            self._inboxes[device] = unpack_inbox(device, self._packed[device])
        return self._inboxes.get(device, ())

    def _given(self, device: str) -> dict[str, tuple[bytes, bytes]]:
        """Sender -> (self-mask digest, key digest) of the shares relayed to ``device``."""
        if device not in self._digests and device in self._packed:
            self._digests[device] = inbox_digests(device, self._packed[device])
        return self._digests.get(device, {})

    def _expect(self, stage: Stage, what: str) -> None:
        if self._s.stage is not stage:
            raise StageError(stage, self._s.stage, what)

    def _check_round(self, round_id: int, what: str) -> None:
        if round_id != self._s.params.round_id:
            raise SecAggError(f"{what} is for round {round_id}, not {self._s.params.round_id}")

    def _build_graph(self, roster: ShareKeysRequest) -> None:
        ids = [a.device for a in roster.devices]
        degree, _ = resolve_graph(self._s.params, len(ids))
        self._graph = neighbour_graph(ids, self._s.params.graph_seed, degree)
        self._index = {d: i + 1 for i, d in enumerate(ids)}

    def _neighbours(self, device: str) -> frozenset[str]:
        assert self._graph is not None
        return self._graph[device]

    def _threshold(self) -> int:
        assert self._s.roster is not None
        return self._s.roster.threshold

    # -- stage 1: advertise keys -----------------------------------------------------------

    def check_advertisement(self, msg: AdvertiseKeys) -> bool:
        """Validate a device's public keys without recording them. False for an identical
        resend (nothing to record), True for a new advertisement; raises if it is refused.

        The ``check_*`` methods let a stateless front end (several coordinator workers) refuse
        bad messages at once against a snapshot of the stage, store the good ones anywhere,
        and replay them into one server with the ``add_*`` methods when the stage closes."""
        self._expect(Stage.ADVERTISE_KEYS, "add_advertisement")
        self._check_round(msg.round_id, "advertisement")
        old = self._s.advertised.get(msg.device)
        if old is not None:
            if old == msg:
                return False
            raise DuplicateInputError(f"{msg.device!r} already advertised different keys")
        if msg.cipher_public_key == msg.mask_public_key:
            raise SecAggError(f"{msg.device!r} advertised the same key twice")
        for key in (msg.cipher_public_key, msg.mask_public_key):
            try:
                crypto.check_public_key(key)
            except ValueError as e:
                raise SecAggError(f"{msg.device!r} advertised an invalid key: {e}") from None
        return True

    def add_advertisement(self, msg: AdvertiseKeys) -> None:
        """Record a device's public keys (an identical resend is a no-op)."""
        if self.check_advertisement(msg):
            self._s.advertised[msg.device] = msg

    def close_advertise(self) -> ShareKeysRequest:
        """End stage 1: the roster (sorted) with the resolved graph degree and threshold."""
        self._expect(Stage.ADVERTISE_KEYS, "close_advertise")
        ads = [self._s.advertised[d] for d in sorted(self._s.advertised)]
        keys = [a.cipher_public_key for a in ads] + [a.mask_public_key for a in ads]
        if len(set(keys)) != len(keys):
            raise SecAggError("two devices advertised the same public key")
        degree, threshold = resolve_graph(self._s.params, len(ads))
        roster = ShareKeysRequest(
            round_id=self._s.params.round_id, devices=tuple(ads), degree=degree, threshold=threshold
        )
        self._s.roster = roster
        self._build_graph(roster)
        self._s.stage = Stage.SHARE_KEYS
        return roster

    # -- stage 2: share keys ---------------------------------------------------------------

    def check_share_keys(self, msg: ShareKeys) -> bool:
        """Validate a device's encrypted shares without recording them (see
        :meth:`check_advertisement`): False for an identical resend, True for a new message."""
        self._expect(Stage.SHARE_KEYS, "add_share_keys")
        self._check_round(msg.round_id, "share-keys message")
        if msg.sender not in self._index:
            raise SecAggError(f"{msg.sender!r} is not in the roster")
        old = self._s.share_messages.get(msg.sender)
        if old is not None:
            if old == msg:
                return False
            raise DuplicateInputError(f"{msg.sender!r} already shared different keys")
        want = self._neighbours(msg.sender)
        got = [s.recipient for s in msg.shares]
        if len(got) != len(want) or set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            raise SecAggError(
                f"{msg.sender!r} must send one share to each neighbour "
                f"(missing {missing[:5]}, not neighbours {extra[:5]})"
            )
        return True

    def add_share_keys(self, msg: ShareKeys) -> None:
        """Record a device's encrypted shares, one per neighbour (identical resend: no-op)."""
        if self.check_share_keys(msg):
            self._s.share_messages[msg.sender] = msg
            self._s.commitments[msg.sender] = msg.self_mask_commitment
            self._s.own_digests[msg.sender] = msg.own_share_digest

    def close_share_keys(self) -> list[str]:
        """End stage 2. Devices with fewer than ``t - 1`` neighbours that shared keys are
        excluded (repeatedly, since excluding one can starve another): even if they survived,
        their self-mask seed could never be reconstructed (own share + ``t - 1``). A device with
        exactly ``t - 1`` stays in; the round then fails only if it actually drops. Returns the
        devices that go on to stage 3 (U2)."""
        self._expect(Stage.SHARE_KEYS, "close_share_keys")
        t = self._threshold()
        active = set(self._s.share_messages)
        changed = True
        while changed:
            starving = {u for u in active if len(self._neighbours(u) & active) < t - 1}
            changed = bool(starving)
            active -= starving
        if len(active) < self._s.params.min_devices:
            raise SecAggError(
                f"only {len(active)} devices completed key sharing with >= {t - 1} neighbours; the "
                f"round needs {self._s.params.min_devices}"
            )
        self._s.excluded = sorted(set(self._s.share_messages) - active)
        for u in self._s.excluded:
            del self._s.commitments[u]
            del self._s.own_digests[u]
        mailbox: dict[str, list[EncryptedShare]] = {v: [] for v in sorted(active)}
        for u in sorted(active):
            for share in self._s.share_messages[u].shares:
                if share.recipient in active:
                    mailbox[share.recipient].append(share)
        self._inboxes = {v: tuple(shares) for v, shares in mailbox.items()}
        self._packed = {v: pack_inbox(shares) for v, shares in mailbox.items()}
        self._s.share_messages = {}
        self._s.stage = Stage.MASKED_INPUT
        return sorted(active)

    # -- stage 3: masked input -------------------------------------------------------------

    def masked_input_request(self, device: str) -> MaskedInputRequest:
        """The shares relayed to ``device`` (only for devices in U2)."""
        self._expect(Stage.MASKED_INPUT, "masked_input_request")
        if device not in self._packed:
            raise SecAggError(f"{device!r} did not complete key sharing (or was excluded)")
        return MaskedInputRequest(
            round_id=self._s.params.round_id,
            recipient=device,
            shares=self._inbox(device),
        )

    def check_omissions(self, device: str, omitted: Iterable[str]) -> list[str]:
        """Validate the neighbours ``device`` says it did not mask with (their shares were
        unusable): only devices whose share was relayed to it. Sorted, without repeats."""
        self._expect(Stage.MASKED_INPUT, "check_omissions")
        if device not in self._packed:
            raise SecAggError(f"{device!r} may not send a masked input in this round")
        senders = self._given(device)
        out = sorted(set(omitted))
        strange = [u for u in out if u not in senders]
        if strange:
            raise SecAggError(f"{device!r} omits {strange[:5]}, whose shares were never relayed to it")
        return out

    def record_omissions(self, device: str, omitted: Iterable[str]) -> None:
        """Record whom ``device`` masked without (:meth:`check_omissions`). Call it for every
        uploader before adding inputs: an omitted device is dropped from the round (its pairwise
        mask with the omitter is missing), so its input must not go into the sum
        (:attr:`accused`); its masks with everyone else are removed like a dropped device's."""
        out = self.check_omissions(device, omitted)
        late = sorted(set(out) & set(self._s.inputs))
        if late:
            raise SecAggError(f"omissions must be recorded before inputs: {late[:5]} already added")
        if out:
            self._s.omissions[device] = out

    @property
    def accused(self) -> set[str]:
        """Devices some uploader masked without: they are dropped from the round."""
        return {u for us in self._s.omissions.values() for u in us}

    def _omitted_by(self, owner: str) -> set[str]:
        return {v for v, us in self._s.omissions.items() if owner in us}

    def add_masked_input(self, device: str, values: npt.ArrayLike) -> None:
        """Add a device's masked vector into the running sum (mod ``2**k``)."""
        self._expect(Stage.MASKED_INPUT, "add_masked_input")
        if device not in self._packed:
            raise SecAggError(f"{device!r} may not send a masked input in this round")
        if device in self._s.inputs:
            raise DuplicateInputError(f"{device!r} already sent its masked input")
        if device in self.accused:
            raise SecAggError(f"{device!r} was masked without by a neighbour: its input is left out")
        v = check_ring_vector(values, self._s.params)
        np.add(self._sum, v.astype(self._dtype, copy=False), out=self._sum)
        self._s.inputs.append(device)

    def add_masked_update(
        self, device: str, data: bytes | memoryview, *, layout_hash: str, dim: int | None = None
    ) -> UpdateHeader:
        """Verify a device's binary masked upload (``wire.pack_update`` body) and add it into
        the running sum without materialising the vector: the coordinator's usual path.

        Raises a :class:`protocol.wire.WireError` for a malformed upload (nothing is added)."""
        self._expect(Stage.MASKED_INPUT, "add_masked_update")
        if device not in self._packed:
            raise SecAggError(f"{device!r} may not send a masked input in this round")
        if device in self._s.inputs:
            raise DuplicateInputError(f"{device!r} already sent its masked input")
        if device in self.accused:
            raise SecAggError(f"{device!r} was masked without by a neighbour: its input is left out")
        p = self._s.params
        header, body = verify_update(
            data,
            expected_round=p.round_id,
            expected_layout_hash=layout_hash,
            expected_bits=p.ring_bits,
            expected_length=p.vector_length,
            expected_dim=dim,
        )
        try:
            unpack_bits_add(body, p.ring_bits, self._sum)  # validates before adding
        except CodecError as e:
            raise BadBodyError(str(e)) from e
        self._s.inputs.append(device)
        return header

    def close_masked_input(self) -> UnmaskRequest:
        """End stage 3: who survived and who dropped, sent to every survivor.

        Fails early (:class:`UnrecoverableError`) when some device in U2 cannot reach t
        shares among the survivors (only survivors answer the unmask stage)."""
        self._expect(Stage.MASKED_INPUT, "close_masked_input")
        survivors = sorted(self._s.inputs)
        dropped = sorted(set(self._packed) - set(survivors))
        # only survivors' omissions shape the sum (a dropped device's masks are all removed)
        self._s.omissions = {v: us for v, us in self._s.omissions.items() if v in self._s.inputs}
        need = max(self._threshold(), self._s.params.min_devices)
        if len(survivors) < need:
            raise SecAggError(f"only {len(survivors)} masked inputs arrived; the round needs {need}")
        self._check_recoverable(set(survivors), set(self._packed))
        self._s.unmask_request = UnmaskRequest(
            round_id=self._s.params.round_id, survivors=tuple(survivors), dropped=tuple(dropped)
        )
        self._s.stage = Stage.UNMASK
        return self._s.unmask_request

    def _holders(self, owner: str, alive: set[str]) -> set[str]:
        """Surviving neighbours that hold a usable share of ``owner`` (not its omitters)."""
        return set(self._neighbours(owner) & alive) - self._omitted_by(owner)

    def _needs_recovery(self, owner: str, alive: set[str]) -> bool:
        """A survivor's self-mask is always removed; a dropped device's mask key is needed only
        if some survivor masked with it (everyone may have omitted it)."""
        return owner in alive or bool(self._holders(owner, alive))

    def _check_recoverable(self, holders: set[str], owners: set[str]) -> None:
        """Every owner needs t shares among ``holders``: its neighbours' that did not omit it,
        plus its own if it is a holder itself (a survivor reveals its own self-mask share)."""
        t = self._threshold()
        short = {}
        for u in sorted(owners):
            if not self._needs_recovery(u, holders):
                continue
            have = len(self._holders(u, holders)) + (u in holders)
            if have < t:
                short[u] = have
        if short:
            detail = ", ".join(f"{u!r} ({h} of {t})" for u, h in list(short.items())[:20])
            raise UnrecoverableError(
                f"round {self._s.params.round_id} is unrecoverable: {len(short)} devices have "
                f"fewer than t={t} neighbours able to reveal their shares: {detail}",
                short,
            )

    # -- stage 4: unmask -------------------------------------------------------------------

    def check_unmask_response(self, msg: UnmaskResponse) -> bool:
        """Validate a survivor's revealed shares without recording them (see
        :meth:`check_advertisement`): False for an identical resend, True for a new response."""
        self._expect(Stage.UNMASK, "add_unmask_response")
        self._check_round(msg.round_id, "unmask response")
        p = self._s.params
        req = self._s.unmask_request
        assert req is not None
        if msg.sender not in req.survivors:
            raise SecAggError(f"{msg.sender!r} is not a survivor; its response is refused")
        old = self._s.responses.get(msg.sender)
        if old is not None:
            if old == msg:
                return False
            raise DuplicateInputError(f"{msg.sender!r} already answered the unmask stage")
        alive, gone = set(req.survivors), set(req.dropped)
        # what the sender was given (the relayed shares, with their owners' digests), and its own
        given = self._given(msg.sender)
        x = self._index[msg.sender]

        def digest(owner: str, kind: bytes, value: bytes) -> bytes:
            return crypto.share_digest(p.round_id, owner, msg.sender, x, kind, value)

        for s in msg.self_mask_shares:
            if s.owner not in alive or (s.owner != msg.sender and s.owner not in given):
                raise SecAggError(f"{msg.sender!r} revealed a self-mask share of {s.owner!r}")
            own = s.owner == msg.sender
            want = self._s.own_digests[s.owner] if own else given[s.owner][0]
            if digest(s.owner, crypto.SHARE_SELF_MASK, s.value) != want:
                raise SecAggError(f"{msg.sender!r} revealed a self-mask share of {s.owner!r} not given to it")
        for s in msg.key_shares:
            if s.owner not in gone or s.owner not in given:
                raise SecAggError(f"{msg.sender!r} revealed a key share of {s.owner!r}")
            if digest(s.owner, crypto.SHARE_KEY, s.value) != given[s.owner][1]:
                raise SecAggError(f"{msg.sender!r} revealed a key share of {s.owner!r} not given to it")
        return True

    def add_unmask_response(self, msg: UnmaskResponse) -> None:
        """Record a survivor's revealed shares (checked against what it may reveal)."""
        if self.check_unmask_response(msg):
            self._s.responses[msg.sender] = msg

    def unmask(self, responses: Iterable[UnmaskResponse] = ()) -> npt.NDArray[np.uint32]:
        """Reconstruct the secrets, remove every mask and return the exact sum mod ``2**k``.

        Raises :class:`UnrecoverableError` naming the devices whose secrets have fewer than
        t revealed shares, and :class:`SecAggError` if a reconstruction does not match the
        device's public key or commitment: never a silently wrong sum. A response that fails
        its checks (:meth:`check_unmask_response`: a share the sender was not given) is left
        out, with its sender listed in :attr:`refused`; the secrets are reconstructed from the
        other responses.
        """
        for r in responses:
            try:
                self.add_unmask_response(r)
            except SecAggError:
                if r.sender not in self._s.refused:
                    self._s.refused.append(r.sender)
        self._expect(Stage.UNMASK, "unmask")
        req = self._s.unmask_request
        assert req is not None
        p = self._s.params
        t = self._threshold()
        survivors, dropped = list(req.survivors), list(req.dropped)
        alive = set(survivors)
        dropped = [u for u in dropped if self._needs_recovery(u, alive)]
        self_shares: dict[str, list[tuple[int, int]]] = {u: [] for u in survivors}
        key_shares: dict[str, list[tuple[int, int]]] = {u: [] for u in dropped}
        for holder in sorted(self._s.responses):
            x = self._index[holder]
            for s in self._s.responses[holder].self_mask_shares:
                self_shares[s.owner].append((x, shamir.share_from_bytes(s.value)))
            for s in self._s.responses[holder].key_shares:
                if s.owner in key_shares:
                    key_shares[s.owner].append((x, shamir.share_from_bytes(s.value)))
        short = {u: len(v) for u, v in {**self_shares, **key_shares}.items() if len(v) < t}
        if short:
            detail = ", ".join(f"{u!r} ({h} of {t})" for u, h in list(short.items())[:20])
            raise UnrecoverableError(
                f"round {p.round_id} is unrecoverable: {len(short)} devices have fewer than "
                f"t={t} revealed shares: {detail}",
                short,
            )

        add: list[bytes] = []
        sub: list[bytes] = []
        for u in survivors:
            seed = self._reconstruct(u, self_shares[u], t)
            if crypto.mask_commitment(p.round_id, u, seed) != self._s.commitments[u]:
                raise SecAggError(f"reconstructed self-mask seed of {u!r} fails its commitment")
            sub.append(seed)
        for u in dropped:
            sk_raw = self._reconstruct(u, key_shares[u], t)
            sk = crypto.private_from_bytes(sk_raw)
            if crypto.public_from_private(sk) != self._s.advertised[u].mask_public_key:
                raise SecAggError(f"reconstructed mask key of {u!r} fails its public key")
            for v in sorted(self._holders(u, alive)):  # an omitter never masked with u
                seed = crypto.derive_pair_key(
                    sk,
                    self._s.advertised[v].mask_public_key,
                    purpose=crypto.PURPOSE_MASK,
                    round_id=p.round_id,
                    me=u,
                    peer=v,
                )
                # v added +PRG(s_uv) if v sorts before u, else -PRG(s_uv): take it back out.
                (sub if self._index[v] < self._index[u] else add).append(seed)
        total = self._sum.copy()
        crypto.apply_masks(total, add, sub)
        out = total.astype(np.uint32)
        if p.ring_bits < 32:
            out &= np.uint32((1 << p.ring_bits) - 1)
        self._sum = out.astype(self._dtype)
        self._s.stage = Stage.DONE
        return out

    def result(self) -> npt.NDArray[np.uint32]:
        """The unmasked sum after :meth:`unmask` (e.g. after a restart)."""
        self._expect(Stage.DONE, "result")
        return self._sum.astype(np.uint32)

    @staticmethod
    def _reconstruct(owner: str, shares: list[tuple[int, int]], t: int) -> bytes:
        try:
            return shamir.reconstruct(shares, t)
        except shamir.ShamirError as e:
            raise SecAggError(f"cannot reconstruct the secret of {owner!r}: {e}") from e
