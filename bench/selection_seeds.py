"""Client selection over several seeds (issue 19): the runs of ``fedkeys simulate
--selection-compare random,least-recent,oort --seed S`` for a few seeds, read back from their
folders, as one table with the spread over seeds.

One seed decides nothing here: a seed draws the fleet's availability, speeds and data draws and
the heldout sample, and a strategy's lead in one run was within what another seed moves it (see
bench/RESULTS.md, "Client selection"). So every strategy is scored

- on time to a lift: the rounds (failed ones included), simulated hours and upload until the
  first evaluated version whose heldout top-1 is ``--lift`` points above the pretrained student
  on that seed's heldout sample (min / median / max over seeds, and how many seeds reached it);
- on its last version against the pretrained student and against the first strategy, paired
  over the same heldout messages (each seed's strategies are scored on one sample; the seeds'
  samples are pooled into one paired bootstrap, :func:`model_export.stats.paired_bootstrap`),
  with each seed's own difference beside it, so run-to-run spread shows next to message noise.

    .venv/bin/python bench/selection_seeds.py artifacts/sel-s0/2026* artifacts/sel-s1/2026* ... \\
        --lift 0.3 --plot bench/plots/population-selection.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_export.stats import paired_bootstrap  # noqa: E402 (after the path set-up)
from simulator.records import progress  # noqa: E402


@dataclass
class Run:
    """One strategy's run of one seed, as its folder holds it."""

    seed: int
    strategy: str
    top1: dict[int, float]  # version -> heldout top-1
    at: dict[int, dict[str, float]]  # version -> rounds, sim_hours, upload_bytes
    hits: dict[int, np.ndarray]  # version -> per-message top-1 hits
    words: np.ndarray  # per-message next-word targets (the seed's sample)
    participation: dict[str, Any]


def load(folder: Path) -> list[Run]:
    """The strategies' runs in one ``--selection-compare`` output folder."""
    top = folder / "summary.json"  # written when every strategy has run
    shares = {r["strategy"]: r for r in json.loads(top.read_text())["rows"]} if top.is_file() else {}
    runs = []
    for sub in sorted(p for p in folder.iterdir() if (p / "evals.json").is_file()):
        summary = json.loads((sub / "summary.json").read_text())
        cfg = summary["config"]
        evals = {int(v): e for v, e in json.loads((sub / "evals.json").read_text()).items()}
        arrays = np.load(sub / "per_message.npz")
        rounds = json.loads((sub / "rounds.json").read_text())
        strategy = cfg["selection"]
        runs.append(
            Run(
                seed=int(cfg["seed"]),
                strategy=strategy,
                top1={v: float(e["top1"]) for v, e in evals.items()},
                at=progress(rounds, set(evals), float(cfg["day_seconds"])),
                hits={v: arrays[f"v{v}_top1"] for v in evals},
                words=arrays["v0_words"],
                participation={k: shares.get(strategy, {}).get(k) for k in ("devices_participating", "gini")},
            )
        )
    return runs


def to_lift(run: Run, lift: float) -> dict[str, float] | None:
    """Where the run stood at its first version ``lift`` (fraction) above its pretrained top-1."""
    hit = next((v for v in sorted(run.top1) if v > 0 and run.top1[v] >= run.top1[0] + lift), None)
    return run.at.get(hit) if hit is not None else None


def _spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    return f"{min(xs):{fmt}} / {statistics.median(xs):{fmt}} / {max(xs):{fmt}}"


def _known(runs: list[Run], key: str) -> list[float]:
    """A participation measure of the runs that recorded it (their folder's summary.json)."""
    return [float(v) for r in runs if (v := r.participation.get(key)) is not None]


def _ci(a: list[np.ndarray], b: list[np.ndarray], words: list[np.ndarray]) -> str:
    d = paired_bootstrap(np.concatenate(a), np.concatenate(b), np.concatenate(words))
    return f"{d.estimate * 100:+.2f} [{d.low * 100:+.2f}, {d.high * 100:+.2f}]"


def table(runs: list[Run], lift: float, ref: str) -> list[str]:
    """Markdown rows: one per strategy, the reference ``ref`` first, each paired with it."""
    strategies = list(dict.fromkeys([ref, *sorted(r.strategy for r in runs)]))
    seeds = sorted({r.seed for r in runs})
    by = {(r.strategy, r.seed): r for r in runs}
    if not any(r.strategy == ref for r in runs):
        sys.exit(f"no {ref} runs to compare the others with (--reference)")
    lines = [
        f"| strategy | seeds reaching +{lift * 100:.2f} points | rounds to it | sim hours to it | "
        f"upload MB to it | last version vs pretrained [95% CI] | vs {ref} [95% CI] | "
        f"vs {ref}, per seed | devices participating | Gini |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in strategies:
        mine = [by[s, k] for k in seeds if (s, k) in by]
        reached = [a for r in mine if (a := to_lift(r, lift)) is not None]
        last = [r.hits[max(r.hits)] for r in mine]
        words = [r.words for r in mine]
        refs = [by[ref, r.seed] for r in mine]
        per_seed = ", ".join(
            f"{(r.top1[max(r.top1)] - o.top1[max(o.top1)]) * 100:+.2f}"
            for r, o in zip(mine, refs, strict=True)
        )
        lines.append(
            f"| {s} | {len(reached)} of {len(mine)} | {_spread([a['rounds'] for a in reached], '.0f')} | "
            f"{_spread([a['sim_hours'] for a in reached], '.2f')} | "
            f"{_spread([a['upload_bytes'] / 1e6 for a in reached], '.0f')} | "
            f"{_ci(last, [r.hits[0] for r in mine], words)} | "
            + ("" if s == ref else f"{_ci(last, [o.hits[max(o.hits)] for o in refs], words)}")
            + f" | {'' if s == ref else per_seed} | "
            f"{_spread(_known(mine, 'devices_participating'), '.0f')} | "
            f"{_spread(_known(mine, 'gini'), '.2f')} |"
        )
    return lines


def curves(runs: list[Run]) -> list[str]:
    """Each run's lift over its pretrained student (points) at each evaluated version."""
    out = []
    for r in sorted(runs, key=lambda r: (r.strategy, r.seed)):
        pts = " ".join(
            f"r{r.at[v]['rounds']:.0f}@{r.at[v]['sim_hours']:.2f}h:{(r.top1[v] - r.top1[0]) * 100:+.2f}"
            for v in sorted(r.at)
            if v > 0
        )
        out.append(f"{r.strategy:<13} seed {r.seed}: {pts}")
    return out


def plot(runs: list[Run], path: Path) -> None:
    """Lift over the pretrained student against simulated hours: a colour per strategy, a line
    per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: (r.strategy, r.seed)):
        vs = sorted(r.at)
        line = ax.plot(
            [r.at[v]["sim_hours"] for v in vs],
            [(r.top1[v] - r.top1[0]) * 100 for v in vs],
            marker="o",
            ms=3,
            color=colours.get(r.strategy),
            label=None if r.strategy in colours else r.strategy,
            alpha=0.8,
        )
        colours.setdefault(r.strategy, line[0].get_color())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("heldout top-1 over the pretrained student (points)")
    ax.set_title("Client selection at population scale: one line per seed")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="--selection-compare output folders")
    ap.add_argument("--lift", type=float, default=0.3, help="target: points of top-1 above pretrained")
    ap.add_argument("--reference", default="random", help="the strategy the others are paired with")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    runs = [r for f in args.folders for r in load(f)]
    if not runs:
        sys.exit("no runs with evals.json under those folders")
    print("\n".join(curves(runs)))
    print()
    print("\n".join(table(runs, args.lift / 100, args.reference)))
    if args.plot is not None:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
