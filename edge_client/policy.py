"""What a device lets leave it, whatever a round's plan asks (the device's own safety floor).

A coordinator could ask for more than it needs: a plan without secure aggregation, plain
float32 updates, per-device training losses. :class:`DevicePolicy` is checked by the device
before it sends anything of a round, so a misconfigured or curious coordinator gets a refusal,
not the data. Real devices run the strict defaults; the simulator relaxes
``require_secure_aggregation`` for the comparisons that need unmasked runs.

Metrics under ``private_metrics``: a training report carries the losses before and after
training stochastically rounded to multiples of :data:`LOSS_STEP` (unbiased, so means over
devices stay right; oort's utility uses the first), the example count and steps rounded down to
a power of two (a check-in already tells the count's bit length), and whole seconds (the
coordinator sees the round's timing anyway); evaluation counts are rescaled to
:data:`EVAL_WORDS` words with top-1/top-3 hits and the loss stochastically rounded the same way.
What each reveals is listed in the README's security section.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from protocol.wire import EvalCounts, RoundKind, RoundPlan, TrainReport

__all__ = [
    "EVAL_WORDS",
    "LOSS_STEP",
    "DevicePolicy",
    "PolicyRefusal",
    "bucket_eval_counts",
    "bucket_train_report",
]

LOSS_STEP = 0.25
"""Nats: a private training report's loss is a multiple of this."""
EVAL_WORDS = 16
"""A private evaluation report speaks for this many words (hits rescaled and rounded)."""


class PolicyRefusal(Exception):
    """The plan asks for something this device's policy does not allow."""


@dataclass(frozen=True)
class DevicePolicy:
    require_secure_aggregation: bool = True
    """Take part in training rounds only with secure aggregation: no update leaves the device
    unmasked, and no raw float32 update at all."""
    private_metrics: bool = True
    """Round training and evaluation metrics before sending them (see the module doc)."""

    def check_plan(self, plan: RoundPlan) -> None:
        """Refuse (:class:`PolicyRefusal`) a training plan this device may not follow."""
        if plan.kind != RoundKind.TRAIN or not self.require_secure_aggregation:
            return
        if plan.codec is None:
            raise PolicyRefusal("the plan asks for a raw float32 update; this device sends none")
        if plan.secagg is None:
            raise PolicyRefusal("the plan has no secure aggregation; this device requires it")


def _stochastic(value: float, step: float, rng: random.Random) -> float:
    """``value`` rounded to a multiple of ``step``, up with probability equal to the remainder
    (unbiased: E[result] = value)."""
    low = math.floor(value / step)
    frac = value / step - low
    return (low + (1 if rng.random() < frac else 0)) * step


def _pow2_floor(n: int) -> int:
    return 0 if n <= 0 else 1 << (n.bit_length() - 1)


def bucket_train_report(report: TrainReport, rng: random.Random) -> TrainReport:
    """What a private device sends of its local training (see the module doc)."""
    return TrainReport(
        loss_before=max(0.0, _stochastic(report.loss_before, LOSS_STEP, rng)),
        loss_after=max(0.0, _stochastic(report.loss_after, LOSS_STEP, rng)),
        examples=_pow2_floor(report.examples),
        steps=_pow2_floor(report.steps),
        seconds=float(round(report.seconds)),
        aborted=report.aborted,
    )


def bucket_eval_counts(counts: EvalCounts, rng: random.Random) -> EvalCounts:
    """Evaluation counts rescaled to :data:`EVAL_WORDS` words, each rate stochastically rounded
    (unbiased per word), so a report says at most 5 bits of each rate of this user."""
    if counts.words == 0:
        return EvalCounts(words=0, top1=0, top3=0, loss_sum=0.0, tokens=0)
    scale = EVAL_WORDS / counts.words
    top1 = int(_stochastic(counts.top1 * scale, 1.0, rng))
    top3 = min(top1 + int(_stochastic((counts.top3 - counts.top1) * scale, 1.0, rng)), EVAL_WORDS)
    per_token = counts.loss_sum / max(counts.tokens, 1)
    tokens = EVAL_WORDS * 2  # a nominal count: the loss is reported per token
    return EvalCounts(
        words=EVAL_WORDS,
        top1=top1,
        top3=top3,
        loss_sum=max(0.0, _stochastic(per_token, LOSS_STEP, rng)) * tokens,
        tokens=tokens,
    )
