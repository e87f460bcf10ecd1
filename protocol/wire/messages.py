"""JSON messages between devices and the coordinator, version 1 (served under ``/v1``).

Sections:

1. Versioning and the base error.
2. Secure aggregation: stage names, round parameters and one typed model per stage message
   (the stage-3 masked input is a binary update body: :mod:`protocol.wire.frame`).
3. HTTP API models (check-in, round plan, ...): added by the coordinator; keep them below.

Messages are pydantic models (``extra="forbid"``, frozen); bytes fields are base64 in JSON.
Every length is bounded so that oversize input is refused at parse time.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol._encoding import B64Bytes, Bytes12, Bytes32, DeviceId, RoundId
from protocol.codec import MAX_RING_BITS, CodecParams

__all__ = [
    "API_PREFIX",
    "MAX_DEVICES",
    "MAX_INT32",
    "MAX_REPORT_HEADER_BYTES",
    "REPORT_HEADER",
    "SECURE_ROUND",
    "WIRE_VERSION",
    "Action",
    "AdvertiseKeys",
    "ArtifactRef",
    "CheckinRequest",
    "CheckinResponse",
    "DeviceId",
    "DeviceOptimizer",
    "DeviceState",
    "EncryptedShare",
    "EnrollRequest",
    "EnrollResponse",
    "EvalCounts",
    "MaskedInputRequest",
    "Message",
    "Outcome",
    "RevealedShare",
    "RoundKind",
    "RoundPlan",
    "RoundStatus",
    "SecAggParams",
    "ShareKeys",
    "ShareKeysRequest",
    "SharePlaintext",
    "Stage",
    "TrainReport",
    "TrainingPlan",
    "UnmaskRequest",
    "UnmaskResponse",
    "WireError",
]

# ========================================================================================
# 1. Versioning and the base error
# ========================================================================================

WIRE_VERSION = 1
API_PREFIX = f"/v{WIRE_VERSION}"
REPORT_HEADER = "X-Fedkeys-Report"
"""The header an update upload carries its :class:`TrainReport` in (compact JSON): the report
travels with the update instead of in a request of its own (``POST .../report`` stays)."""
MAX_REPORT_HEADER_BYTES = 1024  # a TrainReport's JSON is about 120 bytes
MAX_DEVICES = 10_000  # largest roster a message may carry
MAX_INT32 = (1 << 31) - 1
"""Largest count a message may carry: the coordinator stores counts in 32-bit columns (a larger
one was a 500 on PostgreSQL, which checks the range)."""


class WireError(ValueError):
    """A message or update body that does not parse or does not match what was expected."""


class Message(BaseModel):
    """Base of every wire model: frozen, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ========================================================================================
# 2. Secure aggregation messages (protocol.secagg implements the stages)
# ========================================================================================


class Stage(StrEnum):
    """The one vocabulary of a round's stages, and of a participant's part in it.

    A round moves through its stages in this order, skipping those of other kinds: training with
    secure aggregation ``selecting -> advertise_keys -> share_keys -> masked_input -> unmask ->
    aggregating -> done``, training without it ``selecting -> upload -> aggregating -> done``,
    evaluation ``selecting -> evaluating -> done``. A participant's stage is the last one it
    completed (``advertise_keys`` to ``unmask``, ``upload``), or ``selected`` (none yet),
    ``evaluated`` or ``dropped`` (the round went on without it). The secure-aggregation state
    machines (protocol.secagg) use ``advertise_keys`` to ``done``.
    """

    SELECTING = "selecting"
    SELECTED = "selected"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UPLOAD = "upload"
    UNMASK = "unmask"
    EVALUATING = "evaluating"
    EVALUATED = "evaluated"
    AGGREGATING = "aggregating"
    DONE = "done"
    DROPPED = "dropped"


SECURE_ROUND: tuple[Stage, ...] = (
    Stage.SELECTING,
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.UNMASK,
    Stage.AGGREGATING,
    Stage.DONE,
)
"""The stages of a training round with secure aggregation, in order (what a device waits through)."""


class Action(StrEnum):
    """What a check-in tells a device to do."""

    RETRY = "retry"
    TRAIN = "train"
    EVALUATE = "evaluate"


class RoundKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"


class Outcome(StrEnum):
    """How a finished round ended."""

    COMMITTED = "committed"
    FAILED = "failed"


DeviceOptimizer = Literal["sgd", "adam"]
"""The optimizers a device runs on its live parameters (edge_client.runtime)."""


class SecAggParams(Message):
    """Per-round secure-aggregation settings, known to the server and every device (they are
    part of the round plan). ``degree``/``threshold`` ``None`` mean the defaults for the
    number of devices that advertised keys (see :mod:`protocol.secagg.graph`)."""

    round_id: RoundId
    vector_length: int = Field(ge=1, le=1 << 31)
    """Ring elements per input (``codec.encoded_length``)."""
    ring_bits: int = Field(ge=1, le=MAX_RING_BITS)
    """k: inputs and sums live in Z_(2**k) (``codec.ring_bits``)."""
    graph_seed: Bytes32
    """Seed of the neighbour graph (fresh per round)."""
    degree: int | None = Field(default=None, ge=1)
    threshold: int | None = Field(default=None, ge=1)
    min_devices: int = Field(default=2, ge=2)
    """Fewest devices that may start the protocol (fewer: the round fails)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the devices the default degree is sized to lose (``graph.degree_for_dropout``;
    0: the plain ``O(log n)`` default)."""


class AdvertiseKeys(Message):
    """Stage 1, device -> server: the device's two X25519 public keys for this round."""

    round_id: RoundId
    device: DeviceId
    cipher_public_key: Bytes32
    """``c_u``: key agreement for encrypting shares."""
    mask_public_key: Bytes32
    """``s_u``: key agreement for pairwise masks."""


class ShareKeysRequest(Message):
    """Stage 2, server -> every device: the roster of devices that advertised keys, sorted
    by id, with the graph parameters resolved for that roster size."""

    round_id: RoundId
    devices: tuple[AdvertiseKeys, ...] = Field(min_length=2, max_length=MAX_DEVICES)
    degree: int = Field(ge=1)
    threshold: int = Field(ge=1)

    @model_validator(mode="after")
    def _sorted_unique(self) -> ShareKeysRequest:
        ids = [a.device for a in self.devices]
        if ids != sorted(set(ids)):
            raise ValueError("roster must be sorted by device id without duplicates")
        if any(a.round_id != self.round_id for a in self.devices):
            raise ValueError("roster entry from another round")
        if self.threshold > self.degree:
            raise ValueError("threshold exceeds the degree")
        return self


class SharePlaintext(Message):
    """What one device tells one neighbour inside an AES-GCM ciphertext: its Shamir shares
    (at the recipient's point ``x``) of its self-mask seed ``b_u`` and of its mask private
    key ``s_u``."""

    round_id: RoundId
    sender: DeviceId
    recipient: DeviceId
    x: int = Field(ge=1, le=MAX_DEVICES)
    self_mask_share: Annotated[B64Bytes, Field(min_length=66, max_length=66)]
    key_share: Annotated[B64Bytes, Field(min_length=66, max_length=66)]


class EncryptedShare(Message):
    """A :class:`SharePlaintext` encrypted for its recipient (AES-256-GCM; the associated
    data binds round, sender and recipient). The server relays it without reading it.

    The two digests (``protocol.secagg.crypto.share_digest``) commit the sender to the share
    values inside: the recipient checks them when it decrypts, and the server checks every
    value the recipient reveals in the unmask stage against them."""

    sender: DeviceId
    recipient: DeviceId
    nonce: Bytes12
    ciphertext: Annotated[B64Bytes, Field(min_length=16, max_length=1024)]
    self_mask_digest: Bytes32
    key_digest: Bytes32


class ShareKeys(Message):
    """Stage 2, device -> server: one encrypted share bundle per neighbour, and a commitment
    to the self-mask seed (lets the server verify its reconstruction)."""

    round_id: RoundId
    sender: DeviceId
    self_mask_commitment: Bytes32
    own_share_digest: Bytes32
    """Digest of the self-mask share the sender keeps for itself (it reveals it if it survives)."""
    shares: tuple[EncryptedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _from_sender(self) -> ShareKeys:
        if any(s.sender != self.sender for s in self.shares):
            raise ValueError("every share must come from the message's sender")
        recipients = [s.recipient for s in self.shares]
        if len(set(recipients)) != len(recipients):
            raise ValueError("two shares for the same recipient")
        return self


class MaskedInputRequest(Message):
    """Stage 3, server -> device: the shares addressed to it by neighbours that completed
    stage 2. The device masks with exactly these senders."""

    round_id: RoundId
    recipient: DeviceId
    shares: tuple[EncryptedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _to_recipient(self) -> MaskedInputRequest:
        if any(s.recipient != self.recipient for s in self.shares):
            raise ValueError("every share must be addressed to the message's recipient")
        senders = [s.sender for s in self.shares]
        if len(set(senders)) != len(senders):
            raise ValueError("two shares from the same sender")
        return self


# Stage 3, device -> server, is a binary update body of kind RING (protocol.wire.frame).


class UnmaskRequest(Message):
    """Stage 4, server -> surviving devices: who sent a masked input (``survivors``) and who
    shared keys but did not (``dropped``)."""

    round_id: RoundId
    survivors: tuple[DeviceId, ...] = Field(min_length=1, max_length=MAX_DEVICES)
    dropped: tuple[DeviceId, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _disjoint(self) -> UnmaskRequest:
        s, d = set(self.survivors), set(self.dropped)
        if len(s) != len(self.survivors) or len(d) != len(self.dropped):
            raise ValueError("duplicate device ids")
        if s & d:
            raise ValueError(f"devices both survived and dropped: {sorted(s & d)[:5]}")
        return self


class RevealedShare(Message):
    """One Shamir share value of ``owner``'s secret, held by the responding device (its
    point ``x`` is the responder's roster index)."""

    owner: DeviceId
    value: Annotated[B64Bytes, Field(min_length=66, max_length=66)]


class UnmaskResponse(Message):
    """Stage 4, device -> server: self-mask shares of surviving neighbours and key shares of
    dropped neighbours; never both kinds for the same owner."""

    round_id: RoundId
    sender: DeviceId
    self_mask_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_DEVICES)
    key_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _never_both(self) -> UnmaskResponse:
        a = [s.owner for s in self.self_mask_shares]
        b = [s.owner for s in self.key_shares]
        if len(set(a)) != len(a) or len(set(b)) != len(b):
            raise ValueError("duplicate owners")
        if set(a) & set(b):
            raise ValueError("both shares revealed for the same device")
        return self


# ========================================================================================
# 3. HTTP API models (coordinator <-> device): added by the coordinator below this line.
# ========================================================================================


class DeviceState(Message):
    """What a device reports at check-in (never any text)."""

    charging: bool
    idle: bool
    unmetered: bool
    battery_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    free_storage_mb: float = Field(ge=0, allow_inf_nan=False)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    model_version: int | None = Field(default=None, ge=0)
    examples: int = Field(default=0, ge=0, le=MAX_INT32)
    """Messages in the device's local store (a count, no content)."""
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollRequest(Message):
    enrollment_secret: str = Field(min_length=1, max_length=256)
    platform: str = Field(min_length=1, max_length=64)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollResponse(Message):
    device_id: str
    token: str
    """256-bit bearer token; the coordinator keeps only its hash."""


class CheckinRequest(Message):
    state: DeviceState


class CheckinResponse(Message):
    """Either come back later (pace steering) or take part in a round."""

    action: Action
    retry_after: float | None = Field(default=None, ge=0)
    round_id: int | None = None
    task: str | None = None
    reason: str | None = Field(default=None, max_length=200)


class ArtifactRef(Message):
    """A file to download: where, how big, and its sha256 (also its ETag)."""

    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TrainingPlan(Message):
    optimizer: DeviceOptimizer
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    local_steps: int = Field(ge=1)
    """Cap on the round's optimizer steps (a device with much data stops there)."""
    max_seconds: float = Field(gt=0)
    max_examples: int = Field(ge=1)
    """Messages the device draws for the round, uniformly from its store (its newest, kept
    for evaluation, excepted)."""
    local_epochs: int | None = Field(default=None, ge=1)
    """Passes over the drawn messages (``local_steps`` still caps the steps); None: passes
    until ``local_steps``."""


class RoundPlan(Message):
    """Everything a selected device needs for one round."""

    round_id: int
    task: str
    kind: RoundKind
    model_version: int
    bundle: ArtifactRef
    """The bundle tarball (tokenizer, programs, layout) the weights belong to."""
    weights: ArtifactRef
    """The round's global weights: raw little-endian float32 in layout order."""
    predict: ArtifactRef | None = None
    """``predict.pte`` of ``model_version`` (evaluation rounds and suggestions)."""
    layout_hash: str
    training: TrainingPlan | None = None
    codec: CodecParams | None = None
    """``None``: plain float32 updates (no compression, no secure aggregation)."""
    secagg: SecAggParams | None = None
    stage_deadline: float
    """Unix time at which the current stage closes."""


class RoundStatus(Message):
    round_id: int
    stage: Stage
    stage_deadline: float
    participant_stage: Stage | None = None
    """The last stage this device completed; ``dropped`` when the round went on without it."""
    outcome: Outcome | None = None
    new_version: int | None = None
    retry_after: float = Field(ge=0)
    # The stage's message for this device, when the poll asked for it (``payload=true``) and
    # the device has its part to play there: the poll that learns of the stage brings what the
    # device would otherwise fetch next (GET .../roster, .../secagg/shares, .../secagg/unmask,
    # which stay for devices that do not ask), a request fewer per stage.
    roster: ShareKeysRequest | None = None
    shares: MaskedInputRequest | None = None
    unmask: UnmaskRequest | None = None


_MAX_TOKEN_LOSS = 10_000.0  # nats per token: far past any model that is scored at all


class TrainReport(Message):
    """Scalar metrics of local training (never text)."""

    loss_before: float = Field(ge=0, le=_MAX_TOKEN_LOSS, allow_inf_nan=False)
    loss_after: float = Field(ge=0, le=_MAX_TOKEN_LOSS, allow_inf_nan=False)
    examples: int = Field(ge=0, le=MAX_INT32)
    steps: int = Field(ge=0, le=MAX_INT32)
    seconds: float = Field(ge=0, le=1e7, allow_inf_nan=False)
    aborted: bool = False


_MAX_EVAL_COUNT = 10_000_000  # words or tokens one device scores (int4 columns hold 2**31 - 1)


class EvalCounts(Message):
    """Federated evaluation: counts over the device's recent messages, nothing else.

    Bounded as a device could plausibly send them (it scores its ``eval_holdout`` newest
    messages, 20 by default: a few thousand words) and well inside the 32-bit integer columns
    that store them (past 2**31 - 1 PostgreSQL refused the insert: a 500). The loss is summed
    over the tokens, so it is bounded per token: the round's sum over every device stays
    finite."""

    words: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    top1: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    top3: int = Field(ge=0, le=_MAX_EVAL_COUNT)
    loss_sum: float = Field(ge=0, le=_MAX_EVAL_COUNT * _MAX_TOKEN_LOSS, allow_inf_nan=False)
    tokens: int = Field(ge=0, le=_MAX_EVAL_COUNT)

    @model_validator(mode="after")
    def _bounded(self) -> EvalCounts:
        if not self.top1 <= self.top3 <= self.words:
            raise ValueError("need top1 <= top3 <= words")
        if self.loss_sum > self.tokens * _MAX_TOKEN_LOSS:
            raise ValueError(f"need loss_sum <= {_MAX_TOKEN_LOSS:g} * tokens")
        return self
