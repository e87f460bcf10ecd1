"""The baselines a federated run is measured against, on exactly the data its fleet holds.

- :func:`central_finetune`: the pretrained student (the bundle's weights) fine-tuned centrally
  on the messages the fleet's devices train on, for the same number of training tokens as a
  federated run (``SimResult.tokens_trained``): what a server holding their raw text would reach
  with the same training work, the honest upper bound. AdamW (``model_export.train``): the
  federated run's global optimiser is FedAdam, also adaptive per coordinate, and the upper bound
  should be the best central use of the budget; no weight decay (it would pull the pretrained
  weights toward zero), warmup then cosine decay to a tenth of a small peak (5e-4: fine-tuning).
- :func:`central_scratch`: the student's architecture trained from random initialisation on
  public + the fleet's messages, the path of the model-quality table's "student (central)"
  row (``bench/quality.py``: ``pipeline.train_model``, batch 32, lr 3e-3, no teacher), with a
  token budget (by default that row's 6,000 steps); cached in a work directory.
- :func:`trigram`: the word trigram (``model_export.ngram``) on public, or public + the fleet's
  messages.

Token budgets become optimiser steps through the mean number of target tokens in one packed
batch of the data (:func:`steps_for_tokens`); each result reports the tokens it trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from simulator.fleet import EVAL_HOLDOUT, eval_holdout

__all__ = [
    "SCRATCH_STEPS",
    "CentralModel",
    "central_finetune",
    "central_scratch",
    "fleet_training_texts",
    "public_texts",
    "steps_for_tokens",
    "tokens_per_batch",
    "training_share",
    "trigram",
]

SCRATCH_STEPS = 6000
"""Steps of 32 rows of the model-quality table's central student (``bench/quality.py``
``--central-steps``), which reached top-1 0.2028 on 1,000 heldout messages."""

IntArray = npt.NDArray[np.int64]
ProgressFn = Callable[[int, int, str], None]


@dataclass
class CentralModel:
    """A centrally trained model as a flat weight vector in the bundle's layout."""

    weights: npt.NDArray[np.float32]
    tokens: int  # target tokens trained on
    steps: int
    seconds: float
    messages: int  # training messages
    val_loss: float


def training_share(texts: Sequence[str], holdout: int = EVAL_HOLDOUT) -> list[str]:
    """The messages of one device that local training may use: all but its newest
    ``min(holdout, n // 5)`` (kept for federated evaluation), normalised, non-empty."""
    from edge_client.text import normalize

    keep = texts[: len(texts) - eval_holdout(len(texts), holdout)]
    return [t for t in (normalize(x) for x in keep) if t]


def fleet_training_texts(specs: Sequence[Any], holdout: int = EVAL_HOLDOUT) -> list[str]:
    """Every message the fleet's devices (``simulator.fleet.DeviceSpec``) can train on, each
    participant once (a larger fleet than participants gives some people several devices)."""
    seen: set[str] = set()
    out: list[str] = []
    for spec in specs:
        if spec.user not in seen:
            seen.add(spec.user)
            out += training_share(spec.texts, holdout)
    return out


def public_texts(corpus: str | Path | None = None) -> tuple[list[str], list[str]]:
    """The public split's messages, (training users', validation users'): the pretrained
    model's data (``model_export.pipeline.prepare_texts``)."""
    from model_export.data import load_corpus
    from model_export.pipeline import prepare_texts

    split = prepare_texts(load_corpus(corpus))
    return split.public_train, split.public_val


def tokens_per_batch(seqs: Sequence[IntArray], batch_size: int, seq_len: int, seed: int = 0) -> float:
    """Mean target tokens in one packed training batch of ``seqs`` (one shuffled epoch, as
    ``model_export.train`` packs them)."""
    from edge_client.batching import pack_batches

    rng = np.random.default_rng(seed)
    counts = [b.n_targets for b in pack_batches(seqs, batch_size, seq_len, rng, drop_last=True)]
    if not counts:
        raise ValueError("not enough training data for one batch")
    return float(np.mean(counts))


def steps_for_tokens(
    tokens: int, seqs: Sequence[IntArray], batch_size: int, seq_len: int, seed: int = 0
) -> int:
    """Optimiser steps that train on about ``tokens`` target tokens."""
    if tokens <= 0:
        return 0
    return max(1, math.ceil(tokens / tokens_per_batch(seqs, batch_size, seq_len, seed)))


def _full_bundle(bundle_dir: Path) -> Any:
    from protocol.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.manifest.train.trainable != "full":
        raise ValueError("central baselines need a bundle whose devices train every weight (trainable full)")
    return bundle


def _split(
    texts: Sequence[str], seed: int, share: float = 0.02, cap: int = 2000
) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded ``share`` of the messages (at most ``cap``, at least 50)
    picks the best state during training."""
    if len(texts) < 2:
        raise ValueError(f"central training needs messages to train and validate on, got {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(max(int(len(texts) * share), 50), cap, len(texts) // 2)
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


def central_finetune(
    bundle_dir: Path,
    texts: Sequence[str],
    tokens: int,
    *,
    seed: int = 0,
    lr: float = 5e-4,
    batch_size: int = 32,
    threads: int = 2,
    progress: ProgressFn | None = None,
) -> CentralModel:
    """The bundle's weights fine-tuned on ``texts`` for about ``tokens`` target tokens."""
    import time

    import torch

    from edge_client.batching import encode_messages, pack_batches
    from edge_client.tokenizer import Tokenizer
    from model_export.export import model_from_bundle
    from model_export.train import TrainConfig, train_lm

    bundle = _full_bundle(bundle_dir)
    tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
    base = model_from_bundle(bundle.root, bundle.manifest)
    train, val = _split(texts, seed)
    seq = base.cfg.max_seq_len
    seqs = encode_messages(tok, train, seq)
    steps = steps_for_tokens(tokens, seqs, batch_size, seq, seed)
    if steps == 0:
        return CentralModel(bundle.initial_weights(), 0, 0, 0.0, len(train), float("nan"))
    val_batches = list(pack_batches(encode_messages(tok, val, seq), batch_size, seq))
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=min(100, max(steps // 20, 1)),
        min_lr_ratio=0.1,
        weight_decay=0.0,
        eval_every=max(steps // 10, 1),
        seed=seed,
    )
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = train_lm(
        replace(base.cfg, dropout=0.1), cfg, seqs, val_batches, init=base.state_dict(), progress=progress
    )
    weights = bundle.manifest.train.layout.flatten(
        {n: p.detach().numpy() for n, p in res.model.named_parameters()}
    )
    return CentralModel(
        weights,
        round(res.tokens_per_second * res.seconds),
        res.steps,
        time.perf_counter() - t0,
        len(train),
        res.best_val_loss,
    )


def central_scratch(
    bundle_dir: Path,
    texts: Sequence[str],
    work: Path,
    *,
    tokens: int | None = None,
    val_texts: Sequence[str] = (),
    seed: int = 0,
    threads: int = 2,
    progress: ProgressFn | None = None,
) -> CentralModel:
    """The bundle's architecture trained from random initialisation on ``texts`` (public +
    the fleet's messages) for about ``tokens`` target tokens (default :data:`SCRATCH_STEPS`
    steps), with the model-quality table's recipe; validated on ``val_texts`` (the public
    validation users; default a share of ``texts``). Cached in ``work`` by configuration and
    data, so a second comparison on the same data reuses it."""
    import torch

    from edge_client.batching import encode_messages, pack_batches
    from edge_client.tokenizer import Tokenizer
    from model_export.export import model_from_bundle
    from model_export.pipeline import train_model
    from model_export.train import TrainConfig
    from simulator.evaluation import text_fingerprint

    bundle = _full_bundle(bundle_dir)
    tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
    arch = model_from_bundle(bundle.root, bundle.manifest).cfg
    train, val = (list(texts), list(val_texts)) if val_texts else _split(texts, seed)
    seq = arch.max_seq_len
    seqs = encode_messages(tok, train, seq)
    batch = 32
    steps = SCRATCH_STEPS if tokens is None else max(steps_for_tokens(tokens, seqs, batch, seq, seed), 1)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=3e-3, eval_every=min(500, steps), seed=seed)
    val_batches = list(pack_batches(encode_messages(tok, val, seq), batch, seq))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    name = f"central-scratch-{text_fingerprint(train)}"

    def make_progress(task: str, total: int) -> ProgressFn:
        return progress or (lambda done, total_, status: None)

    lm = train_model(
        name,
        work,
        replace(arch, dropout=0.1),
        cfg,
        seqs,
        val_batches,
        text_fingerprint([*train, "\x00", *val]),
        make_progress,
    )
    meta = json.loads((work / f"{name}.json").read_text())
    weights = bundle.manifest.train.layout.flatten({n: p.detach().numpy() for n, p in lm.named_parameters()})
    return CentralModel(
        weights,
        round(meta["tokens_per_second"] * meta["seconds"]),
        steps,
        float(meta["seconds"]),  # of the training, also when this call found it in the cache
        len(train),
        float(meta["best_val_loss"]),
    )


def trigram(texts: Sequence[str]) -> Any:
    """A word trigram (interpolated Kneser-Ney) fitted on ``texts``."""
    from model_export.ngram import TrigramLM

    return TrigramLM().fit(texts)
