"""An eager-torch :class:`~edge_client.predictor.StepModel`, for models without a program.

The teacher is evaluated this way; so are students in parity tests against ``predict.pte``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from edge_client.predictor import FloatArray
from model_export.model import PredictPrefill, PredictScore, PredictStep, TransformerLM

__all__ = ["EagerStepModel"]


class EagerStepModel:
    def __init__(self, lm: TransformerLM, beam_batch: int = 8) -> None:
        self.lm = lm.eval()
        self.max_seq_len = lm.cfg.max_seq_len
        self.beam_batch = beam_batch
        self._prefill = PredictPrefill(self.lm)
        self._step = PredictStep(self.lm)
        self._score = PredictScore(self.lm)

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> tuple[FloatArray, FloatArray, FloatArray]:
        tokens = torch.zeros(1, self.max_seq_len, dtype=torch.long)
        tokens[0, : len(ids)] = torch.tensor(ids)
        logp, k, v = self._prefill(tokens, torch.tensor([len(ids)]))
        return logp[0].numpy(), k.numpy(), v.numpy()

    @torch.no_grad()
    def step(
        self, tokens: npt.NDArray[np.int64], pos: int, k: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        logp, kn, vn = self._step(
            torch.from_numpy(tokens).view(-1, 1),
            torch.tensor([pos]),
            torch.from_numpy(np.ascontiguousarray(k)),
            torch.from_numpy(np.ascontiguousarray(v)),
        )
        return logp.numpy(), kn.numpy(), vn.numpy()

    @torch.no_grad()
    def score(self, ids: list[int]) -> FloatArray:
        s = self.max_seq_len
        n = min(len(ids) - 1, s)
        tokens = torch.zeros(1, s, dtype=torch.long)
        targets = torch.zeros(1, s, dtype=torch.long)
        tokens[0, :n] = torch.tensor(ids[:n])
        targets[0, :n] = torch.tensor(ids[1 : n + 1])
        return np.asarray(self._score(tokens, targets)[0, :n].numpy(), dtype=np.float32)
