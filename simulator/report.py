"""Plots (PNG) and one HTML page with the tables and plots of a simulation or comparison."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protocol.wire import RoundKind

__all__ = ["plot_privacy", "plot_time_to_accuracy", "write_report"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_lines(
    runs: Sequence[Any],
    baselines: dict[str, float],
    out: Path,
    points: Callable[[Any], list[tuple[float, float]]],
    xlabel: str,
    name: str,
) -> Path:
    """Top-1 (%) of every run against ``points(run)``'s x, with the baselines as dashed lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot(*zip(*points(r), strict=True), marker="o", label=r.config.name)
    for i, (label, value) in enumerate(baselines.items()):
        ax.axhline(100 * value, ls="--", lw=1, color=f"C{len(runs) + i}", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("heldout top-1 next-word accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(runs: Sequence[Any], baselines: dict[str, float], out: Path) -> Path:
    def points(r: Any) -> list[tuple[float, float]]:
        return [(v, 100 * r.evals[v]["top1"]) for v in sorted(r.evals)]

    return _accuracy_lines(runs, baselines, out, points, "model version (committed rounds)", "accuracy.png")


def plot_bytes(runs: Sequence[Any], out: Path) -> Path:
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
    fig.tight_layout()
    path = out / "bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    for s in stages:
        vals = [r.get("dropped", {}).get(s, 0) for r in rs]
        ax2.bar(hours, vals, bottom=bottom, width=0.25, label=f"dropped at {s}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_xlabel("simulated time of day (start of round)")
    ticks = ax2.get_xticks()
    ax2.set_xticks(ticks, [f"{int(t) % 24:02d}:00" for t in ticks])
    ax2.set_ylabel("drop-outs")
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
    fig.tight_layout()
    path = out / "privacy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_to_accuracy(runs: Sequence[Any], baselines: dict[str, float], out: Path) -> Path:
    """Heldout top-1 against simulated hours, one line per run."""

    def points(r: Any) -> list[tuple[float, float]]:
        end = {x["new_version"]: x["t"] + x["wall_seconds"] for x in r.rounds if x.get("new_version")}
        return sorted(
            (end.get(v, 0.0) * 24 / r.config.day_seconds, 100 * e["top1"]) for v, e in r.evals.items()
        )

    return _accuracy_lines(runs, baselines, out, points, "simulated hours", "time_to_accuracy.png")


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


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
    """Write PNG plots and ``report.html`` into ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_accuracy(runs, baselines, out), plot_bytes(runs, out)]
    if privacy_rows:
        images.insert(0, plot_privacy(privacy_rows, baselines["pretrained"], out))
    if time_plot:
        images.insert(0, plot_time_to_accuracy(runs, baselines, out))
    images += [plot_participation(r, out) for r in runs if r.rounds]
    per_round = "".join(
        f"<h3>{html.escape(r.config.name)}</h3>"
        + _table(
            [
                {k: v for k, v in x.items() if k not in ("device_bytes", "stage_seconds", "dropped")}
                for x in r.rounds
            ]
        )
        for r in runs
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    )
    configs = html.escape(json.dumps([r.config.__dict__ for r in runs], indent=1, default=str))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{style}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>{_table(summary_rows)}
<h2>Plots</h2>{"".join(f'<p><img src="{p.name}"></p>' for p in images)}
<h2>Per round</h2>{per_round}
<h2>Configurations</h2><pre>{configs}</pre>
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
