"""Server optimizers: how the mean client delta becomes the next global model.

Pure functions of (weights, mean delta, state) -> (new weights, new state), no I/O. The client
delta is ``local - global``, so it already points downhill ("pseudo-gradient" = -delta).

- FedAvg (McMahan et al. 2017): ``w + lr * delta``.
- FedAvgM (Hsu et al. 2019): server momentum ``v = beta * v + delta; w + lr * v``.
- FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the pseudo-gradient
  with adaptivity ``tau``: ``m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
  w + lr * m / (sqrt(v) + tau)`` (no bias correction, as in the paper).

The step size may follow a schedule over the task's server steps (:func:`scheduled_lr`).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import numpy.typing as npt

from coordinator.schemas import ServerOptimizer

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "OptimizerState",
    "ServerOpt",
    "make_optimizer",
    "scheduled_lr",
]

FloatVec = npt.NDArray[np.float32]
OptimizerState = dict[str, FloatVec]


class ServerOpt(Protocol):
    lr: float  # this step's learning rate (after the schedule)

    def step(
        self, weights: FloatVec, delta: FloatVec, state: OptimizerState
    ) -> tuple[FloatVec, OptimizerState]: ...


class FedAvg:
    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(
        self, weights: FloatVec, delta: FloatVec, state: OptimizerState
    ) -> tuple[FloatVec, OptimizerState]:
        return (weights + np.float32(self.lr) * delta).astype(np.float32), {}


class FedAvgM:
    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr, self.momentum = lr, momentum

    def step(
        self, weights: FloatVec, delta: FloatVec, state: OptimizerState
    ) -> tuple[FloatVec, OptimizerState]:
        v = state.get("momentum")
        v = delta.copy() if v is None else (np.float32(self.momentum) * v + delta).astype(np.float32)
        return (weights + np.float32(self.lr) * v).astype(np.float32), {"momentum": v}


class FedAdam:
    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def step(
        self, weights: FloatVec, delta: FloatVec, state: OptimizerState
    ) -> tuple[FloatVec, OptimizerState]:
        m = state.get("m", np.zeros_like(delta))
        v = state.get("v", np.zeros_like(delta))
        m = (self.beta1 * m + (1 - self.beta1) * delta).astype(np.float32)
        v = (self.beta2 * v + (1 - self.beta2) * delta * delta).astype(np.float32)
        new = weights + np.float32(self.lr) * m / (np.sqrt(v) + np.float32(self.tau))
        return new.astype(np.float32), {"m": m, "v": v}


def scheduled_lr(cfg: ServerOptimizer, step: int, rounds: int | None) -> float:
    """The learning rate of server step ``step`` (0 for the first) of a schedule over ``rounds``
    steps (None or a constant schedule: ``cfg.lr``).

    Cosine annealing (Loshchilov & Hutter 2017, "SGDR", without restarts): ``lr_k = lr * (f +
    (1 - f) * (1 + cos(pi * k / (T - 1))) / 2)`` for k < T, so the first step takes ``lr`` and
    step T - 1 takes ``f * lr`` (``f = final_lr_fraction``); later steps keep ``f * lr``. A
    large early step makes most of the progress, a small late one stops the mean update's noise
    from undoing it (at population scale FedAdam at 2e-2 was ahead of 1e-2 after 6 rounds and
    behind after 12: bench/RESULTS.md)."""
    if step < 0:
        raise ValueError(f"a server step is numbered from 0, not {step}")
    if cfg.schedule == "constant" or rounds is None:
        return cfg.lr
    f = cfg.final_lr_fraction
    progress = min(step, rounds - 1) / max(rounds - 1, 1)
    return cfg.lr * (f + (1 - f) * (1 + math.cos(math.pi * progress)) / 2)


def make_optimizer(cfg: ServerOptimizer, *, step: int = 0, rounds: int | None = None) -> ServerOpt:
    """The server optimizer of step ``step`` of a task's ``rounds`` (its schedule's length)."""
    lr = scheduled_lr(cfg, step, rounds)
    if cfg.name == "fedavgm":
        return FedAvgM(lr, cfg.momentum)
    if cfg.name == "fedadam":
        return FedAdam(lr, cfg.beta1, cfg.beta2, cfg.tau)
    return FedAvg(lr)
