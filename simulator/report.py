"""Plots (PNG) and one HTML page with the tables and plots of a simulation or comparison.

The accuracy curves (:func:`plot_curves`) put every run's heldout top-1 against three measures
of what it cost: training rounds, simulated hours and the bytes its devices uploaded
(``simulator.records.version_progress``), with the baselines (the pretrained student, the
central models, the trigrams) as horizontal lines. The page shows the summary or comparison
table as given (a comparison's rows carry their 95% intervals, ``simulator.table``), the
heldout sample a comparison was scored on (its ``comparison.json``, when in the same folder),
and each run's rounds as readable columns (``simulator.records.readable_rounds``).
"""

from __future__ import annotations

import html
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol.wire import RoundKind
from simulator.records import clock, readable_rounds, version_progress
from simulator.table import cell

__all__ = ["plot_bytes", "plot_curves", "plot_privacy", "plot_time_to_accuracy", "write_report"]

_CURVES = (
    ("rounds", "training rounds (failed ones included)", 1.0, False),
    ("sim_hours", "simulated hours since the fleet's start", 1.0, False),
    ("upload_bytes", "uploaded by the fleet's devices (MB, cumulative, log scale)", 1e-6, True),
)
"""The x axes of :func:`plot_curves`: a ``version_progress`` key, its label, a scale, log."""


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(run: Any, key: str, scale: float, log: bool) -> list[tuple[float, float]]:
    """(x, top-1 %) of the run's evaluated versions against ``version_progress``'s ``key``
    (on a log axis the zero point, before any upload, has no place)."""
    prog = version_progress(run)
    pts = sorted((scale * p[key], 100 * run.evals[v]["top1"]) for v, p in prog.items())
    return [(x, y) for x, y in pts if x > 0 or not log]


def _baseline_lines(ax: Any, baselines: dict[str, float], first_color: int) -> None:
    styles = ("--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))
    for i, (label, value) in enumerate(baselines.items()):
        style = styles[i % len(styles)]
        color = f"C{first_color + i}"
        ax.axhline(100 * value, ls=style, lw=1.2, color=color, label=f"{label}: {100 * value:.2f}%")


def _plain(x: float, _pos: Any = None) -> str:
    """A log axis's tick as a plain number (``0.2``, ``50``), not ``2x10^-1``."""
    return f"{x:g}"


def _minor_label(ax: Any) -> Any:
    """Labels for a log axis's minor ticks (a narrow axis has few major ticks, or none): every
    one while the axis spans at most 0.7 decades, 2 and 5 times a power of ten up to a decade
    and a half, none beyond."""

    def label(x: float, _pos: Any = None) -> str:
        low, high = ax.get_xlim()
        if x <= 0 or low <= 0:
            return ""
        span = math.log10(high / low)
        mantissa = round(x / 10 ** math.floor(math.log10(x)))
        return _plain(x) if span <= 0.7 or (span <= 1.5 and mantissa in (2, 5)) else ""

    return label


def plot_curves(runs: Sequence[Any], baselines: dict[str, float], out: Path) -> Path:
    """``accuracy.png``: heldout top-1 of every run against training rounds, simulated hours
    and uploaded bytes (one panel each, the same y axis), baselines dashed across all three."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(1, len(_CURVES), figsize=(13, 4.6), sharey=True)
    for ax, (key, xlabel, scale, log) in zip(axes, _CURVES, strict=True):
        for r in runs:
            pts = _curve(r, key, scale, log)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=r.config.name)
        _baseline_lines(ax, baselines, len(runs))
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label(ax)))
        elif key == "rounds":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("heldout top-1 next-word accuracy (%)")
    messages = {r.evals[v].get("messages") for r in runs for v in r.evals}
    if len(messages) == 1 and None not in messages:
        fig.suptitle(f"heldout top-1 on the curves' {messages.pop():,} heldout messages", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    rows = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(runs: Sequence[Any], out: Path) -> Path:
    """``bytes.png``: median upload and download per participating device, per round."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        pts = [
            (x["round"], x.get("bytes_up_per_device", 0) / 1e3)
            for x in r.rounds
            if x.get("bytes_up_per_device")
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=f"{r.config.name}: upload")
        pts = [
            (x["round"], x.get("bytes_down_per_device", 0) / 1e3)
            for x in r.rounds
            if x.get("bytes_down_per_device")
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), ls=":", label=f"{r.config.name}: download")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("kB per participating device (median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "bytes.png")


def plot_participation(run: Any, out: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    rs = [r for r in run.rounds if r["kind"] == RoundKind.TRAIN]
    # hours since the run's simulated start, so that a night is not split at midnight
    start = run.config.start_hour
    hours = [start + (r["sim_hour"] - start) % 24 for r in rs]
    ax1.scatter(
        hours, [r.get("candidates") or 0 for r in rs], label="eligible check-ins (selection pool)", s=14
    )
    ax1.scatter(hours, [r["reported"] for r in rs], label="reported", s=14)
    ax1.set_ylabel("devices")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    stages = sorted({s for r in rs for s in r.get("dropped", {})})
    bottom = [0] * len(rs)
    gaps = [b - a for a, b in itertools.pairwise(sorted(hours)) if b > a]
    width = min(0.25, 0.8 * min(gaps)) if gaps else 0.25  # bars of neighbouring rounds apart
    for s in stages:
        vals = [r.get("dropped", {}).get(s, 0) for r in rs]
        ax2.bar(hours, vals, bottom=bottom, width=width, label=f"dropped at {s}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_xlabel("simulated time of day (start of round)")
    ticks = ax2.get_xticks()
    ax2.set_xticks(ticks, [clock(t % 24) for t in ticks])
    ax2.set_ylabel("drop-outs")
    if stages:
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"participation-{run.config.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_privacy(rows: list[dict[str, Any]], pretrained: float, out: Path) -> Path:
    """Top-1 against epsilon (log scale; the non-private run drawn at the right edge)."""
    plt = _plt()
    pts = [(r["epsilon"], r["top1"]) for r in rows if isinstance(r.get("epsilon"), float)]
    finite = sorted((e, t) for e, t in pts if e != float("inf"))
    free = [t for e, t in pts if e == float("inf")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if finite:
        ax.plot(
            [e for e, _ in finite], [100 * t for _, t in finite], marker="o", label="private (spent epsilon)"
        )
    right = 2 * max([e for e, _ in finite], default=10.0)
    for t in free:
        ax.scatter([right], [100 * t], marker="*", s=120, color="C2", label="non-private (epsilon = inf)")
    ax.axhline(100 * pretrained, ls="--", lw=1, color="C3", label="pretrained student")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta = 1/N^1.1)")
    ax.set_ylabel("heldout top-1 next-word accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "privacy.png")


def plot_time_to_accuracy(runs: Sequence[Any], baselines: dict[str, float], out: Path) -> Path:
    """``time_to_accuracy.png``: heldout top-1 against simulated hours, one line per run, on a
    panel of its own (the selection comparison's question: which strategy gets there first)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        pts = _curve(r, "sim_hours", 1.0, False)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=r.config.name)
    _baseline_lines(ax, baselines, len(runs))
    ax.set_xlabel("simulated hours since the fleet's start")
    ax.set_ylabel("heldout top-1 next-word accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "time_to_accuracy.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write (110 dpi) and close one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def _sample_note(out: Path) -> str:
    """The heldout sample a comparison in ``out`` was scored on (``comparison.json``)."""
    path = out / "comparison.json"
    if not path.exists():
        return ""
    s = json.loads(path.read_text()).get("sample", {})
    if not s:
        return ""
    return (
        f"<p>Every row is scored on the same heldout sample: {s['messages']:,} messages "
        f"({s['words']:,} next-word targets) of {s['participants']} heldout participants "
        f"(sample {html.escape(str(s['fingerprint']))}); 95% intervals are paired bootstrap "
        f"intervals over heldout messages. The curves use a nested subsample of "
        f"{s['curve_messages']:,} messages. The central models trained on the "
        f"{s['fleet_training_messages']:,} messages the fleet's devices hold.</p>"
    )


def write_report(
    runs: Sequence[Any],
    out: Path,
    *,
    summary_rows: list[dict[str, Any]],
    baselines: dict[str, float],
    title: str,
    privacy_rows: list[dict[str, Any]] | None = None,
    time_plot: bool = False,
) -> Path:
    """Write PNG plots and ``report.html`` into ``out``; returns the HTML path. ``baselines``:
    name -> top-1 on the curves' messages, drawn as horizontal lines; ``time_plot`` adds a
    panel of its own for top-1 against simulated hours."""
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_curves(runs, baselines, out), plot_bytes(runs, out)]
    if privacy_rows:
        images.insert(0, plot_privacy(privacy_rows, baselines["pretrained"], out))
    if time_plot:
        images.insert(0, plot_time_to_accuracy(runs, baselines, out))
    images += [plot_participation(r, out) for r in runs if r.rounds]
    per_round = "".join(f"<h3>{html.escape(r.config.name)}</h3>" + _table(readable_rounds(r)) for r in runs)
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}.wide{overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    )
    configs = html.escape(json.dumps([r.config.__dict__ for r in runs], indent=1, default=str))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{style}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>{_sample_note(out)}{_table(summary_rows)}
<h2>Plots</h2>{"".join(f'<p><img src="{p.name}"></p>' for p in images)}
<h2>Per round</h2>{per_round}
<h2>Configurations</h2><pre>{configs}</pre>
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
