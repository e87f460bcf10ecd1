"""Simulation overhead (issue 6): the fleet, coordinator and protocol with training replaced by
a no-op (each device uploads a zero delta of the demo model's size, encoded, masked and
bit-packed like a real one).

    .venv/bin/python bench/sim_overhead.py [--devices 1000] [--per-round 100] [--rounds 6]

Goal: 1,000 devices, 100 per round, demo model size, compression and secure aggregation on,
over TLS: a round in under 10 s on this 2-core machine. Prints per-round wall time and stage
durations and records the table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import _record  # noqa: E402
from tests.servers import fresh_pg_database  # noqa: E402

STAGES = ("selecting", "advertise_keys", "share_keys", "masked_input", "unmask", "aggregating")


def main() -> None:
    from simulator.run import SimConfig, default_workers, local_coordinator, run_simulation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "artifacts/demo/bundle")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--coordinator-workers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="device worker processes (0: the default)")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        print(f"no bundle at {args.bundle}: run `make demo` first", file=sys.stderr)
        raise SystemExit(2)
    cfg = replace(
        SimConfig(),
        name="noop",
        devices=args.devices,
        per_round=args.per_round,
        rounds=args.rounds,
        min_reports=args.per_round // 2,
        noop_training=True,
        eval_every=10_000,
        eval_messages=20,
        day_seconds=86_400.0,  # real time: a night long enough that the fleet stays eligible
        start_hour=1.0,
        max_minutes=30,
        workers=args.workers,
    )
    tmp = Path(tempfile.mkdtemp(prefix="fedkeys-overhead-"))
    # PostgreSQL, as a deployment of this size would run: SQLite serialises every transaction
    # and 1,000 devices polling during selection saturate its single writer.
    with (
        fresh_pg_database() as db_url,
        local_coordinator(tmp / "coord", workers=args.coordinator_workers, db_url=db_url) as coord,
    ):
        res = run_simulation(cfg, args.bundle, tmp / "out", coord)
    train = [r for r in res.rounds if r["kind"] == "train"]
    committed = [r for r in train if r["outcome"] == "committed"]
    lines = [
        "## Simulation overhead (issue 6)",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores. `bench/sim_overhead.py "
        f"--devices {args.devices} --per-round {args.per_round} --rounds {args.rounds}`: no-op training, "
        f"demo model size ({res.summary()['upload_bytes_per_device'] or 0:.0f} B uploaded per device), "
        "compression (rotation, 1/16 of the coordinates, 5 bits) and secure aggregation on, TLS, "
        f"PostgreSQL, {args.coordinator_workers} coordinator worker(s); the devices run as threads in "
        f"{args.workers or default_workers(args.devices)} processes on the same cores. Wall = round created -> committed "
        "(selection included).",
        "",
        "| round | outcome | selected | reported | wall s | " + " | ".join(STAGES) + " |",
        "|---|---|---|---|---|" + "---|" * len(STAGES),
    ]
    for r in train:
        st = r.get("stage_seconds") or {}
        lines.append(
            f"| {r['round']} | {r['outcome']} | {r['selected']} | {r['reported']} | {r['wall_seconds']:.1f} | "
            + " | ".join(f"{st[s]:.1f}" if isinstance(st.get(s), int | float) else "" for s in STAGES)
            + " |"
        )
    walls = [r["wall_seconds"] for r in committed]
    verdict = (
        f"median {statistics.median(walls):.1f} s per committed round ({len(committed)} of {len(train)}); goal < 10 s"
        if walls
        else "no round committed"
    )
    lines += ["", verdict + f"; whole run {res.seconds / 60:.1f} min."]
    body = "\n".join(lines)
    print(body)
    _record("Simulation overhead (issue 6)", body)


if __name__ == "__main__":
    main()
