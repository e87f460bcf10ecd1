"""Admin API models: task configuration and the read models of tasks, rounds and versions.

Device-facing request/response models are part of the contract and live in
``protocol/wire.py``; these are the operator's side only.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol import codec
from protocol.dp import Adjacency
from protocol.secagg.common import MIN_DEVICES, MIN_THRESHOLD

__all__ = [
    "CodecSettings",
    "DeadlineSettings",
    "EligibilityPolicy",
    "PrivacySettings",
    "PrivacyStatus",
    "RoundPublic",
    "SecAggSettings",
    "SelectionBucket",
    "SelectionSettings",
    "SelectionStats",
    "ServerOptimizer",
    "TaskConfig",
    "TaskCreate",
    "TaskPublic",
    "TaskUpdate",
    "TrainingSettings",
    "VersionPublic",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EligibilityPolicy(_Model):
    """Which devices may take part (Bonawitz et al. 2019: idle, charging, unmetered)."""

    require_charging: bool = True
    require_idle: bool = True
    require_unmetered: bool = True
    min_battery_pct: float = Field(default=50.0, ge=0, le=100)
    min_free_storage_mb: float = Field(default=200.0, ge=0)
    min_examples: int = Field(default=20, ge=0)  # local messages before a device volunteers
    min_client_version: str = "0.1.0"
    device_classes: list[str] | None = None  # population filter; None = all classes


class TrainingSettings(_Model):
    """What each selected device runs on its own data."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.05, gt=0, le=10)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    local_steps: int = Field(default=20, ge=1, le=10_000)  # cap on a round's local steps
    max_seconds: float = Field(default=120.0, gt=0)  # wall-clock budget of local training
    max_examples: int = Field(default=2000, ge=1)  # messages drawn at random per round
    local_epochs: int | None = Field(default=None, ge=1)  # passes over them; None: until the cap


class CodecSettings(codec.CodecSettings):
    """The codec's knobs (protocol.codec.CodecSettings, declared there) and ``compress``:
    ``False`` sends plain float32 updates (no quantization; the coordinator clips them to
    ``clip_norm`` and caps their weights at ``weight_cap``; secure aggregation needs
    compression). The round adds its size and seed."""

    compress: bool = True


class SecAggSettings(_Model):
    enabled: bool = True
    neighbours: int | None = Field(default=None, ge=1)  # SecAgg+ degree k; None = sized for dropout
    threshold: int | None = Field(default=None, ge=1)  # t per neighbourhood; None = default
    # fraction of the devices that advertised keys the default degree is sized to lose, so that
    # dropped devices keep t surviving neighbours (None: over-selection's surplus + 10%)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)

    def check(self, min_reports: int) -> None:
        """Refuse settings below the protocol's safety floors (protocol.secagg.common; devices
        enforce them too, so a round with such settings could never complete anyway)."""
        if min_reports < MIN_DEVICES:
            raise ValueError(f"secure aggregation needs min_reports >= {MIN_DEVICES}")
        if self.threshold is not None and self.threshold < MIN_THRESHOLD:
            raise ValueError(f"secagg.threshold must be at least {MIN_THRESHOLD}")
        if self.threshold is not None and self.neighbours is not None:
            k = self.neighbours + self.neighbours % 2  # the degree is rounded up to even
            if not k < 2 * self.threshold <= 2 * k:
                raise ValueError(
                    f"secagg.threshold {self.threshold} must be a strict majority of the {k} neighbours"
                )

    def design_dropout(self, over_selection: float) -> float:
        """The loss the neighbour graph is sized for: a round selects ``over_selection`` times
        its target and stops collecting at the target, so the surplus is lost by design, plus
        the 6-10% that production fleets lose on their own."""
        if self.dropout is not None:
            return self.dropout
        return min(0.5, 1.0 - 1.0 / over_selection + 0.1)


class ServerOptimizer(_Model):
    """FedAvg (McMahan 2017), FedAvgM (Hsu 2019), FedAdam (Reddi 2021)."""

    name: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # FedAvgM
    beta1: float = Field(default=0.9, ge=0, lt=1)  # FedAdam
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)  # FedAdam adaptivity
    # The step's size over the task's rounds: "cosine" anneals it from ``lr`` to
    # ``final_lr_fraction * lr`` over ``schedule_rounds`` server steps (None: the task's
    # max_rounds) and holds it there (coordinator.optimizers.scheduled_lr)
    schedule: Literal["constant", "cosine"] = "constant"
    final_lr_fraction: float = Field(default=0.1, gt=0, le=1)
    schedule_rounds: int | None = Field(default=None, ge=1)


class PrivacySettings(_Model):
    """User-level differential privacy (protocol.dp, coordinator.dp_plan).

    ``central``: the coordinator adds Gaussian noise to the unmasked sum. ``distributed``: each
    device adds discrete Gaussian noise before masking (needs secure aggregation), so the
    coordinator never holds a less noisy value. The noise multiplier is given, or calibrated
    from ``target_epsilon`` over ``max_rounds``; with a target, a round that would exceed it
    is not started.
    """

    mode: Literal["off", "central", "distributed"] = "off"
    noise_multiplier: float | None = Field(default=None, gt=0, le=1000)
    target_epsilon: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)  # None = 1 / population**1.1
    population: int | None = Field(default=None, ge=1)
    """Devices the task may draw from: the accountant's sampling rate is the selected share of
    it (an approximation: selection is not Poisson, and the coordinator knows the cohort; see
    coordinator.dp_plan). None = no amplification by sampling."""
    adjacency: Adjacency = "replace-one"
    """Which rounds are neighbours, and so the sensitivity the noise is calibrated to
    (protocol.dp). ``replace-one``: same cohort, one device's data replaced; sensitivity
    ``2 Delta`` (``Delta`` bounds one device's quantized update). The honest relation here: the
    coordinator knows which devices were selected and reported, so only the cohort's contents
    are private. ``add-remove``: one device more or less; sensitivity ``Delta``, half the noise
    for the same epsilon. Honest only towards observers who learn neither who nor how many took
    part (the DP-FedAvg setting of McMahan et al. 2018: secret Poisson sampling, a fixed
    denominator); use it to compare with epsilons published under that relation."""
    adaptive_clip: bool = False  # Andrew et al. 2021: move clip_norm to a quantile of the norms
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_lr: float = Field(default=0.2, ge=0, le=10)
    count_noise: float | None = Field(default=None, gt=0)  # None = clients_per_round / 20

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


class SelectionSettings(_Model):
    """Which of the eligible devices that checked in a round takes (coordinator.selection)."""

    strategy: Literal["random", "least-recent", "oort"] = "least-recent"
    exploration: float = Field(default=0.2, ge=0, le=1)  # oort: share of slots for unseen devices
    speed_penalty: float = Field(default=2.0, ge=0, le=10)  # oort: alpha
    preferred_seconds: float | None = Field(default=None, gt=0)  # oort: T; None = median
    min_weight: float = Field(default=0.01, gt=0, le=1)  # oort: fairness floor of the weights
    stratum: Literal["none", "data_bucket", "device_class"] = "none"
    max_share: float = Field(default=1.0, gt=0, le=1)  # cap per stratum (share of the slots)


class DeadlineSettings(_Model):
    """Seconds each stage may take before the round moves on without the stragglers."""

    selection: float = Field(default=30.0, gt=0)
    advertise: float = Field(default=30.0, gt=0)
    share: float = Field(default=30.0, gt=0)
    upload: float = Field(default=300.0, gt=0)  # includes local training
    unmask: float = Field(default=30.0, gt=0)
    # Stragglers in the key-agreement stages (advertise, share): once ``quorum`` of the live
    # participants answered and nobody else did for ``quiet_seconds``, the stage closes without
    # the rest (over-selection already paid for them) instead of waiting out its deadline.
    # A dropped device costs nothing there: it has no masks in anyone's input yet. 0 = off.
    # The default quorum is about 1 / over-selection: as many as the round selected for.
    quorum: float = Field(default=0.75, gt=0, le=1)
    quiet_seconds: float = Field(default=2.0, ge=0)


class TaskConfig(_Model):
    clients_per_round: int = Field(default=10, ge=1, le=10_000)  # K: reports to close a round
    over_selection: float = Field(default=1.3, ge=1.0, le=5.0)
    min_reports: int = Field(default=3, ge=1)  # fewer by the deadline: the round fails
    cooldown_rounds: int = Field(default=1, ge=0)  # rounds a device sits out after taking part
    eligibility: EligibilityPolicy = Field(default_factory=EligibilityPolicy)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)
    server_optimizer: ServerOptimizer = Field(default_factory=ServerOptimizer)
    deadlines: DeadlineSettings = Field(default_factory=DeadlineSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    max_rounds: int | None = Field(default=None, ge=1)  # pause after this many committed training rounds
    eval_every_rounds: int = Field(default=0, ge=0)  # 0 = no federated evaluation rounds
    eval_clients: int = Field(default=10, ge=1)

    selection_pool: float = Field(default=2.0, ge=1.0, le=20.0)
    """Selection closes early once this many times the target have checked in (the pool from
    which the least recently selected are taken); otherwise at the selection deadline."""

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if self.min_reports > self.clients_per_round:
            raise ValueError("min_reports cannot exceed clients_per_round")
        if self.secagg.enabled and not self.codec.compress:
            raise ValueError("secure aggregation needs codec.compress (ring-encoded updates)")
        if self.secagg.enabled:
            self.secagg.check(self.min_reports)
        if self.codec.compress:  # the round's sum must fit the ring (noise is checked per round)
            codec.ring_bits(
                codec.CodecParams(
                    **self.codec.model_dump(exclude={"compress"}),
                    max_clients=self.selection_size,
                    seed=bytes(32),
                )
            )
        dp = self.privacy
        if dp.enabled:
            if not self.codec.compress:
                raise ValueError("differential privacy needs codec.compress (clipped updates)")
            if self.codec.weight_cap != 1:
                raise ValueError(
                    "differential privacy weighs devices equally: set codec.weight_cap to 1 "
                    "(example-count weights would need noise of their own)"
                )
            if self.eligibility.min_examples < 1:
                raise ValueError(
                    "differential privacy needs eligibility.min_examples >= 1 (the weight slot is not "
                    "noised: a device with no examples would stand out)"
                )
            if dp.mode == "distributed" and not self.secagg.enabled:
                raise ValueError("distributed DP needs secure aggregation (secagg.enabled)")
            if dp.noise_multiplier is None and (dp.target_epsilon is None or self.max_rounds is None):
                raise ValueError("privacy needs noise_multiplier, or target_epsilon and max_rounds")
            if dp.delta is None and dp.population is None:
                raise ValueError("privacy needs delta or population (delta = 1/population**1.1)")
        opt = self.server_optimizer
        if opt.schedule != "constant" and opt.schedule_rounds is None and self.max_rounds is None:
            raise ValueError(
                f"server_optimizer.schedule {opt.schedule} needs server_optimizer.schedule_rounds "
                "or max_rounds"
            )
        return self

    @property
    def schedule_rounds(self) -> int | None:
        """Server steps the server optimizer's schedule runs over (None: constant)."""
        opt = self.server_optimizer
        if opt.schedule == "constant":
            return None
        return opt.schedule_rounds or self.max_rounds

    @property
    def selection_size(self) -> int:
        """Devices a training round selects: clients_per_round with over-selection."""
        return math.ceil(self.clients_per_round * self.over_selection)


class TaskCreate(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    config: TaskConfig = Field(default_factory=TaskConfig)


class TaskUpdate(_Model):
    config: TaskConfig


class PrivacyStatus(BaseModel):
    """The privacy budget of a DP task: what has been spent and what the next round costs."""

    mode: str
    noise_multiplier: float  # joint multiplier of each round (update and clip count)
    sampling_rate: float
    delta: float
    epsilon_spent: float
    rounds_charged: int  # rounds whose noisy sum the coordinator could compute
    target_epsilon: float | None
    epsilon_after_next_round: float
    exhausted: bool


class SelectionBucket(BaseModel):
    stratum: str  # "data_bucket" (log2 of local examples) or "device_class"
    value: str
    devices: int  # enrolled devices in this bucket
    devices_selected: int  # of them, selected at least once by this task
    selections: int  # selections of devices in this bucket by this task


class SelectionStats(BaseModel):
    strategy: str
    rounds: int
    buckets: list[SelectionBucket]


class TaskPublic(BaseModel):
    name: str
    status: str
    status_reason: str | None = None
    current_version: int | None
    rounds_started: int
    config: TaskConfig
    created_at: datetime
    privacy: PrivacyStatus | None = None


class RoundPublic(BaseModel):
    id: int  # what devices see as round_id
    number: int  # 1, 2, ... within the task
    kind: str
    stage: str
    outcome: str | None
    failure_reason: str | None
    base_version: int
    new_version: int | None
    selection_target: int
    selected: int
    reported: int
    bytes_in: int
    bytes_out: int
    created_at: datetime
    finished_at: datetime | None
    metrics: dict[str, Any]


class VersionPublic(BaseModel):
    version: int
    source: str
    round_number: int | None
    parent_version: int | None
    created_at: datetime
    weights_sha256: str
    predict_published: bool
    metrics: dict[str, Any]
