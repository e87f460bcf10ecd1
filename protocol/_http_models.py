"""Staging area for section 4 of protocol/wire.py (merged there once wire.py settles)."""

from __future__ import annotations

from pydantic import Field, model_validator

from protocol.codec import CodecParams
from protocol.wire import SecAggParams, _Message

# ========================================================================================
# 4. HTTP API models (device side of /v1; the admin API's models live in the coordinator)
# ========================================================================================


class DeviceState(_Message):
    """What a device reports at check-in (never any text)."""

    charging: bool
    idle: bool
    unmetered: bool
    battery_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    free_storage_mb: float = Field(ge=0, allow_inf_nan=False)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    model_version: int | None = Field(default=None, ge=0)
    examples: int = Field(default=0, ge=0, le=1 << 31)
    """Messages in the device's local store (a count, no content)."""
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollRequest(_Message):
    enrollment_secret: str = Field(min_length=1, max_length=256)
    platform: str = Field(min_length=1, max_length=64)
    client_version: str = Field(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$", max_length=32)
    device_class: str = Field(default="unknown", pattern=r"^[a-z0-9_-]{1,32}$")


class EnrollResponse(_Message):
    device_id: str
    token: str
    """256-bit bearer token; the coordinator keeps only its hash."""


class CheckinRequest(_Message):
    state: DeviceState


class CheckinResponse(_Message):
    """Either come back later (pace steering) or take part in a round."""

    action: str = Field(pattern=r"^(retry|train|evaluate)$")
    retry_after: float | None = Field(default=None, ge=0)
    round_id: int | None = None
    task: str | None = None
    reason: str | None = Field(default=None, max_length=200)


class ArtifactRef(_Message):
    """A file to download: where, how big, and its sha256 (also its ETag)."""

    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TrainingPlan(_Message):
    optimizer: str = Field(pattern=r"^(sgd|adam)$")
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    local_steps: int = Field(ge=1)
    max_seconds: float = Field(gt=0)
    max_examples: int = Field(ge=1)


class RoundPlan(_Message):
    """Everything a selected device needs for one round."""

    round_id: int
    task: str
    kind: str = Field(pattern=r"^(train|evaluate)$")
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


class RoundStatus(_Message):
    round_id: int
    stage: str
    stage_deadline: float
    participant_stage: str | None = None
    """The last stage this device completed; ``dropped`` when the round went on without it."""
    outcome: str | None = None
    new_version: int | None = None
    retry_after: float = Field(ge=0)


class TrainReport(_Message):
    """Scalar metrics of local training (never text)."""

    loss_before: float = Field(allow_inf_nan=False)
    loss_after: float = Field(allow_inf_nan=False)
    examples: int = Field(ge=0)
    steps: int = Field(ge=0)
    seconds: float = Field(ge=0, allow_inf_nan=False)
    aborted: bool = False


class EvalCounts(_Message):
    """Federated evaluation: counts over the device's recent messages, nothing else."""

    words: int = Field(ge=0)
    top1: int = Field(ge=0)
    top3: int = Field(ge=0)
    loss_sum: float = Field(ge=0, allow_inf_nan=False)
    tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> EvalCounts:
        if not self.top1 <= self.top3 <= self.words:
            raise ValueError("need top1 <= top3 <= words")
        return self
