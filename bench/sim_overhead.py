"""Simulation overhead (issues 6 and 19): the fleet, coordinator and protocol with training
replaced by a no-op (each device uploads a zero delta of the demo model's size, encoded, masked
and bit-packed like a real one).

    .venv/bin/python bench/sim_overhead.py [--devices 1000] [--per-round 100] [--rounds 6]
        [--db postgres|sqlite] [--coordinator-workers 2] [--no-route-cpu] [--py-spy SECONDS]
        [--bundle DIR] [--out FILE.md]

Goals: 1,000 devices, 100 per round, demo model size, compression and secure aggregation on,
over TLS: a round in under 10 s on this 2-core machine (issue 6); at most 50 ms of coordinator
CPU per selected device-round and non-training time at most 30% of a round (issue 19). Prints,
per round: wall time and stage durations, CPU seconds of this run's process groups (its own
coordinator, its database's PostgreSQL backends, the device processes, this driver) and the
coordinator's per selected device, and the coordinator's requests and CPU per route
(``FEDKEYS_ROUTE_CPU_LOG_SECONDS``, coordinator.profiling; ``--no-route-cpu`` leaves it off,
since the metering costs CPU of its own); with ``--py-spy`` the coordinator workers' hottest
functions over that many seconds of the run (py-spy from the ``dev`` extra). Without
``--bundle`` it uses the demo's bundle if ``make demo`` built one, else a bundle of the demo
profile's shapes whose models are trained for one step (built once, a few minutes): training is
a no-op here, so only the sizes matter. Writes the tables to ``--out`` (markdown);
bench/RESULTS.md sections are written by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
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
    """CPU seconds of this run's coordinator (its process and everything under it), its
    PostgreSQL backends (those connected to its database), the device workers (this driver's
    other children) and this driver, sampled every ``every`` seconds from /proc (a process's
    time counts from its start; exited processes keep their last sample). Only this run's
    processes: the machine is shared, and other coordinators or databases are not ours."""

    def __init__(self, coordinator_pid: int, database: str | None, every: float = 0.5) -> None:
        self.coordinator_pid = coordinator_pid
        self.database = database  # PostgreSQL: the database name in its backends' titles
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
        if cmd.startswith("postgres:"):
            return "postgres" if self.database is not None and f" {self.database} " in cmd else None
        p, seen = pid, 0
        while p in table and p > 1 and seen < 64:
            if p == self.coordinator_pid:
                return "coordinator"
            if table[p][0] == me:
                return "devices" if "py-spy" not in table[p][1] else None
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


ROUTE_CPU_EVERY = 1.0  # seconds between the coordinator workers' CPU-per-route log lines


def route_cpu_samples(log: Path) -> dict[int, list[tuple[float, float, dict[str, list[float]]]]]:
    """pid -> [(time, process CPU s, {route: [requests, CPU s]})] from the coordinator's log
    (cumulative per worker, see coordinator.profiling)."""
    out: dict[int, list[tuple[float, float, dict[str, list[float]]]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"route cpu"' not in line:
            continue
        try:
            rec = json.loads(line)
            body = json.loads(rec["msg"])
        except (ValueError, KeyError):
            continue
        out.setdefault(body["pid"], []).append((rec["ts"], body["process_cpu"], body["routes"]))
    return out


def route_cpu_between(
    samples: dict[int, list[tuple[float, float, dict[str, list[float]]]]], t0: float, t1: float
) -> tuple[float, dict[str, tuple[float, float]]]:
    """Coordinator process CPU and {route: (requests, CPU s)} between two times, summed over
    the workers (nearest samples, ROUTE_CPU_EVERY apart)."""
    total = 0.0
    routes: dict[str, list[float]] = {}
    for series in samples.values():
        a = min(series, key=lambda s: abs(s[0] - t0))
        b = min(series, key=lambda s: abs(s[0] - t1))
        total += b[1] - a[1]
        for route, (n, cpu) in b[2].items():
            n0, c0 = a[2].get(route, (0, 0.0))
            row = routes.setdefault(route, [0.0, 0.0])
            row[0] += n - n0
            row[1] += cpu - c0
    return total, {k: (v[0], v[1]) for k, v in routes.items()}


def route_lines(
    per_round: list[tuple[float, dict[str, tuple[float, float]]]], selected: list[int]
) -> list[str]:
    """Per route: requests and CPU per round (median, min-max over the rounds), ms per request
    and per selected device-round; the process CPU no request accounts for last."""
    names = sorted(
        {k for _, r in per_round for k in r}, key=lambda k: -sum(r.get(k, (0, 0))[1] for _, r in per_round)
    )
    lines = [
        "| route | requests / round (median, min-max) | CPU s / round (median, min-max) | ms / request | ms / selected device |",
        "|---|---|---|---|---|",
    ]

    def cell(v: list[float], fmt: str) -> str:
        return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"

    for k in names:
        n = [r.get(k, (0.0, 0.0))[0] for _, r in per_round]
        c = [r.get(k, (0.0, 0.0))[1] for _, r in per_round]
        if max(c) < 0.005 * max(1.0, statistics.median([t for t, _ in per_round])):
            continue
        per_req = 1000 * sum(c) / max(sum(n), 1)
        per_dev = 1000 * sum(c) / max(sum(selected), 1)
        lines.append(f"| `{k}` | {cell(n, '.0f')} | {cell(c, '.2f')} | {per_req:.1f} | {per_dev:.1f} |")
    rest = [t - sum(c for _, c in r.values()) for t, r in per_round]
    lines.append(
        f"| (not in any request: TLS and HTTP parsing, GC) | | {cell(rest, '.2f')} | | "
        f"{1000 * sum(rest) / max(sum(selected), 1):.1f} |"
    )
    return lines


def py_spy(pids: list[int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each coordinator worker: raw collapsed stacks of the threads that hold
    the interpreter lock (``--gil``: Python's CPU, not threads waiting on the database or a
    socket, which py-spy cannot always tell from work)."""
    exe = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                str(exe),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "50",
                "--format",
                "raw",
                "--output",
                str(out / f"py-spy-{pid}.txt"),
                "--nonblocking",
                "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def py_spy_lines(files: list[Path], top: int = 30) -> list[str]:
    """The hottest functions in the py-spy samples: self time (the sampled frame) and
    inclusive time (anywhere on the stack), in % of all samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = [fr.strip() for fr in stack.split(";") if fr.strip()]
            if not frames:
                continue
            total += n
            key = frames[-1]
            own[key] = own.get(key, 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n
    lines = [f"py-spy: {total} samples of the coordinator workers (50 Hz, threads holding the GIL)", ""]
    lines += ["| self % | function |", "|---|---|"]
    lines += [
        f"| {100 * n / max(total, 1):.1f} | `{k}` |"
        for k, n in sorted(own.items(), key=lambda x: -x[1])[:top]
    ]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [
        f"| {100 * n / max(total, 1):.1f} | `{k}` |"
        for k, n in sorted(incl.items(), key=lambda x: -x[1])[: 2 * top]
    ]
    return lines


def coordinator_workers(proc_pid: int) -> list[int]:
    """The uvicorn worker processes under the coordinator's process (or itself alone)."""
    table = _proc_table()
    kids = [
        pid
        for pid, (ppid, cmd, _) in table.items()
        if ppid == proc_pid and "multiprocessing" in cmd and "resource_tracker" not in cmd
    ]
    return kids or [proc_pid]


OVERHEAD_BUNDLES = ROOT / ".cache" / "overhead-bundles"
BUNDLE_SHAPERS = (
    "model_export/model.py",
    "model_export/export.py",
    "protocol/bundle.py",
    "protocol/layout.py",
)


def demo_shaped_bundle() -> Path:
    """A bundle of the demo profile's shapes (tokenizer, student, programs) whose models are
    trained for one step only: the overhead benchmark trains nothing, so only the sizes matter,
    and this takes minutes where the demo build takes tens of them. Built once per profile and
    version of the files that shape a bundle (the model, its export, the bundle format), under a
    file lock."""
    import fcntl
    import hashlib
    import logging

    from model_export.pipeline import build
    from model_export.profiles import get_profile

    demo = get_profile("demo")
    one_step = {"steps": 1, "warmup": 1, "eval_every": 1}
    profile = replace(
        demo,
        name="demo-shaped",
        teacher_train=replace(demo.teacher_train, **one_step),
        student_train=replace(demo.student_train, **one_step),
    )
    h = hashlib.sha256(repr(profile).encode())
    for f in BUNDLE_SHAPERS:
        h.update((ROOT / f).read_bytes())
    root = OVERHEAD_BUNDLES / h.hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "bundle" / "manifest.json").exists():
            logging.getLogger(__name__).warning("building a demo-shaped bundle in %s (minutes)", root)
            build(profile, root / "bundle", root / "work", evaluate=False)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return root / "bundle"


def main() -> None:
    from simulator.config import SimConfig
    from simulator.run import default_workers, local_coordinator, run_simulation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="a bundle (default: the demo's if `make demo` built it, else a demo-shaped one built here)",
    )
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--coordinator-workers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="device worker processes (0: the default)")
    ap.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    ap.add_argument("--py-spy", type=float, default=0.0, help="seconds of py-spy on the coordinator workers")
    ap.add_argument("--py-spy-after", type=float, default=60.0, help="start py-spy this many seconds in")
    ap.add_argument(
        "--no-route-cpu",
        action="store_true",
        help="leave the coordinator's CPU per route unmetered (the metering costs CPU of its own)",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    if args.bundle is None:
        demo = ROOT / "artifacts/demo/bundle"
        args.bundle = demo if (demo / "manifest.json").exists() else demo_shaped_bundle()
    elif not (args.bundle / "manifest.json").exists():
        print(f"no bundle at {args.bundle} (no manifest.json)", file=sys.stderr)
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
    # the coordinator inherits it
    os.environ["FEDKEYS_ROUTE_CPU_LOG_SECONDS"] = "0" if args.no_route_cpu else str(ROUTE_CPU_EVERY)
    spies: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        # PostgreSQL, as a deployment of this size would run; SQLite serialises every write
        # transaction (one writer for the whole fleet)
        db_url = stack.enter_context(fresh_pg_database()) if args.db == "postgres" else None
        coord = stack.enter_context(
            local_coordinator(tmp / "coord", workers=args.coordinator_workers, db_url=db_url)
        )
        assert coord.proc is not None
        cpu = stack.enter_context(CpuSampler(coord.proc.pid, db_url.rsplit("/", 1)[-1] if db_url else None))
        if args.py_spy > 0:
            assert coord.proc is not None

            def spy() -> None:
                time.sleep(args.py_spy_after)
                spies.extend(py_spy(coordinator_workers(coord.proc.pid), args.py_spy, tmp))  # type: ignore[union-attr]

            threading.Thread(target=spy, daemon=True).start()
        res = run_simulation(cfg, args.bundle, tmp / "out", coord)
        for p in spies:
            p.wait()
        assert coord.log is not None
        samples = route_cpu_samples(coord.log)
    train = [r for r in res.rounds if r["kind"] == "train"]
    committed = [r for r in train if r["outcome"] == "committed"]
    lines = [
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores. `bench/sim_overhead.py "
        f"--devices {args.devices} --per-round {args.per_round} --rounds {args.rounds} --db {args.db}"
        f"{' --no-route-cpu' if args.no_route_cpu else ''}`: no-op training, "
        f"demo model size ({res.summary()['upload_bytes_per_device'] or 0:.0f} B uploaded per device), "
        "compression (rotation, 1/16 of the coordinates, 5 bits) and secure aggregation on, TLS, "
        f"{'PostgreSQL' if args.db == 'postgres' else 'SQLite'}, {args.coordinator_workers} coordinator worker(s); "
        f"the devices run as threads in {args.workers or default_workers(args.devices)} processes on the same cores. "
        "Wall = round created -> committed (selection included); coord ms/dev = coordinator CPU per selected device.",
        "",
        "| round | outcome | selected | reported | wall s | "
        + " | ".join(STAGES)
        + " | CPU s: "
        + " / ".join(GROUPS)
        + " | coord ms/dev |",
        "|---|---|---|---|---|" + "---|" * (len(STAGES) + 2),
    ]
    per_round: list[tuple[float, dict[str, tuple[float, float]]]] = []
    selected: list[int] = []
    per_dev: list[float] = []
    for r in train:
        st = r.get("stage_seconds") or {}
        t0, t1 = r["created_ts"], r["created_ts"] + r["wall_seconds"]
        used = cpu.between(t0, t1)
        ms = 1000 * used["coordinator"] / max(r["selected"], 1)
        if r["outcome"] == "committed":
            per_dev.append(ms)
            if samples:
                per_round.append(route_cpu_between(samples, t0, t1))
                selected.append(r["selected"])
        lines.append(
            f"| {r['round']} | {r['outcome']} | {r['selected']} | {r['reported']} | {r['wall_seconds']:.1f} | "
            + " | ".join(f"{st[s]:.1f}" if isinstance(st.get(s), int | float) else "" for s in STAGES)
            + " | "
            + " / ".join(f"{used[g]:.1f}" for g in GROUPS)
            + f" | {ms:.0f} |"
        )
    lines += [
        "",
        "When the selected devices got there, seconds after the selection closed (p50 / p90, and how many):",
        "",
        *latency_lines(train, res.devices),
    ]
    walls = [r["wall_seconds"] for r in committed]
    verdict = (
        f"median {statistics.median(walls):.1f} s per committed round ({len(committed)} of {len(train)})"
        f"; coordinator CPU per selected device-round {statistics.median(per_dev):.0f} ms median "
        f"({min(per_dev):.0f}-{max(per_dev):.0f}; goal <= 50 ms)"
        if walls
        else "no round committed"
    )
    lines += ["", verdict + f"; whole run {res.seconds / 60:.1f} min."]
    if walls:
        # training is a no-op here: a committed round's wall time is all non-training time
        # (selection, key agreement, uploads, unmasking, aggregation); the issue's bound of 30%
        # of the round holds for local training of at least 7/3 of it
        lines += [
            "",
            f"Non-training time per committed round: {statistics.median(walls):.1f} s median "
            f"({min(walls):.1f}-{max(walls):.1f}); at most 30% of a round once local training "
            f"takes >= {statistics.median(walls) * 7 / 3:.0f} s per round.",
        ]
    if per_round:
        lines += [
            "",
            "Coordinator requests and CPU per route, committed rounds:",
            "",
            *route_lines(per_round, selected),
        ]
    if spies:
        lines += ["", *py_spy_lines(sorted(tmp.glob("py-spy-*.txt")))]
    body = "\n".join(lines)
    print(body)
    print(f"(run files in {tmp})", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(body + "\n")


if __name__ == "__main__":
    main()
