"""Word trigram with interpolated Kneser-Ney smoothing: the classic keyboard baseline.

P(w | u v) = max(c(u v w) - D, 0) / c(u v .) + D * N1+(u v .) / c(u v .) * P2(w | v)
P2(w | v)  = max(N1+(. v w) - D, 0) / N1+(. v .) + D * N1+(v .) / N1+(. v .) * P1(w)
P1(w)      = N1+(. w) / N1+(. .)  (continuation counts), plus a small mass for unseen words
(Chen & Goodman 1998). An unseen context backs off to the lower order entirely.

Top-k is exact: a word outside the trigram and bigram continuations of the context scores
lambda * P1(w), so the best of those are the best unigrams that are not continuations.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from edge_client.text import split_context, words

__all__ = ["BOS", "TrigramLM"]

BOS = "<s>"
EOS = "</s>"


class TrigramLM:
    """Word-level interpolated Kneser-Ney trigram with prefix completion."""

    def __init__(self, discount: float = 0.75, max_prefix_index: int = 12) -> None:
        self.d = discount
        self.max_prefix_index = max_prefix_index
        self.tri: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.bi_cont: dict[str, Counter[str]] = defaultdict(Counter)  # v -> w -> N1+(. v w)
        self.uni_cont: Counter[str] = Counter()  # w -> N1+(. w)
        self._by_prefix: dict[str, list[str]] = {}
        self._uni_total = 0
        self._bi_totals: dict[str, int] = {}
        self._tri_totals: dict[tuple[str, str], int] = {}

    def fit(self, texts: Iterable[str]) -> TrigramLM:
        """Count trigrams of normalised messages (each padded with <s> <s> ... </s>)."""
        for text in texts:
            seq = [BOS, BOS, *words(text), EOS]
            for u, v, w in zip(seq, seq[1:], seq[2:], strict=False):
                self.tri[(u, v)][w] += 1
        bigram_left: dict[tuple[str, str], set[str]] = defaultdict(set)
        for (u, v), ws in self.tri.items():
            for w in ws:
                bigram_left[(v, w)].add(u)
        unigram_left: dict[str, set[str]] = defaultdict(set)
        for (v, w), us in bigram_left.items():
            self.bi_cont[v][w] = len(us)
            unigram_left[w].add(v)
        for w, vs in unigram_left.items():
            self.uni_cont[w] = len(vs)
        self._uni_total = sum(self.uni_cont.values())
        self._bi_totals = {v: sum(c.values()) for v, c in self.bi_cont.items()}
        self._tri_totals = {ctx: sum(c.values()) for ctx, c in self.tri.items()}
        ranked = [w for w, _ in self.uni_cont.most_common() if w != EOS]
        index: dict[str, list[str]] = defaultdict(list)
        for w in ranked:
            for i in range(min(len(w), self.max_prefix_index) + 1):
                index[w[:i]].append(w)
        self._by_prefix = dict(index)
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.uni_cont)

    def _p1(self, w: str) -> float:
        # Interpolate with a uniform distribution over vocab + 1 (unseen words) to stay > 0.
        n = self.vocab_size + 1
        return 0.999 * self.uni_cont.get(w, 0) / max(self._uni_total, 1) + 0.001 / n

    def _p2(self, w: str, v: str) -> float:
        conts = self.bi_cont.get(v)
        if not conts:
            return self._p1(w)
        total = self._bi_totals[v]
        lam = self.d * len(conts) / total
        return max(conts.get(w, 0) - self.d, 0) / total + lam * self._p1(w)

    def prob(self, w: str, u: str, v: str) -> float:
        """P(w | u v) with interpolated Kneser-Ney."""
        counts = self.tri.get((u, v))
        if not counts:
            return self._p2(w, v)
        total = self._tri_totals[(u, v)]
        lam = self.d * len(counts) / total
        return max(counts.get(w, 0) - self.d, 0) / total + lam * self._p2(w, v)

    def _context(self, done: str) -> tuple[str, str]:
        seq = [BOS, BOS, *words(done)]
        return seq[-2], seq[-1]

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The k most probable next words (or completions of a partially typed word)."""
        done, partial = split_context(text)
        u, v = self._context(done)
        cands = set(self.tri.get((u, v), {})) | set(self.bi_cont.get(v, {}))
        cands = {w for w in cands if w != EOS and w.startswith(partial)}
        extra = 0
        for w in self._prefix_ranked(partial):
            if w not in cands:
                cands.add(w)
                extra += 1
                if extra >= k:
                    break
        scored = sorted(cands, key=lambda w: (-self.prob(w, u, v), w))
        return scored[:k]

    def _prefix_ranked(self, partial: str) -> list[str]:
        if len(partial) <= self.max_prefix_index:
            return self._by_prefix.get(partial, [])
        return [w for w in self._by_prefix.get(partial[: self.max_prefix_index], []) if w.startswith(partial)]

    def message_logprob(self, text: str) -> tuple[float, int]:
        """Natural-log probability of a message's words and </s>, and that count of events."""
        seq = [BOS, BOS, *words(text), EOS]
        lp = sum(math.log(self.prob(w, u, v)) for u, v, w in zip(seq, seq[1:], seq[2:], strict=False))
        return lp, len(seq) - 2
