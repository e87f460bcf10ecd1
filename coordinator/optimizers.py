"""Server optimizers: how the mean client delta becomes the next global model.

Pure functions of (weights, mean delta, state) -> (new weights, new state), no I/O. The client
delta is ``local - global``, so it already points downhill ("pseudo-gradient" = -delta).

- FedAvg (McMahan et al. 2017): ``w + lr * delta``.
- FedAvgM (Hsu et al. 2019): server momentum ``v = beta * v + delta; w + lr * v``.
- FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the pseudo-gradient
  with adaptivity ``tau``: ``m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
  w + lr * m / (sqrt(v) + tau)`` (no bias correction, as in the paper).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from coordinator.schemas import ServerOptimizer

__all__ = ["FedAdam", "FedAvg", "FedAvgM", "OptimizerState", "ServerOpt", "make_optimizer"]

FloatVec = npt.NDArray[np.float32]
OptimizerState = dict[str, FloatVec]


class ServerOpt(Protocol):
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


def make_optimizer(cfg: ServerOptimizer) -> ServerOpt:
    if cfg.name == "fedavgm":
        return FedAvgM(cfg.lr, cfg.momentum)
    if cfg.name == "fedadam":
        return FedAdam(cfg.lr, cfg.beta1, cfg.beta2, cfg.tau)
    return FedAvg(cfg.lr)
