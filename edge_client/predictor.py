"""Whole-word next-word suggestions by beam search over subword continuations.

The language model predicts SentencePiece pieces; a keyboard shows words. A word is one piece
that starts a word (``▁how``) followed by zero or more pieces that continue it (``ever``), and
it is finished when the model's next piece ends it (a new word, punctuation or ``</s>``). The
probability of a suggestion is therefore

    P(word | context) = P(pieces of word | context) * P(next piece ends the word | ...)

summed over the tokenisations that spell the same word. The search keeps the ``beam`` best
partial words, expands them one piece at a time through a KV-cached step model, and stops as
soon as no partial word can beat the k-th best finished one. When the context ends inside a
word ("how are yo"), only pieces that agree with the typed prefix are considered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_client.text import split_context
from edge_client.tokenizer import BOS_ID, Tokenizer

__all__ = ["BeamSearch", "StepModel", "Suggestion"]

FloatArray = npt.NDArray[np.float32]


class StepModel(Protocol):
    """A KV-cached language model: what ``predict.pte`` (or an eager twin) offers."""

    max_seq_len: int  # S: cache slots
    beam_batch: int  # B: rows of every ``step`` call

    def prefill(self, ids: list[int]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Context ids (len <= S) -> next-piece log-probs [V], keys and values [L,1,H,S,Dh]."""
        ...

    def step(
        self, tokens: npt.NDArray[np.int64], pos: int, k: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """tokens [B] at position ``pos`` given caches [L,B,H,S,Dh] (slots < pos valid) ->
        log-probs [B,V] and the new keys/values [L,B,H,1,Dh] of slot ``pos``."""
        ...


@dataclass(frozen=True, slots=True)
class Suggestion:
    word: str
    logprob: float  # natural log of P(word | context)


def _logsumexp(x: FloatArray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m)))) if np.isfinite(m) else m


class BeamSearch:
    """Top-k whole-word suggestions from a step model and its tokenizer."""

    def __init__(self, model: StepModel, tokenizer: Tokenizer, max_pieces: int = 4) -> None:
        self.model = model
        self.tok = tokenizer
        self.beam = model.beam_batch
        self.max_pieces = max_pieces
        self._compat_cache: dict[tuple[str, bool], npt.NDArray[np.bool_]] = {}
        # KV caches of the beams, allocated once and reused: [2 (keys, values), 2 (double
        # buffer for reordering beams), L, B, H, S, Dh]. Fresh megabyte-sized arrays per call
        # would cost page faults on every suggestion.
        self._kv: FloatArray | None = None

    def _compatible(self, rest: str, first: bool) -> npt.NDArray[np.bool_]:
        """Pieces that may come next when ``rest`` of the typed prefix is still unmatched."""
        key = (rest, first)
        mask = self._compat_cache.get(key)
        if mask is None:
            base = self.tok.starts_word if first else self.tok.continues_word
            mask = base.copy()
            if rest:
                for i in np.flatnonzero(base):
                    s = self.tok.surface[i]
                    mask[i] = s.startswith(rest) or (bool(s) and rest.startswith(s))
            if len(self._compat_cache) > 4096:
                self._compat_cache.clear()
            self._compat_cache[key] = mask
        return mask

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        """The k most likely words to type next after ``text`` (or to finish its last word)."""
        done, partial = split_context(text)
        s = self.model.max_seq_len
        ids = [BOS_ID, *self.tok.encode(done)] if done else [BOS_ID]
        ids = ids[-(s - self.max_pieces) :]
        logp0, kc, vc = self.model.prefill(ids)
        pos = len(ids)
        finished: dict[str, float] = {}

        # First piece: anything that starts a word and agrees with the typed prefix.
        allowed = self._compatible(partial, first=True)
        scores = np.where(allowed, logp0, -np.inf)
        top = np.argsort(-scores)[: self.beam]
        hyps = [(self.tok.surface[t], float(scores[t]), int(t)) for t in top if np.isfinite(scores[t])]
        shape = (2, 2, kc.shape[0], self.beam, *kc.shape[2:])
        if self._kv is None or self._kv.shape != shape:
            self._kv = np.empty(shape, dtype=np.float32)
        cur = 0
        np.copyto(self._kv[0, cur], kc)  # broadcast the context's cache to every beam
        np.copyto(self._kv[1, cur], vc)
        ends = self.tok.ends_word

        for _ in range(self.max_pieces):
            if not hyps or pos >= s:
                break
            tokens = np.zeros(self.beam, dtype=np.int64)
            tokens[: len(hyps)] = [h[2] for h in hyps]
            kc, vc = self._kv[0, cur], self._kv[1, cur]
            logp, k_new, v_new = self.model.step(tokens, pos, kc, vc)
            children: list[tuple[float, int, int, str]] = []
            for row, (surface, score, _) in enumerate(hyps):
                if surface.startswith(partial) and surface and surface[-1] != "'":
                    end = score + _logsumexp(logp[row, ends])
                    prev = finished.get(surface)
                    finished[surface] = end if prev is None else float(np.logaddexp(prev, end))
                rest = partial[len(surface) :] if partial.startswith(surface) else ""
                cont = np.where(self._compatible(rest, first=False), logp[row], -np.inf)
                best = np.argpartition(-cont, self.beam)[: self.beam]
                children.extend(
                    (score + float(cont[t]), row, int(t), surface + self.tok.surface[t])
                    for t in best
                    if np.isfinite(cont[t])
                )
            children.sort(key=lambda c: -c[0])
            kth = sorted(finished.values(), reverse=True)[k - 1] if len(finished) >= k else -np.inf
            children = [c for c in children[: self.beam] if c[0] > kth]
            if not children:
                break
            kc[:, :, :, pos : pos + 1] = k_new
            vc[:, :, :, pos : pos + 1] = v_new
            parents = [c[1] for c in children]
            parents += [0] * (self.beam - len(parents))
            np.take(kc, parents, axis=1, out=self._kv[0, 1 - cur])  # children inherit parents' caches
            np.take(vc, parents, axis=1, out=self._kv[1, 1 - cur])
            cur = 1 - cur
            hyps = [(c[3], c[0], c[2]) for c in children]
            pos += 1
        ranked = sorted(finished.items(), key=lambda kv: -kv[1])[:k]
        return [Suggestion(w, lp) for w, lp in ranked]
