"""Training the SentencePiece tokenizer (unigram, byte fallback) on the public split only."""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm

from edge_client.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

__all__ = ["train_tokenizer"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> bytes:
    """Train a unigram model on normalised texts; returns the serialised model proto.

    With one thread the result is a deterministic function of the texts (same model every build).
    """
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",  # texts are already normalised (edge_client.text)
        split_digits=True,
        max_sentence_length=4096,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()
