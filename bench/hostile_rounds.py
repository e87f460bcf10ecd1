"""Hostile devices in real rounds (issue 17): the scenario of tests/coordinator/test_hostile.py
(one hostile device playing every misbehaviour, one per round, beside three real honest agents,
against a real coordinator over TLS) on SQLite and on PostgreSQL, every misbehaviour included
(the known failures too). Prints one row per round (misbehaviour, database, outcome, reason, 4xx
and 5xx seen, seconds) and the summary the issue asks for, and appends both to bench/RESULTS.md
with the machine's facts.

    .venv/bin/python bench/hostile_rounds.py [--databases sqlite,postgres] [--gb 1] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.coordinator.hostile_scenario import (  # noqa: E402
    GB,
    ScenarioConfig,
    ScenarioResult,
    honest_texts,
    rounds_table,
    run_scenario,
    summary_table,
)
from tests.servers import fresh_pg_database, tiny_build  # noqa: E402

HEADING = "## Hostile devices in real rounds (issue 17)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, nproc {os.cpu_count()}, load average {load} (1/5/15 min)"


def run(database: str, cfg: ScenarioConfig) -> ScenarioResult:
    bundle = tiny_build() / "bundle"
    texts = honest_texts(cfg.honest)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hostile-rounds-")))
        url = (
            stack.enter_context(fresh_pg_database())
            if database == "postgres"
            else f"sqlite:///{tmp / 'c.db'}"
        )
        return run_scenario(tmp, url, bundle, texts, cfg)


def record(section: str) -> None:
    """Append ``section`` under this benchmark's heading (created at the end if missing)."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    if HEADING not in text:
        path.write_text(text.rstrip("\n") + f"\n\n{HEADING}\n\n{section}\n")
        return
    start = text.index(HEADING) + len(HEADING)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt
    path.write_text(text[:end].rstrip("\n") + f"\n\n{section}\n" + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    ap.add_argument("--gb", type=float, default=1.0, help="size of each huge body in GB (default 1)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = ap.parse_args()
    cfg = ScenarioConfig(body_bytes=int(args.gb * GB))
    started = datetime.now(UTC)
    before = machine()
    t0 = time.time()
    results = [run(db, cfg) for db in args.databases.split(",")]
    rounds, summary = rounds_table(results), summary_table(results)
    print(rounds, "\n", summary, sep="\n")
    problems = [f"{r.database}: {p.splitlines()[0]}" for r in results for p in r.problems]
    for p in problems:
        print("  PROBLEM:", p[:400])
    if args.no_record:
        return
    section = "\n".join(
        [
            f"**{started:%Y-%m-%d %H:%M} UTC, {time.time() - t0:.0f} s.** Machine: {before} before the run. "
            f"Command: `.venv/bin/python bench/hostile_rounds.py` (the scenario of "
            f"tests/coordinator/test_hostile.py: 3 honest agents + 1 hostile device, 4 selected per "
            f"round, min_reports 3, secure aggregation + compression, {args.gb:g} GB bodies).",
            "",
            summary,
            "",
            rounds,
            "",
            *(f"- {p[:300]}" for p in problems),
        ]
    )
    record(section.rstrip("\n"))


if __name__ == "__main__":
    main()
