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
import threading
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import _record  # noqa: E402
from tests.servers import fresh_pg_database  # noqa: E402

STAGES = ("selecting", "advertise_keys", "share_keys", "masked_input", "unmask", "aggregating")
MARKS = ("start", "advertised", "shared", "uploaded", "unmasked")
GROUPS = ("coordinator", "postgres", "devices", "driver")
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds) of every process readable in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        out[int(name)] = (
            int(rest[1]),
            cmd or stat[stat.index("(") + 1 : stat.rindex(")")],
            (int(rest[11]) + int(rest[12])) / _TICK,
        )
    return out


class CpuSampler:
    """CPU seconds of the coordinator, PostgreSQL, the device workers and this driver, sampled
    every ``every`` seconds from /proc (a process's time counts from its start; exited processes
    keep their last sample)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _group(self, pid: int, table: dict[int, tuple[int, str, float]]) -> str | None:
        me = os.getpid()
        if pid == me:
            return "driver"
        cmd = table[pid][1]
        if "postgres" in cmd:
            return "postgres"
        p, seen = pid, 0
        while p in table and p > 1 and seen < 64:
            if "coordinator serve" in table[p][1]:
                return "coordinator"
            if table[p][0] == me:
                return "coordinator" if "coordinator" in table[p][1] else "devices"
            p, seen = table[p][0], seen + 1
        return None

    def sample(self) -> None:
        table = _proc_table()
        for pid, (_, _, cpu) in table.items():
            group = self._group(pid, table)
            if group is not None:
                self._last[pid] = (group, cpu)
        totals = dict.fromkeys(GROUPS, 0.0)
        for group, cpu in self._last.values():
            totals[group] += cpu
        self.samples.append((time.time(), totals))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per group spent between two wall-clock times (nearest samples)."""

        def at(t: float) -> dict[str, float]:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        a, b = at(t0), at(t1)
        return {g: b[g] - a[g] for g in GROUPS}


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def latency_lines(rounds: list[dict[str, Any]], devices: list[dict[str, Any]]) -> list[str]:
    """Per committed round: when the selected devices reached each step, in seconds after the
    selection closed (median / 90th percentile over the devices that reached it)."""
    lines = [
        "| round | devices | " + " | ".join(f"{m} p50 / p90 s" for m in MARKS) + " |",
        "|---|---|" + "---|" * len(MARKS),
    ]
    for r in rounds:
        closed = r["created_ts"] + float((r.get("stage_seconds") or {}).get("selecting") or 0.0)
        marks = [
            d_r.marks or {}
            for d in devices
            for d_r in d.get("rounds", [])
            if d_r.round == r["round_id"] and d_r.kind == "train"
        ]
        cells = []
        for m in MARKS:
            lat = [mk[m] - closed for mk in marks if m in mk]
            cells.append(f"{_pct(lat, 0.5):.1f} / {_pct(lat, 0.9):.1f} ({len(lat)})" if lat else "")
        lines.append(f"| {r['round']} | {len(marks)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    from simulator.config import SimConfig
    from simulator.run import default_workers, local_coordinator, run_simulation

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
        min_reports=max(3, args.per_round // 2),
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
        CpuSampler() as cpu,
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
        "| round | outcome | selected | reported | wall s | "
        + " | ".join(STAGES)
        + " | CPU s: "
        + " / ".join(GROUPS)
        + " |",
        "|---|---|---|---|---|" + "---|" * (len(STAGES) + 1),
    ]
    for r in train:
        st = r.get("stage_seconds") or {}
        used = cpu.between(r["created_ts"], r["created_ts"] + r["wall_seconds"])
        lines.append(
            f"| {r['round']} | {r['outcome']} | {r['selected']} | {r['reported']} | {r['wall_seconds']:.1f} | "
            + " | ".join(f"{st[s]:.1f}" if isinstance(st.get(s), int | float) else "" for s in STAGES)
            + " | "
            + " / ".join(f"{used[g]:.1f}" for g in GROUPS)
            + " |"
        )
    lines += [
        "",
        "When the selected devices got there, seconds after the selection closed (p50 / p90, and how many):",
        "",
        *latency_lines(train, res.devices),
    ]
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
