from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.batching import IGNORE_INDEX, pack_batches

SEQ = 12


@st.composite
def sequences(draw: st.DrawFn) -> list[np.ndarray]:
    n = draw(st.integers(1, 30))
    return [
        np.asarray(draw(st.lists(st.integers(4, 99), min_size=2, max_size=SEQ + 1)), dtype=np.int64)
        for _ in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(sequences(), st.integers(1, 4), st.booleans())
def test_packing_keeps_every_message_once_and_aligned(
    seqs: list[np.ndarray], batch: int, shuffle: bool
) -> None:
    rng = np.random.default_rng(0) if shuffle else None
    batches = list(pack_batches(seqs, batch, SEQ, rng))
    recovered = []
    for b in batches:
        assert b.tokens.shape == (batch, SEQ)
        for r in range(batch):
            seg = b.segments[r]
            real = b.targets[r] != IGNORE_INDEX
            for s in np.unique(seg[real]):
                idx = np.flatnonzero((seg == s) & real)
                assert (np.diff(idx) == 1).all()  # contiguous
                assert (b.positions[r, idx] == np.arange(len(idx))).all()  # positions restart
                msg = np.concatenate([b.tokens[r, idx], b.targets[r, idx[-1:]]])
                assert (b.tokens[r, idx[1:]] == b.targets[r, idx[:-1]]).all()  # shifted by one
                recovered.append(tuple(msg))
    assert sorted(recovered) == sorted(tuple(s) for s in seqs)
    assert sum(b.n_targets for b in batches) == sum(len(s) - 1 for s in seqs)


def test_drop_last_yields_only_full_batches() -> None:
    seqs = [np.arange(4, 4 + SEQ + 1, dtype=np.int64)] * 5
    batches = list(pack_batches(seqs, 2, SEQ, drop_last=True))
    assert len(batches) == 2
    assert all((b.targets != IGNORE_INDEX).all() for b in batches)
    # a last batch that is full is not dropped (4 full rows: 2 batches, not 1)
    assert len(list(pack_batches(seqs[:4], 2, SEQ, drop_last=True))) == 2


def test_epochs_pass_over_every_message_once_each_with_the_indices_it_holds() -> None:
    from edge_client.batching import epoch_batches

    rng = np.random.default_rng(3)
    seqs = [np.arange(4, 4 + int(n), dtype=np.int64) for n in rng.integers(2, SEQ + 2, size=23)]
    got = list(epoch_batches(seqs, 2, SEQ, np.random.default_rng(0), epochs=2))
    held = [i for _, idx in got for i in idx]
    assert sorted(held) == sorted(list(range(23)) * 2)  # two passes, every message in each
    for b, idx in got:  # a batch's indices name exactly the messages packed into it
        assert b.n_targets == sum(len(seqs[i]) - 1 for i in idx)
    one = [i for _, idx in epoch_batches(seqs, 2, SEQ, np.random.default_rng(0), epochs=1) for i in idx]
    assert sorted(one) == list(range(23)) and one != list(range(23))  # shuffled
    endless = epoch_batches(seqs, 2, SEQ, np.random.default_rng(0), epochs=None)
    assert len([next(endless) for _ in range(50)]) == 50  # until the consumer stops
    assert list(epoch_batches([], 2, SEQ, np.random.default_rng(0))) == []
