"""Training the SentencePiece tokenizer (unigram, byte fallback) on the public split only.

Any script: SentencePiece keeps every character up to its character coverage (0.9995 here;
it refuses coverages below 0.98) as a piece of its own and needs those "required characters",
its four special pieces and the 256 byte pieces of byte fallback to fit the vocabulary. A corpus
in many scripts overflowed a small vocabulary (a CJK script alone has thousands of characters):
"Vocabulary size is smaller than required_chars. 512 vs 1345". :func:`kept_characters` keeps
the most frequent characters, at most half of the pieces left after the special and byte pieces
(the other half is left for subwords); rarer characters are replaced by spaces in the text the
tokenizer learns from only, so at encoding time byte fallback spells them in UTF-8 bytes and no
text is ever out of vocabulary. The vocabulary keeps the profile's size rather than growing
with the corpus: the model's shapes (embedding, output layer) and the on-device budgets
measured for them stay what the profile says. A corpus with few characters (chitchat has 63)
is learned from unchanged, so its tokenizer is the same as before.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from edge_client.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from model_export.data import CorpusError

__all__ = [
    "BYTE_PIECES",
    "CHARACTER_COVERAGE",
    "SPECIAL_PIECES",
    "char_budget",
    "kept_characters",
    "train_tokenizer",
]

CHARACTER_COVERAGE = 0.9995
"""Share of the (kept) characters' occurrences SentencePiece must cover with pieces of their own."""
SPECIAL_PIECES = 4  # pad, unk, bos, eos (edge_client.tokenizer)
BYTE_PIECES = 256  # byte fallback: one piece per byte value


def char_budget(vocab_size: int) -> int:
    """Most characters a vocabulary of ``vocab_size`` pieces keeps as pieces of their own: half
    of the ordinary pieces (those beside the special and byte pieces)."""
    budget = (vocab_size - SPECIAL_PIECES - BYTE_PIECES) // 2
    if budget < 1:
        raise CorpusError(
            f"a vocabulary of {vocab_size} pieces leaves no room beside its "
            f"{SPECIAL_PIECES + BYTE_PIECES} special and byte pieces"
        )
    return budget


def kept_characters(texts: Iterable[str], vocab_size: int) -> set[str] | None:
    """The characters the tokenizer learns as pieces: the :func:`char_budget` most frequent
    (spaces aside; SentencePiece's word boundary piece takes one place), or None when every
    character of the texts fits."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    counts.pop(" ", None)
    room = char_budget(vocab_size) - 1  # the word boundary "\u2581" is a required character too
    if len(counts) <= room:
        return None
    return {c for c, _ in counts.most_common(room)}


def _learning_texts(texts: Sequence[str], keep: set[str] | None) -> list[str]:
    """The texts with characters outside ``keep`` replaced by spaces (words split there)."""
    if keep is None:
        return list(texts)
    out = []
    for t in texts:
        masked = " ".join("".join(c if c in keep else " " for c in t).split())
        if masked:
            out.append(masked)
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> bytes:
    """Train a unigram model on normalised texts; returns the serialised model proto.

    With one thread the result is a deterministic function of the texts (same model every build).
    Raises :class:`CorpusError` (one line) when SentencePiece cannot train on these texts.
    """
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise CorpusError("no public-split text to train the tokenizer on")
    texts = _learning_texts(texts, kept_characters(texts, vocab_size))
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=out,
            model_type="unigram",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=CHARACTER_COVERAGE,
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
    except RuntimeError as e:  # SentencePiece's checks: "INTERNAL: file(line) [condition] why"
        line = (str(e).splitlines() or [type(e).__name__])[0]
        reason = line.rsplit("] ", 1)[-1].strip() or line
        raise CorpusError(f"the tokenizer cannot be trained on this corpus: {reason}") from None
    return out.getvalue()
