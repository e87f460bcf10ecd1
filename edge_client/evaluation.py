"""Federated evaluation on the device: counts over its own recent messages, nothing else.

The coordinator receives how many next words were predicted (top-1, top-3) out of how many,
and the summed piece loss: no text, no per-message detail.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_client.runtime import Predictor
from edge_client.text import targets
from edge_client.tokenizer import BOS_ID, EOS_ID
from protocol.wire import EvalCounts

__all__ = ["evaluate_messages"]


def evaluate_messages(predictor: Predictor, texts: Sequence[str]) -> EvalCounts:
    words = top1 = top3 = tokens = 0
    loss = 0.0
    s = predictor.model.max_seq_len
    for text in texts:
        for context, word in targets(text):
            got = [x.word for x in predictor.suggest(context, 3)]
            words += 1
            top1 += bool(got) and got[0] == word
            top3 += word in got
        ids = [BOS_ID, *predictor.tokenizer.encode(text), EOS_ID][: s + 1]
        if len(ids) > 1:
            lp = predictor.model.score(ids)
            loss -= float(np.sum(lp))
            tokens += len(lp)
    return EvalCounts(words=words, top1=top1, top3=top3, loss_sum=max(loss, 0.0), tokens=tokens)
