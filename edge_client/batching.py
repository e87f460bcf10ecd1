"""Turning messages into fixed-shape training batches (several messages packed per row).

The training program has a static [batch, seq] shape. Messages are short (a dozen tokens), so
padding each one to ``seq`` would waste most of the compute; instead whole messages are packed
into rows, each with its own segment id and positions restarting at 0, and the model's
block-diagonal mask keeps them apart. The unused tail of a row is padding, ignored by the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_client.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

__all__ = ["IGNORE_INDEX", "Batch", "encode_messages", "epoch_batches", "pack_batches", "pack_indexed"]

IGNORE_INDEX = -100  # target value that the loss skips
_PAD_SEGMENT = 1 << 20  # segment id of padding (never equal to a real message's)

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Batch:
    """Inputs of the training program, all int64 [batch, seq]."""

    tokens: IntArray
    targets: IntArray
    positions: IntArray
    segments: IntArray

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def encode_messages(tokenizer: Tokenizer, texts: Iterable[str], seq_len: int) -> list[IntArray]:
    """``<s> ids </s>`` per normalised message; long ones are cut into windows of seq_len + 1."""
    out: list[IntArray] = []
    for text in texts:
        ids = [BOS_ID, *tokenizer.encode(text), EOS_ID]
        for start in range(0, max(len(ids) - 1, 1), seq_len):
            window = ids[start : start + seq_len + 1]
            if len(window) >= 2:
                out.append(np.asarray(window, dtype=np.int64))
    return out


def pack_batches(
    sequences: Sequence[IntArray],
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Pack sequences (each <= seq_len + 1 tokens) greedily into rows, in order or shuffled."""
    for batch, _ in pack_indexed(sequences, batch_size, seq_len, rng, drop_last):
        yield batch


def pack_indexed(
    sequences: Sequence[IntArray],
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Batch, list[int]]]:
    """:func:`pack_batches`, each batch with the indices (into ``sequences``) it holds."""
    order = rng.permutation(len(sequences)) if rng is not None else np.arange(len(sequences))
    rows: list[tuple[IntArray, IntArray, IntArray, IntArray]] = []
    held: list[int] = []
    row = _empty_row(seq_len)
    fill = 0
    segment = 0
    for i in order:
        seq = sequences[int(i)]
        n = len(seq) - 1  # input positions this message occupies
        if n > seq_len:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit seq_len={seq_len}")
        if fill + n > seq_len:
            rows.append(row)
            if len(rows) == batch_size:
                yield _stack(rows), held
                rows, held = [], []
            row, fill, segment = _empty_row(seq_len), 0, 0
        tokens, targets, positions, segments = row
        tokens[fill : fill + n] = seq[:-1]
        targets[fill : fill + n] = seq[1:]
        positions[fill : fill + n] = np.arange(n)
        segments[fill : fill + n] = segment
        fill += n
        segment += 1
        held.append(int(i))
    if fill:
        rows.append(row)
    if rows and (not drop_last or len(rows) == batch_size):  # a full last batch is kept
        while len(rows) < batch_size:
            rows.append(_empty_row(seq_len))
        yield _stack(rows), held


def epoch_batches(
    sequences: Sequence[IntArray],
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
    epochs: int | None = None,
) -> Iterator[tuple[Batch, list[int]]]:
    """``epochs`` passes over the sequences (None: passes until the consumer stops), each in a
    fresh random order, every batch with the indices of the sequences it holds."""
    done = 0
    while sequences and (epochs is None or done < epochs):
        yield from pack_indexed(sequences, batch_size, seq_len, rng)
        done += 1


def _empty_row(seq_len: int) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    return (
        np.full(seq_len, PAD_ID, dtype=np.int64),
        np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
        np.zeros(seq_len, dtype=np.int64),
        np.full(seq_len, _PAD_SEGMENT, dtype=np.int64),
    )


def _stack(rows: list[tuple[IntArray, IntArray, IntArray, IntArray]]) -> Batch:
    return Batch(*(np.stack([r[k] for r in rows]) for k in range(4)))
