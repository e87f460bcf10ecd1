"""The comparison table: every model scored on the same heldout messages, each accuracy with
its 95% interval and each difference with a paired bootstrap interval (``model_export.stats``).

:func:`quality_table` takes the rows (a name, per-message counts, the row's kind and any extra
columns such as upload bytes, rounds or wall time) and returns the table as named columns;
:func:`markdown` renders it for bench/RESULTS.md. Federated rows also get their accuracy as a
share of the central fine-tune's, their lift over its interval's half-width, the difference to
the trigram on the same data and, where a row names one, the relative difference to another
federated row (compressed + secure against float32): the issue's targets, each with its CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from model_export.evaluate import MessageHits
from model_export.stats import DEFAULT_RESAMPLES, Interval, paired_bootstrap, paired_ratio, rate_ci

__all__ = ["TableRow", "cell", "ci_text", "markdown", "quality_table", "signed"]

Kind = Literal["reference", "federated", "central", "baseline"]


@dataclass
class TableRow:
    """One model of the comparison."""

    name: str
    hits: MessageHits  # per heldout message, in the sample's order
    kind: Kind = "baseline"
    columns: dict[str, Any] = field(default_factory=dict)  # shown after the accuracy columns
    relative_to: str | None = None  # another row: this row's relative difference to it, with CI


def signed(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}f}"


def ci_text(i: Interval, digits: int = 4, *, sign: bool = False, percent: bool = False) -> str:
    """``0.1714 [0.1690, 0.1738]``; ``sign``: ``+0.0015 [-0.0003, +0.0032]``; ``percent``:
    ``97.10% [96.52, 97.71]`` (with ``sign``: ``+0.35% [-0.41, +1.12]``)."""
    scale, digits, unit = (100.0, 2, "%") if percent else (1.0, digits, "")

    def f(x: float) -> str:
        return f"{scale * x:+.{digits}f}" if sign else f"{scale * x:.{digits}f}"

    return f"{f(i.estimate)}{unit} [{f(i.low)}, {f(i.high)}]"


def quality_table(
    rows: Sequence[TableRow],
    *,
    reference: str,
    central: str | None = None,
    ngram: str | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """The table's rows as dicts (every row the same columns, "" where a column does not
    apply). ``reference`` names the row every difference is taken to (the pretrained student),
    ``central`` the central fine-tune (federated rows' share of it), ``ngram`` the trigram on
    the same data (federated rows' difference to it). Every interval uses the same resamples
    (``seed``) of the same messages."""
    by_name = {r.name: r for r in rows}
    if len(by_name) != len(rows):
        raise ValueError("row names must be unique")
    for name in (reference, central, ngram, *(r.relative_to for r in rows)):
        if name is not None and name not in by_name:
            raise ValueError(f"no row named {name!r}")
    words = by_name[reference].hits.words
    for r in rows:
        if len(r.hits) != len(words) or not np.array_equal(r.hits.words, words):
            raise ValueError(f"{r.name!r} was not scored on the same messages as {reference!r}")
    kw: dict[str, Any] = {"resamples": resamples, "seed": seed, "level": level}
    ref = by_name[reference].hits
    pct = round(100 * level)
    out: list[dict[str, Any]] = []
    for r in rows:
        top1 = rate_ci(r.hits.top1, words, **kw)
        row: dict[str, Any] = {
            "model": r.name,
            "top-1": round(top1.estimate, 4),
            f"top-1 {pct}% CI": f"[{top1.low:.4f}, {top1.high:.4f}]",
            "top-3": round(float(r.hits.top3.sum() / words.sum()), 4),
            f"top-1 vs {reference} [{pct}% CI]": "",
            "lift / CI half-width": "",
            "top-3 vs reference": "",
        }
        if r.name != reference:
            d = paired_bootstrap(r.hits.top1, ref.top1, words, **kw)
            d3 = paired_bootstrap(r.hits.top3, ref.top3, words, **kw)
            row[f"top-1 vs {reference} [{pct}% CI]"] = ci_text(d, sign=True)
            row["lift / CI half-width"] = round(d.estimate / d.half_width, 1) if d.half_width > 0 else ""
            row["top-3 vs reference"] = signed(d3.estimate)
        row["top-1 / central fine-tune"] = ""
        row["vs trigram (same data)"] = ""
        row["relative to"] = ""
        if r.kind == "federated":
            if central is not None:
                row["top-1 / central fine-tune"] = ci_text(
                    paired_ratio(r.hits.top1, by_name[central].hits.top1, words, **kw), percent=True
                )
            if ngram is not None:
                row["vs trigram (same data)"] = ci_text(
                    paired_bootstrap(r.hits.top1, by_name[ngram].hits.top1, words, **kw), sign=True
                )
        if r.relative_to is not None:
            other = by_name[r.relative_to].hits.top1
            q = paired_ratio(r.hits.top1, other, words, **kw)
            rel = Interval(q.estimate - 1, q.low - 1, q.high - 1)
            row["relative to"] = f"{r.relative_to}: {ci_text(rel, sign=True, percent=True)}"
        out.append(row | r.columns)
    cols = list(dict.fromkeys(k for row in out for k in row))
    return [{c: row.get(c, "") for c in cols} for row in out]


def cell(v: Any) -> str:
    """A table cell's text (Markdown and the HTML report): floats to 4 significant digits
    (NaN empty; from 10,000 on whole, with thousands separators, never ``1.028e+04``),
    integers with thousands separators, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        if np.isnan(v):
            return ""
        return f"{v:,.0f}" if np.isfinite(v) and abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of dict rows (the columns of the first row)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)
