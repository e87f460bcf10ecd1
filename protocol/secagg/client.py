"""The device side of secure aggregation: one method per stage.

Usage per round (messages from :mod:`protocol.wire`)::

    client = SecAggClient("device-7", params)
    adv = client.advertise_keys()                        # -> server
    shares = client.share_keys(share_keys_request)       # -> server (relays to neighbours)
    masked = client.masked_input(encoded.values, masked_input_request.shares)
    body = wire.pack_update(header, masked)              # -> server
    resp = client.unmask(req.survivors, req.dropped)     # -> server

The whole state is serialisable (:meth:`SecAggClient.to_bytes`) so a device that restarts
mid-round can continue; it contains the round's private keys, so store it like a secret. It
is O(degree) apart from the roster's device ids: of the roster the client keeps the ids (for
Shamir points and the mask signs), its neighbours' mask keys and a digest (to recognise a
retried roster), not every device's keys.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol._encoding import B64Bytes, Bytes32
from protocol.secagg import crypto, shamir
from protocol.secagg.common import (
    MIN_THRESHOLD,
    SecAggError,
    StageError,
    check_ring_vector,
    resolve_graph,
)
from protocol.secagg.graph import neighbours_of
from protocol.wire import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInputRequest,
    RevealedShare,
    SecAggParams,
    ShareKeys,
    ShareKeysRequest,
    SharePlaintext,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["SecAggClient"]

log = logging.getLogger(__name__)

RandomBytes = Callable[[int], bytes]


class _HeldShares(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    self_mask_share: B64Bytes
    key_share: B64Bytes


class _ClientState(BaseModel):
    """Everything a device keeps between stages (private keys included)."""

    model_config = ConfigDict(extra="forbid")

    device: str
    params: SecAggParams
    stage: Stage = Stage.ADVERTISE_KEYS
    cipher_private_key: Bytes32
    mask_private_key: Bytes32
    self_mask_seed: Bytes32
    roster_digest: Bytes32 | None = None
    """SHA-256 of the roster message this device shared keys for (retries must match)."""
    roster_ids: list[str] = Field(default_factory=list)
    """The roster's device ids in order: 1-based position = Shamir point and mask-sign order."""
    neighbours: list[str] = Field(default_factory=list)
    mask_public_keys: dict[str, Bytes32] = Field(default_factory=dict)
    """The neighbours' advertised mask keys (the pairwise masks are derived in stage 3)."""
    share_keys_response: ShareKeys | None = None
    cipher_keys: dict[str, Bytes32] = Field(default_factory=dict)
    """AES-GCM key shared with each neighbour (derived in stage 2, reused in stage 3)."""
    own_share: _HeldShares | None = None
    """The device's own share of its secrets (only the self-mask one is ever revealed)."""
    held: dict[str, _HeldShares] = Field(default_factory=dict)
    """Shares received from neighbours (owner -> shares), set in the masked-input stage."""
    omitted: list[str] = Field(default_factory=list)
    """Neighbours whose relayed share was unusable: not masked with (told to the server)."""
    unmask_request: UnmaskRequest | None = None
    unmask_response: UnmaskResponse | None = None
    revealed: dict[str, Literal["self_mask", "key"]] = Field(default_factory=dict)


def _roster_digest(roster: ShareKeysRequest) -> bytes:
    """SHA-256 over every field of the roster (length-prefixed ids, raw keys): equal rosters,
    and only those, give equal digests (cheaper than hashing its JSON)."""
    h = hashlib.sha256(b"fedkeys/secagg/v1/roster")
    h.update(struct.pack(">QQQQ", roster.round_id, roster.degree, roster.threshold, len(roster.devices)))
    for a in roster.devices:
        raw = a.device.encode()
        h.update(struct.pack(">QH", a.round_id, len(raw)) + raw + a.cipher_public_key + a.mask_public_key)
    return h.digest()


def _share_digests(round_id: int, owner: str, holder: str, x: int, b: bytes, k: bytes) -> tuple[bytes, bytes]:
    """The digests of the two share values ``owner`` gives ``holder`` (see EncryptedShare)."""
    return (
        crypto.share_digest(round_id, owner, holder, x, crypto.SHARE_SELF_MASK, b),
        crypto.share_digest(round_id, owner, holder, x, crypto.SHARE_KEY, k),
    )


class SecAggClient:
    """One device in one secure-aggregation round (Bonawitz et al. 2017, SecAgg+ graph).

    ``random_bytes`` is the source of all secret randomness (keys, seeds, Shamir
    coefficients, nonces): the OS CSPRNG by default; tests may inject a deterministic one.
    """

    def __init__(
        self,
        device: str,
        params: SecAggParams,
        *,
        random_bytes: RandomBytes = secrets.token_bytes,
    ) -> None:
        if params.threshold is not None and params.threshold < MIN_THRESHOLD:
            raise SecAggError(f"the plan's threshold {params.threshold} is below the minimum {MIN_THRESHOLD}")
        self._random = random_bytes
        self._s = _ClientState(
            device=device,
            params=params,
            cipher_private_key=random_bytes(crypto.KEY_BYTES),
            mask_private_key=random_bytes(crypto.KEY_BYTES),
            self_mask_seed=random_bytes(crypto.KEY_BYTES),
        )
        self._cipher = crypto.private_from_bytes(self._s.cipher_private_key)
        self._mask = crypto.private_from_bytes(self._s.mask_private_key)
        self._positions: dict[str, int] | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._s.device

    @property
    def stage(self) -> Stage:
        """The stage whose method is to be called next."""
        return self._s.stage

    def to_bytes(self) -> bytes:
        """The complete client state as JSON bytes (contains private keys)."""
        return self._s.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, random_bytes: RandomBytes = secrets.token_bytes) -> SecAggClient:
        try:
            state = _ClientState.model_validate_json(data)
        except ValidationError as e:
            raise SecAggError(f"invalid client state: {e}") from e
        self = cls.__new__(cls)
        self._random = random_bytes
        self._s = state
        self._cipher = crypto.private_from_bytes(state.cipher_private_key)
        self._mask = crypto.private_from_bytes(state.mask_private_key)
        self._positions = None
        return self

    def _expect(self, stage: Stage, what: str) -> None:
        if self._s.stage is not stage:
            raise StageError(stage, self._s.stage, what)

    def _index(self, device: str) -> int:
        """1-based roster position: the device's Shamir point and mask-sign order."""
        assert self._s.roster_digest is not None
        if self._positions is None:
            self._positions = {d: i + 1 for i, d in enumerate(self._s.roster_ids)}
        try:
            return self._positions[device]
        except KeyError:
            raise SecAggError(f"{device!r} is not in the roster") from None

    # -- stage 1 ---------------------------------------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """Stage 1: the two public keys of this round (the same message again if asked
        before the roster arrived: retries are idempotent)."""
        if self._s.stage is not Stage.SHARE_KEYS:
            self._expect(Stage.ADVERTISE_KEYS, "advertise_keys")
        self._s.stage = Stage.SHARE_KEYS
        return self._advertisement()

    def _pair_key(self, purpose: bytes, peer: str, public: bytes) -> bytes:
        """The HKDF key shared with ``peer`` (whose advertised key for ``purpose`` is ``public``)."""
        private = self._cipher if purpose == crypto.PURPOSE_ENCRYPT else self._mask
        try:
            return crypto.derive_pair_key(
                private,
                public,
                purpose=purpose,
                round_id=self._s.params.round_id,
                me=self._s.device,
                peer=peer,
            )
        except ValueError as e:
            raise SecAggError(str(e)) from e

    def _advertisement(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            round_id=self._s.params.round_id,
            device=self._s.device,
            cipher_public_key=crypto.public_from_private(self._cipher),
            mask_public_key=crypto.public_from_private(self._mask),
        )

    # -- stage 2 ---------------------------------------------------------------------------

    def share_keys(self, roster: ShareKeysRequest) -> ShareKeys:
        """Stage 2: Shamir-share ``b_u`` and ``s_u`` among the neighbours, each bundle
        encrypted for its recipient. Asked again with the same roster, returns the same
        message (idempotent retries)."""
        if self._s.stage is Stage.MASKED_INPUT and self._s.share_keys_response is not None:
            if _roster_digest(roster) == self._s.roster_digest:
                return self._s.share_keys_response
            raise SecAggError("already shared keys for a different roster in this round")
        self._expect(Stage.SHARE_KEYS, "share_keys")
        p = self._s.params
        if roster.round_id != p.round_id:
            raise SecAggError(f"roster is for round {roster.round_id}, not {p.round_id}")
        me = self._s.device
        mine = [a for a in roster.devices if a.device == me]
        if not mine or mine[0] != self._advertisement():
            raise SecAggError("the roster does not carry this device's advertised keys")
        keys = [a.cipher_public_key for a in roster.devices] + [a.mask_public_key for a in roster.devices]
        if len(set(keys)) != len(keys):
            raise SecAggError("the roster repeats a public key")
        degree, threshold = resolve_graph(p, len(roster.devices))
        if (roster.degree, roster.threshold) != (degree, threshold):
            raise SecAggError(
                f"roster says degree {roster.degree}, threshold {roster.threshold}; "
                f"the round parameters give {degree}, {threshold}"
            )
        ids = [a.device for a in roster.devices]
        self._s.roster_digest = _roster_digest(roster)
        self._s.roster_ids = ids
        self._positions = None
        neighbours = sorted(neighbours_of(me, ids, p.graph_seed, degree))
        entries = {v: roster.devices[self._index(v) - 1] for v in neighbours}
        for v, a in entries.items():  # the coordinator should have refused these already
            for key in (a.cipher_public_key, a.mask_public_key):
                try:
                    crypto.check_public_key(key)
                except ValueError as e:
                    raise SecAggError(f"the roster carries an invalid key of {v!r}: {e}") from None
        self._s.neighbours = neighbours
        self._s.mask_public_keys = {v: entries[v].mask_public_key for v in neighbours}

        # One share per neighbour plus one kept by the device itself (as in Flower): a
        # survivor reveals its own self-mask share, so it needs only t - 1 neighbours.
        xs = [self._index(v) for v in neighbours] + [self._index(me)]
        b_shares = shamir.split(self._s.self_mask_seed, xs, threshold, random_bytes=self._random)
        k_shares = shamir.split(self._s.mask_private_key, xs, threshold, random_bytes=self._random)
        self._s.own_share = _HeldShares(
            self_mask_share=shamir.share_to_bytes(b_shares[-1][1]),
            key_share=shamir.share_to_bytes(k_shares[-1][1]),
        )
        out = []
        for v, (x, yb), (_, yk) in zip(neighbours, b_shares[:-1], k_shares[:-1], strict=True):
            plain = SharePlaintext(
                round_id=p.round_id,
                sender=me,
                recipient=v,
                x=x,
                self_mask_share=shamir.share_to_bytes(yb),
                key_share=shamir.share_to_bytes(yk),
            )
            digests = _share_digests(p.round_id, me, v, x, plain.self_mask_share, plain.key_share)
            key = self._pair_key(crypto.PURPOSE_ENCRYPT, v, entries[v].cipher_public_key)
            self._s.cipher_keys[v] = key
            nonce = self._random(crypto.NONCE_BYTES)
            ct = crypto.encrypt_share(
                key,
                nonce,
                plain.model_dump_json().encode(),
                round_id=p.round_id,
                sender=me,
                recipient=v,
            )
            out.append(
                EncryptedShare(
                    sender=me,
                    recipient=v,
                    nonce=nonce,
                    ciphertext=ct,
                    self_mask_digest=digests[0],
                    key_digest=digests[1],
                )
            )
        response = ShareKeys(
            round_id=p.round_id,
            sender=me,
            self_mask_commitment=crypto.mask_commitment(p.round_id, me, self._s.self_mask_seed),
            own_share_digest=crypto.share_digest(
                p.round_id, me, me, self._index(me), crypto.SHARE_SELF_MASK, self._s.own_share.self_mask_share
            ),
            shares=tuple(out),
        )
        self._s.share_keys_response = response
        self._s.stage = Stage.MASKED_INPUT
        return response

    # -- stage 3 ---------------------------------------------------------------------------

    def masked_input(
        self,
        encoded_values: npt.ArrayLike,
        received_ciphertexts: Sequence[EncryptedShare] | MaskedInputRequest,
        *,
        overwrite: bool = False,
    ) -> npt.NDArray[np.uint32]:
        """Stage 3: ``y = x + PRG(b_u) + sum_v +-PRG(s_uv) mod 2**k`` over the neighbours
        whose shares arrived (exactly those completed stage 2). ``+`` when this device sorts
        before ``v`` in the roster, ``-`` otherwise, so the pairwise masks cancel in the sum.

        A new array by default; with ``overwrite`` (and ``encoded_values`` a uint32 array)
        ``y`` replaces ``x`` in place, which saves a vector and leaves no unmasked copy."""
        self._expect(Stage.MASKED_INPUT, "masked_input")
        p = self._s.params
        me = self._s.device
        if isinstance(received_ciphertexts, MaskedInputRequest):
            if received_ciphertexts.round_id != p.round_id:
                raise SecAggError("masked-input request is for another round")
            received: Sequence[EncryptedShare] = received_ciphertexts.shares
        else:
            received = received_ciphertexts
        x = check_ring_vector(encoded_values, p)
        _, threshold = resolve_graph(p, len(self._s.roster_ids))

        neighbours = set(self._s.neighbours)
        relayed: set[str] = set()
        omitted: list[str] = []
        held: dict[str, _HeldShares] = {}
        for enc in received:
            if enc.recipient != me:
                raise SecAggError(f"share addressed to {enc.recipient!r}, not {me!r}")
            if enc.sender not in neighbours:
                raise SecAggError(f"share from {enc.sender!r}, which is not a neighbour")
            if enc.sender in relayed:
                raise SecAggError(f"two shares from {enc.sender!r}")
            relayed.add(enc.sender)
            try:
                held[enc.sender] = self._open_share(enc)
            except SecAggError as e:
                # Treated as if the sender had dropped before sharing: no mask with it, nothing of
                # it held. The server learns whom this device omitted with its upload and drops
                # the sender (its input could not be unmasked against this one's).
                log.warning("round %d: omitting %r, whose share is unusable: %s", p.round_id, enc.sender, e)
                omitted.append(enc.sender)
        if len(held) < max(threshold - 1, 1):  # with its own share, t - 1 could still unmask it
            raise SecAggError(
                f"only {len(held)} neighbours of {me!r} completed key sharing with usable shares; "
                f"the threshold is {threshold}"
            )

        plus: list[bytes] = [self._s.self_mask_seed]
        minus: list[bytes] = []
        my_x = self._index(me)
        for v in sorted(held):
            seed = self._pair_key(crypto.PURPOSE_MASK, v, self._s.mask_public_keys[v])
            (plus if my_x < self._index(v) else minus).append(seed)
        in_place = overwrite and isinstance(x, np.ndarray) and x.dtype == np.uint32 and x.flags.writeable
        out = crypto.masked_vector(x, plus, minus, p.ring_bits, out=x if in_place else None)
        self._s.held = held
        self._s.omitted = sorted(omitted)
        self._s.stage = Stage.UNMASK
        return out

    def _open_share(self, enc: EncryptedShare) -> _HeldShares:
        """Decrypt and check one relayed share bundle (metadata and the sender's digests)."""
        p = self._s.params
        me = self._s.device
        try:
            raw = crypto.decrypt_share(
                self._s.cipher_keys[enc.sender],
                enc.nonce,
                enc.ciphertext,
                round_id=p.round_id,
                sender=enc.sender,
                recipient=me,
            )
            plain = SharePlaintext.model_validate_json(raw)
        except (crypto.DecryptionError, ValidationError) as e:
            raise SecAggError(f"undecryptable share bundle: {e}") from None
        my_x = self._index(me)
        if (plain.round_id, plain.sender, plain.recipient, plain.x) != (p.round_id, enc.sender, me, my_x):
            raise SecAggError("share bundle has wrong metadata")
        want = _share_digests(p.round_id, enc.sender, me, my_x, plain.self_mask_share, plain.key_share)
        if want != (enc.self_mask_digest, enc.key_digest):
            raise SecAggError("share bundle does not match the sender's digests")
        return _HeldShares(self_mask_share=plain.self_mask_share, key_share=plain.key_share)

    @property
    def omitted(self) -> list[str]:
        """Neighbours this device masked without (unusable shares): sent with its upload."""
        return list(self._s.omitted)

    # -- stage 4 ---------------------------------------------------------------------------

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> UnmaskResponse:
        """Stage 4: self-mask shares of surviving neighbours (and its own), key shares of
        dropped neighbours.

        Never both for one device: the answer is computed once and repeated verbatim for the
        same request (idempotent retries); a different request is refused.
        """
        p = self._s.params
        request = UnmaskRequest(round_id=p.round_id, survivors=tuple(survivors), dropped=tuple(dropped))
        if self._s.stage is Stage.DONE and self._s.unmask_response is not None:
            if self._s.unmask_request is not None and (
                set(request.survivors),
                set(request.dropped),
            ) == (set(self._s.unmask_request.survivors), set(self._s.unmask_request.dropped)):
                return self._s.unmask_response
            raise SecAggError("already answered a different unmask request in this round")
        self._expect(Stage.UNMASK, "unmask")
        me = self._s.device
        alive, gone = set(request.survivors), set(request.dropped)
        unknown = (alive | gone) - set(self._s.roster_ids)
        if unknown:
            raise SecAggError(f"unmask request names devices outside the roster: {sorted(unknown)[:5]}")
        if me not in alive:
            raise SecAggError(f"{me!r} sent its masked input but is not listed as a survivor")
        _, threshold = resolve_graph(p, len(self._s.roster_ids))
        if len(alive) < max(threshold, p.min_devices):
            raise SecAggError(
                f"only {len(alive)} survivors; revealing shares needs at least "
                f"{max(threshold, p.min_devices)}"
            )
        assert self._s.own_share is not None
        self_shares = [RevealedShare(owner=me, value=self._s.own_share.self_mask_share)]
        key_shares = []
        revealed: dict[str, Literal["self_mask", "key"]] = {me: "self_mask"}
        for owner in sorted(self._s.held):
            h = self._s.held[owner]
            if owner in alive:
                self_shares.append(RevealedShare(owner=owner, value=h.self_mask_share))
                revealed[owner] = "self_mask"
            elif owner in gone:
                key_shares.append(RevealedShare(owner=owner, value=h.key_share))
                revealed[owner] = "key"
        response = UnmaskResponse(
            round_id=p.round_id,
            sender=me,
            self_mask_shares=tuple(self_shares),
            key_shares=tuple(key_shares),
        )
        self._s.revealed = revealed
        self._s.unmask_request = request
        self._s.unmask_response = response
        self._s.stage = Stage.DONE
        return response

    def __repr__(self) -> str:
        s = self._s
        return f"SecAggClient({s.device!r}, round={s.params.round_id}, stage={s.stage.value})"
