"""Named build profiles: model shapes, training budgets and evaluation sizes.

- ``tiny``: seconds; for tests (the models are too small to be useful).
- ``demo``: the default; minutes on 2 CPU cores, and within the on-device budgets
  (suggestion latency, training step time, memory) recorded in bench/RESULTS.md.
- ``full``: a longer build of the same student shape, for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model_export.export import BundleSpec
from model_export.model import ModelConfig
from model_export.train import TrainConfig

__all__ = ["PROFILES", "Profile", "get_profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    vocab_size: int  # SentencePiece vocabulary
    teacher: ModelConfig
    teacher_train: TrainConfig
    student: ModelConfig
    student_train: TrainConfig  # distillation: temperature and alpha live here
    bundle: BundleSpec = field(default_factory=BundleSpec)
    eval_messages: int = 2000  # heldout messages for top-1/top-3 and perplexity
    ksr_messages: int = 300  # heldout messages for keystroke savings (many calls per word)


_TINY = Profile(
    name="tiny",
    vocab_size=512,
    teacher=ModelConfig(vocab_size=512, max_seq_len=32, d_model=48, n_layers=1, n_heads=2, d_ff=96),
    teacher_train=TrainConfig(steps=30, batch_size=16, eval_every=15, warmup=5),
    student=ModelConfig(vocab_size=512, max_seq_len=32, d_model=32, n_layers=1, n_heads=2, d_ff=64),
    student_train=TrainConfig(steps=30, batch_size=16, eval_every=15, warmup=5),
    bundle=BundleSpec(train_batch=4, beam_batch=4),
    eval_messages=60,
    ksr_messages=10,
)

_DEMO = Profile(
    name="demo",
    vocab_size=4096,
    # the teacher is wider (4.3M parameters vs 2.6M); larger or longer-trained teachers gained
    # little on the public split's 280k tokens (bench/RESULTS.md) and cost demo minutes
    teacher=ModelConfig(max_seq_len=48, d_model=256, n_layers=4, n_heads=4, d_ff=1024, dropout=0.2),
    teacher_train=TrainConfig(steps=800, batch_size=32, lr=2.5e-3, eval_every=200),
    student=ModelConfig(max_seq_len=48, d_model=192, n_layers=4, n_heads=4, d_ff=768, dropout=0.1),
    # T=1, alpha=0.5 beat T=2/alpha=0.7 and T=2/alpha=0.9 on validation loss (bench/RESULTS.md)
    student_train=TrainConfig(steps=1000, batch_size=32, lr=3e-3, eval_every=200, temperature=1.0, alpha=0.5),
    # 4 rows x 48 slots per device step: the training arena is 45 MB (70 MB at 8 rows)
    bundle=BundleSpec(train_batch=4, beam_batch=8),
    eval_messages=1000,
    ksr_messages=150,
)

_FULL = replace(
    _DEMO,
    name="full",
    teacher=ModelConfig(max_seq_len=48, d_model=320, n_layers=4, n_heads=5, d_ff=1280, dropout=0.2),
    teacher_train=replace(_DEMO.teacher_train, steps=2000, lr=2e-3),
    student_train=replace(_DEMO.student_train, steps=2500),
    eval_messages=4000,
    ksr_messages=600,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (_TINY, _DEMO, _FULL)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
