"""The configuration of a simulated run: :class:`SimConfig`, one row of a comparison, and the
coordinator task configuration it asks for (:meth:`SimConfig.task_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.schemas import CodecSettings, DeadlineSettings, TaskConfig

__all__ = [
    "FINAL_MESSAGES",
    "LOCAL_EPOCHS",
    "POPULATION_WEIGHT_CAP",
    "SIM_CODEC",
    "SimConfig",
    "population",
    "quick",
]

SIM_CODEC = CodecSettings(keep_fraction=1 / 16, bits=5, clip_norm=2.0)
"""The simulator's codec: 1/16 of the (block-rotated) coordinates at 5 bits, 9-bit ring elements
for 13 inputs, about 55x fewer bytes than a dense float32 update; FedAdam absorbs the
subsampling noise (in the emulation of bench/fl_tuning.py it ended level with float32 FedAdam,
FedAvgM 1.9% below). The rest are the task defaults (protocol.codec.CodecSettings)."""

LOCAL_EPOCHS = 2
"""Local passes over the messages a device draws for a round (the demo's and population runs'),
so a device with little data does little work and one with much data stops at the
``local_steps`` cap (without a pass limit a 25-message device would loop over its messages until
the cap, as many steps as the heaviest). Two passes rather than one: at 100 devices per round
the rounds' fixed cost (selection, key agreement, unmasking: about 40 s here) would otherwise
outweigh their training (McMahan et al. 2017 use 1 to 20 local epochs)."""


POPULATION_WEIGHT_CAP = 128
"""The example-count weight cap of a population run: the most messages a round's local work can
reach (32 steps of 4 rows), so that a device's say follows the data it trained on (20 to 128
messages here) rather than saturating at the codec's default of 16. It widens the ring of 130
inputs from 12 to 15 bits (upload 33x below dense float32 instead of 42x). In the emulation of
bench/fl_tuning.py (12 rounds of 100 devices, 2,000 heldout messages) example weights lowered
heldout perplexity per piece from 68.8-68.9 to 68.2-68.3 with or without compression; top-1 moved
within its noise (bench/RESULTS.md, "Example weights at population scale")."""


FINAL_MESSAGES = 2000
"""Heldout messages that score the pretrained student and a plain run's last version (``fedkeys
simulate`` without a comparison): on chitchat about 20,000 next-word targets, so a lift of 0.3
points of top-1 clears its paired 95% interval (half-width about 0.25 points for lifts of this
size; 300 messages, the curves' evaluations, leave about 0.7)."""


@dataclass(frozen=True)
class SimConfig:
    """One configuration of a simulated run (one row of a comparison)."""

    name: str = "secure"
    # The demo fleet (``make demo``): 300 of the 473 participants with 25+ messages, 30 reports a
    # round, 15 rounds of up to 16 steps (two passes over a round's draw), FedAdam 3e-3. Chosen
    # by bench/fl_tuning.py (grid demo-cohort, bench/RESULTS.md "The demo's fleet"): the earlier
    # 100 devices, 10 a round, 30 rounds of 10 steps at 1e-3 lifted top-1 by +0.2 points, below
    # what its heldout sample could separate; this fleet by +0.53 [+0.29, +0.79] on 2,000
    # messages in the same device-steps. A cohort of 30 cannot come from 100 devices: 40-65% of
    # them charge at night, and a round's devices sit out the next one.
    devices: int = 300
    per_round: int = 30
    rounds: int = 15
    secagg: bool = True
    codec: CodecSettings = SIM_CODEC
    optimizer: str = "sgd"  # device optimizer
    client_lr: float = 0.1
    local_steps: int = 16
    max_examples: int = 400
    server_optimizer: str = "fedadam"
    server_lr: float = 3e-3
    server_momentum: float = 0.9  # FedAvgM only
    server_schedule: str = "constant"  # or "cosine": from server_lr to a tenth over the rounds
    over_selection: float = 1.3
    min_reports: int = 5
    dropout: float = 0.08
    # 40 real minutes per simulated day, from 23:00: the demo's 15 rounds (~6 minutes) run
    # through one simulated night, when 40-65% of the devices charge; --day-seconds 600 shows a
    # whole day (and its 4x swing) in 10 minutes, but rounds then find few devices by day
    day_seconds: float = 2400.0
    start_hour: float = 23.0
    # a selection closes once its pool is full; its deadline only matters when few devices are
    # eligible (6 s failed rounds in a row before the pool could fill). The upload stage (local
    # training included) closes at its per_round-th upload, 8-12 s into it here; its deadline
    # is for slower machines: at half this machine's speed the stage takes 25-35 s, and with
    # 30 s the demo lost 6 of 21 rounds (bench/RESULTS.md, "The demo on a slower machine")
    deadlines: DeadlineSettings = field(
        default_factory=lambda: DeadlineSettings(
            selection=20.0, advertise=6.0, share=6.0, upload=60.0, unmask=8.0
        )
    )
    seed: int = 0
    eval_every: int = 5  # heldout evaluation of every 5th version (and the last)
    eval_messages: int = 300  # each evaluation over rounds (the curves): a nested subsample of
    # the final sample, whose messages score the pretrained student and the last version at the
    # end of a plain run (the summary table and its verdict; see FINAL_MESSAGES)
    final_messages: int = FINAL_MESSAGES
    noop_training: bool = False
    workers: int = 0  # 0 = one per core, and one per DEVICES_PER_WORKER devices beyond that
    ray_address: str | None = None  # "local" or ray://host:port
    max_minutes: float = 60.0
    # differential privacy (coordinator PrivacySettings): "off", "central" or "distributed";
    # the fleet is the population the accountant samples from, delta = 1/devices**1.1
    privacy: str = "off"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    adaptive_clip: bool = False
    selection: str = "least-recent"  # coordinator SelectionSettings.strategy
    speed_sigma: float = 0.5  # spread of device speeds (simulator.fleet.make_specs)
    # the corpus whose federated participants the devices stand for and whose heldout
    # participants evaluate (model_export.data.load_corpus: None = chitchat, a .jsonl file or a
    # folder of texts), and whether every one of them is a device (``devices`` is then their
    # number: simulator.fleet.fleet_specs)
    corpus: str | None = None
    population: bool = False
    local_epochs: int | None = LOCAL_EPOCHS  # passes over a round's draw; None: until local_steps
    min_examples: int = 20  # local messages before a device volunteers (task eligibility)

    def privacy_config(self) -> dict[str, Any]:
        if self.privacy == "off":
            return {"mode": "off"}
        return {
            "mode": self.privacy,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "population": self.devices,
            "adaptive_clip": self.adaptive_clip,
        }

    def with_codec(self, **changes: Any) -> SimConfig:
        """This configuration with some codec settings changed (validated)."""
        return replace(self, codec=CodecSettings.model_validate({**self.codec.model_dump(), **changes}))

    def privacy_run(self, epsilon: float) -> SimConfig:
        """A privacy sweep's run at ``epsilon`` (``inf``: the same configuration without noise).
        Every run weighs devices equally (weight_cap 1, which DP needs) so that only the noise
        differs between them."""
        private = math.isfinite(epsilon)
        return replace(
            self.with_codec(weight_cap=1),
            name=f"{self.privacy}-eps{epsilon:g}" if private else "non-private",
            privacy=self.privacy if private else "off",
            target_epsilon=epsilon if private else None,
        )

    def task_config(self) -> TaskConfig:
        """The coordinator task this run asks for: the task defaults with the run's overrides."""
        return TaskConfig.model_validate(
            {
                "clients_per_round": self.per_round,
                "over_selection": self.over_selection,
                "min_reports": min(self.min_reports, self.per_round),
                "cooldown_rounds": 1,
                "selection_pool": 1.0,
                "eligibility": {"min_examples": self.min_examples, "min_battery_pct": 20},
                "training": {
                    "optimizer": self.optimizer,
                    "lr": self.client_lr,
                    "local_steps": self.local_steps,
                    "max_seconds": 60.0,
                    "max_examples": self.max_examples,
                    "local_epochs": self.local_epochs,
                },
                "codec": self.codec,
                "secagg": {"enabled": self.secagg},
                "server_optimizer": {
                    "name": self.server_optimizer,
                    "lr": self.server_lr,
                    "momentum": self.server_momentum,
                    "schedule": self.server_schedule,
                },
                "deadlines": self.deadlines,
                "privacy": self.privacy_config(),
                "selection": {"strategy": self.selection},
                "max_rounds": self.rounds,
            }
        )


def quick(cfg: SimConfig) -> SimConfig:
    """``fedkeys simulate --quick``: a first look, 30 devices, 6 per round, 8 rounds.

    It starts at 01:00 simulated: at 23:00 only 8 of the 30 devices are eligible (the
    availability traces, simulator.availability), exactly one round's selection (6 x 1.3), and
    a round's devices sit out the next one, so every other round failed for want of devices
    ("only 0-2 eligible devices checked in"); from 01:00 to 04:00 15-18 are. On the demo
    student (2026-12-03) all 8 rounds then committed and heldout perplexity per piece fell at
    every evaluation (76.9, 76.5, 75.8, 75.2, 75.0); top-1 on its 150 messages (1,698 words)
    moves by a few words either way (+0.41 points, 95% interval [-0.17, +1.00]), which the run's
    closing sentence says (``simulator.cli.verdict``).
    """
    return replace(
        cfg,
        devices=30,
        per_round=6,
        rounds=8,
        eval_every=2,
        eval_messages=150,
        final_messages=150,
        local_steps=10,  # the local work and server step it was measured with (below)
        local_epochs=None,
        server_lr=1e-3,
        min_reports=4,
        start_hour=1.0,
    )


POPULATION_DAY_SECONDS_PER_ROUND = 600.0
"""Real seconds of a population run's simulated day per round it asks for (see ``population``)."""


def population(cfg: SimConfig, *, per_round: int | None, rounds: int | None) -> SimConfig:
    """``fedkeys simulate --population``: every federated participant is a device (``devices``
    is set from the corpus later), 100 reports per round, 12 rounds unless asked otherwise.

    Deadlines grow with the round: 130 selected devices train on the machine's few cores at
    once (a round's local training takes 1-3 minutes of wall time here, not the 8 s of a demo
    device), and their key agreement takes 2-7 s on two cores, the demo's whole 6 s deadline.
    The upload stage still closes at its 100th upload. The server step is FedAdam at 1e-2,
    the rate Reddi et al. 2021 ("Adaptive Federated Optimization") found best for Stack
    Overflow next-word prediction at 50 clients per round: the mean of 100 updates is ten times
    less noisy (in variance) than the demo's 10, and over 12 rounds 1e-3 (the 10-device
    default) moves each weight at most 0.012. Measured at this scale (bench/RESULTS.md), the
    secure run's heldout top-1 after 8 rounds rose +0.57 points at 1e-2 against +0.38 at 3e-3.

    Devices weigh by the messages they trained on up to POPULATION_WEIGHT_CAP (the codec's
    default of 16 weighs nearly every population device the same)."""
    rounds = 12 if rounds is None else rounds
    return replace(
        cfg.with_codec(weight_cap=POPULATION_WEIGHT_CAP),
        per_round=100 if per_round is None else per_round,
        rounds=rounds,
        population=True,
        local_steps=32,
        server_lr=1e-2,
        min_reports=50,
        start_hour=0.0,
        # a simulated day of 600 real seconds per round (at least 100 minutes): rounds of about
        # 100 s then take 4 simulated hours in all, within the night (00:00-05:00, when most
        # devices charge). At the demo's 40 minutes a day the run reached 09:30 by its 7th
        # round, and rounds that long then lost their devices to the morning; a fixed 100
        # minutes a day would have taken a 40-round run to noon.
        day_seconds=max(6000.0, POPULATION_DAY_SECONDS_PER_ROUND * rounds),
        deadlines=DeadlineSettings(selection=30.0, advertise=15.0, share=15.0, upload=180.0, unmask=20.0),
        max_minutes=120.0,
    )
