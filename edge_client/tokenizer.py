"""SentencePiece tokenizer with the per-piece word-boundary tables that word suggestions need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import sentencepiece as spm

from edge_client.text import is_word_char

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "WORD_MARK", "Tokenizer"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORD_MARK = "\u2581"  # SentencePiece's "▁": the piece starts a new word


class Tokenizer:
    """Encodes normalised text; classifies every piece for whole-word decoding.

    - ``surface[i]``: the characters piece ``i`` adds to the current word (no ``▁``);
    - ``starts_word[i]``: ``▁`` followed only by word characters (a word can begin here);
    - ``continues_word[i]``: only word characters, no ``▁`` (extends the word being built);
    - ``ends_word[i]``: the word before it is finished (a new word, punctuation, ``</s>``).
    """

    def __init__(self, model: bytes | Path) -> None:
        proto = model.read_bytes() if isinstance(model, Path) else model
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
            PAD_ID,
            UNK_ID,
            BOS_ID,
            EOS_ID,
        ):
            raise ValueError("tokenizer must reserve ids 0..3 for <pad>, <unk>, <s>, </s>")
        n = self.vocab_size = self.sp.get_piece_size()
        self.surface: list[str] = []
        starts = np.zeros(n, dtype=bool)
        conts = np.zeros(n, dtype=bool)
        ends = np.zeros(n, dtype=bool)
        for i in range(n):
            piece = self.sp.id_to_piece(i)
            special = self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_byte(i)
            body = piece[1:] if piece.startswith(WORD_MARK) else piece
            self.surface.append("" if special else body)
            wordy = all(is_word_char(c) for c in body)
            if special:
                ends[i] = i == EOS_ID or self.sp.is_byte(i)
            elif piece.startswith(WORD_MARK):
                starts[i] = wordy
                ends[i] = True
            else:
                conts[i] = wordy and bool(body)
                ends[i] = not (body and is_word_char(body[0]))
        self.starts_word: npt.NDArray[np.bool_] = starts
        self.continues_word: npt.NDArray[np.bool_] = conts
        self.ends_word: npt.NDArray[np.bool_] = ends

    def encode(self, text: str) -> list[int]:
        """Token ids of normalised text (no <s>/</s>)."""
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids))

    def piece(self, i: int) -> str:
        return str(self.sp.id_to_piece(i))
