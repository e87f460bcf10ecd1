"""Central training of teachers and students, with optional distillation, resumable.

Used server-side for the pretrained model (public split) and, in benchmarks, for the central
upper bound (public + federated). Devices never run this: they run ``train.pte``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edge_client.batching import IGNORE_INDEX, Batch, IntArray, pack_batches
from model_export.model import ModelConfig, TransformerLM

__all__ = ["TrainConfig", "TrainResult", "evaluate_loss", "train_lm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one central training run (AdamW, warmup then cosine decay)."""

    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # rows per batch; each row packs several messages
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # decoupled, on matrices only
    grad_clip: float = 1.0  # global L2 norm clip
    eval_every: int = 200  # validation (and checkpoint) interval in steps
    seed: int = 0
    bf16: bool = True  # bfloat16 autocast for matmuls (about 2x faster on CPUs with AVX512-BF16)
    # distillation (used only when a teacher is given)
    temperature: float = 2.0  # softmax temperature for the KL term
    alpha: float = 0.7  # weight of the KL term; 1 - alpha goes to cross-entropy


@dataclass
class TrainResult:
    model: TransformerLM
    best_val_loss: float
    steps: int
    seconds: float
    tokens_per_second: float


def _tensors(b: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.from_numpy(b.tokens),
        torch.from_numpy(b.targets),
        torch.from_numpy(b.positions),
        torch.from_numpy(b.segments),
    )


@torch.no_grad()
def evaluate_loss(lm: TransformerLM, batches: Sequence[Batch]) -> float:
    """Mean token cross-entropy (nats) over all targets of the batches."""
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    for b in batches:
        tokens, targets, positions, segments = _tensors(b)
        logits = lm.packed_logits(tokens, positions, segments)
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += b.n_targets
    lm.train(was_training)
    return total / max(count, 1)


def _distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, cfg: TrainConfig
) -> Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (Hinton et al. 2015)."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep]
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep]
    temp = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(s / temp, dim=-1),
        F.log_softmax(t / temp, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s, targets.reshape(-1)[keep])
    return cfg.alpha * temp * temp * kl + (1 - cfg.alpha) * ce


def _bf16_is_fast() -> bool:
    """bfloat16 autocast only where the CPU has native bf16 dot products (else it is slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, n_train: int, teacher: bool) -> str:
    blob = json.dumps([asdict(model_cfg), asdict(cfg), n_train, teacher], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_lm(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_seqs: Sequence[IntArray],
    val_batches: Sequence[Batch],
    *,
    teacher: TransformerLM | None = None,
    checkpoint: Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    init: dict[str, Tensor] | None = None,
) -> TrainResult:
    """Train a model from scratch, or from ``init`` (fine-tuning), or resume ``checkpoint``;
    keeps the best validation state.

    ``progress(step, total, status)`` is called after every step (for a progress bar).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    lm = TransformerLM(model_cfg)
    if init is not None:
        lm.load_state_dict(init)
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in lm.named_parameters() if p.dim() < 2 or "emb" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    fp = _fingerprint(model_cfg, cfg, len(train_seqs), teacher is not None)
    step, best_val, best_state, elapsed, tokens_seen = 0, math.inf, lm.state_dict(), 0.0, 0
    if checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, weights_only=False)
        if ck.get("fingerprint") == fp:
            lm.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            step, best_val, best_state = ck["step"], ck["best_val"], ck["best_state"]
            elapsed, tokens_seen = ck["elapsed"], ck["tokens_seen"]
            rng.bit_generator.state = ck["rng"]
            log.info("resumed %s at step %d", checkpoint, step)
        else:
            log.info("ignoring checkpoint %s: it belongs to another configuration", checkpoint)
    if teacher is not None:
        teacher.eval()

    def epoch() -> list[Batch]:
        return list(pack_batches(train_seqs, cfg.batch_size, model_cfg.max_seq_len, rng, drop_last=True))

    batches: list[Batch] = []
    use_bf16 = cfg.bf16 and _bf16_is_fast()
    lm.train()
    t0 = time.perf_counter()
    while step < cfg.steps:
        if not batches:
            batches = epoch()
            if not batches:
                raise ValueError("not enough training data for one batch")
        b = batches.pop()
        tokens, targets, positions, segments = _tensors(b)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = lm.packed_logits(tokens, positions, segments).float()
            if teacher is None:
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
            else:
                with torch.no_grad():
                    t_logits = teacher.packed_logits(tokens, positions, segments).float()
                loss = _distill_loss(logits, t_logits, targets, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += b.n_targets
        status = f"loss {loss.item():.3f}"
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate_loss(lm, val_batches)
            if val < best_val:
                best_val = val
                best_state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
            status += f" val {val:.3f}"
            log.info("step %d/%d train %.3f val %.3f", step, cfg.steps, loss.item(), val)
            if checkpoint is not None:
                now = elapsed + time.perf_counter() - t0
                torch.save(
                    {
                        "fingerprint": fp,
                        "model": lm.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": step,
                        "best_val": best_val,
                        "best_state": best_state,
                        "elapsed": now,
                        "tokens_seen": tokens_seen,
                        "rng": rng.bit_generator.state,
                    },
                    checkpoint.with_suffix(".tmp"),
                )
                checkpoint.with_suffix(".tmp").replace(checkpoint)
        if progress is not None:
            progress(step, cfg.steps, status)
    elapsed += time.perf_counter() - t0
    lm.load_state_dict(best_state)
    lm.eval()
    return TrainResult(lm, best_val, step, elapsed, tokens_seen / max(elapsed, 1e-9))
