"""Coordinator benchmarks (issue 4), recorded in bench/RESULTS.md:

1. Check-in throughput and latency (p50/p99) under concurrent load from a separate process,
   PostgreSQL, TLS (goal: >= 1,000 check-ins/s with p99 < 50 ms on this 2-core machine).
2. Check-in cost with 100k and 1M registered devices (must stay flat).
3. Upload ingest rate of masked updates into the running sum (MB/s).

    .venv/bin/python bench/coordinator_bench.py [--workers 2] [--seconds 20] [--skip-1m]

The load generator is wrk (``apt-get install wrk``; one thread, keep-alive HTTPS connections,
bench/checkin_load.lua), or without it an asyncio/httpx process; it shares the two cores with
the coordinator, so the figures are what one machine does end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import _record  # noqa: E402
from protocol.version import __version__  # noqa: E402
from tests.servers import fresh_pg_database, start_server, stop_server, tiny_build  # noqa: E402

STATE = {
    "charging": True,
    "idle": True,
    "unmetered": True,
    "battery_pct": 90.0,
    "free_storage_mb": 5000.0,
    "client_version": __version__,
    "examples": 100,
    "device_class": "phone",
}


def bulk_devices(db_url: str, n: int, prefix: str) -> list[str]:
    """Register ``n`` devices directly in the database (COPY); returns tokens of 2,000 of them."""
    import psycopg

    tokens = []
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY devices (id, token_hash, created_at, platform, device_class, client_version, participations,"
            " last_round_number, data_bucket, rate_window, rate_count) FROM STDIN"
        ) as copy:
            for i in range(n):
                token = f"{prefix}-{i}-bench-token"
                if i % max(n // 2000, 1) == 0:
                    tokens.append(token)
                digest = hashlib.sha256(token.encode()).hexdigest()
                copy.write_row(
                    (
                        f"{prefix}{i:030d}"[-32:],
                        digest,
                        "2026-01-01T00:00:00Z",
                        "bench",
                        "phone",
                        "0.1.0",
                        0,
                        -1_000_000_000,
                        7,
                        0,
                        0,
                    )
                )
        conn.commit()
    return tokens


async def load(url: str, ca: str, tokens: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    import httpx

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, verify=ca, limits=limits, timeout=30) as client:

        async def worker(i: int) -> None:
            nonlocal errors
            token = tokens[i % len(tokens)]
            headers = {"Authorization": f"Bearer {token}"}
            body = json.dumps({"state": STATE})
            k = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/checkin", content=body, headers={**headers, "Content-Type": "application/json"}
                )
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                k += 1
                token = tokens[(i + k * concurrency) % len(tokens)]
                headers = {"Authorization": f"Bearer {token}"}

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        took = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "rps": len(lat) / took,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * len(lat)) - 1],
        "errors": errors,
    }


def bench_task(server: Any, tar: Path, name: str, *, advertise_seconds: float) -> None:
    """A task whose rounds select 130 of the eligible check-ins (100 per round)."""
    from tests.coordinator.test_rounds import setup_task, task_config

    deadlines = {"selection": 10, "advertise": advertise_seconds, "share": 5, "upload": 5, "unmask": 5}
    cfg = task_config(
        clients_per_round=100,
        min_reports=50,
        max_rounds=None,
        eligibility={"min_examples": 10},
        deadlines=deadlines,
    )
    setup_task(server, tar, cfg, name=name)


def run_wrk(
    url: str, tokens: list[str], seconds: float, concurrency: int, delay_ms: int = 0
) -> dict[str, float]:
    """The load from wrk (C, one thread): it costs a fraction of a core, so the coordinator's
    figures are not capped by the load generator sharing the 2 cores. ``delay_ms`` > 0: each
    connection waits that long after an answer (paced load, see :func:`run_paced`)."""
    tf = Path(f"/tmp/fedkeys-bench-tokens-{os.getpid()}.txt")
    tf.write_text("\n".join(tokens) + "\n")
    env = {
        **os.environ,
        "FEDKEYS_TOKENS": str(tf),
        "FEDKEYS_BODY": json.dumps({"state": STATE}),
        "FEDKEYS_DELAY_MS": str(delay_ms),
    }
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:.0f}s",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench/checkin_load.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "requests": res["requests"],
        "rps": res["requests"] / res["seconds"],
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "errors": res["non2xx"] + res["socket_errors"],
        "generator": "wrk",
    }


def run_paced(url: str, tokens: list[str], seconds: float, concurrency: int, rate: float) -> dict[str, float]:
    """Latency at an offered rate rather than at saturation: ``concurrency`` connections, each
    pausing between an answer and its next request so that together they send about ``rate``
    check-ins/s (a closed loop's latency is mostly queueing: 64 connections in flight at
    1,000/s wait 64 ms on average by Little's law, however fast each answer is). The pause is
    set from two shorter runs' mean time per request, then the point is measured."""
    period_ms = 1000.0 * concurrency / rate
    delay = round(period_ms)
    for _ in range(2):  # the answer time depends on the load: correct the pause twice
        probe = run_wrk(url, tokens, max(seconds / 3, 3.0), concurrency, delay_ms=delay)
        answer_ms = max(1000.0 * concurrency / max(probe["rps"], 1.0) - delay, 0.0)
        delay = max(round(period_ms - answer_ms), 0)
    res = run_wrk(url, tokens, seconds, concurrency, delay_ms=delay)
    return {**res, "offered": rate}


def run_load(url: str, ca: str, tokens: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    """In a separate process (the load must not share the coordinator's interpreter): wrk when
    it is installed (``apt-get install wrk``), else the asyncio/httpx generator of this file."""
    if shutil.which("wrk"):
        return run_wrk(url, tokens, seconds, concurrency)
    tf = Path(f"/tmp/fedkeys-bench-tokens-{os.getpid()}.json")
    tf.write_text(json.dumps(tokens))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            url,
            "--ca",
            ca,
            "--tokens",
            str(tf),
            "--seconds",
            str(seconds),
            "--concurrency",
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "generator": "httpx"}


def ingest(server: Any, tiny_tar: Path, n_devices: int = 30) -> dict[str, float]:
    """Masked uploads of a secure round streamed into the running sum: MB/s at the API."""
    from tests.coordinator.scripted import ScriptedDevice
    from tests.coordinator.test_rounds import setup_task, task_config

    cfg = task_config(
        clients_per_round=n_devices,
        over_selection=1.0,
        min_reports=3,  # a secure sum needs at least three
        selection_pool=1.0,
        codec={"keep_fraction": 1.0, "bits": 8, "rotate": False},
        deadlines={"selection": 60, "advertise": 60, "share": 60, "upload": 120, "unmask": 60},
    )
    w0 = setup_task(server, tiny_tar, cfg, name="ingest")
    dim = int(w0.size)
    import numpy as np

    devs = []
    rng = np.random.default_rng(0)
    for _ in range(n_devices):
        d = ScriptedDevice(
            server.url,
            str(server.ca),
            server.enroll_secret,
            (rng.normal(0, 1e-3, w0.shape)).astype(np.float32),
            examples=10,
        )
        d.enroll()
        devs.append(d)
    timings: list[float] = []
    spans: list[tuple[float, float]] = []
    sizes: list[int] = []
    import threading

    from edge_client.transport import Transport

    orig = Transport.upload

    def timed(self: Transport, round_id: int, body: bytes, examples: int) -> bool:
        t0 = time.perf_counter()
        ok = orig(self, round_id, body, examples)
        t1 = time.perf_counter()
        timings.append(t1 - t0)
        spans.append((t0, t1))
        sizes.append(len(body))
        return ok

    Transport.upload = timed  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=d.run) for d in devs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        Transport.upload = orig  # type: ignore[method-assign]
    total_mb = sum(sizes) / 1e6
    window = max(b for _, b in spans) - min(a for a, _ in spans)
    return {
        "uploads": len(sizes),
        "mb_per_upload": total_mb / max(len(sizes), 1),
        "mean_upload_ms": 1000 * statistics.fmean(timings),
        "dim": dim,
        "mb_per_s": total_mb / window,  # all uploads, first request sent to last answer
        "window_s": window,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--skip-1m", action="store_true")
    ap.add_argument("--rate", type=float, default=1000.0, help="offered check-ins/s of the paced points")
    ap.add_argument("--load", default=None)
    ap.add_argument("--ca", default=None)
    ap.add_argument("--tokens", default=None)
    args = ap.parse_args()
    if args.load:
        tokens = json.loads(Path(args.tokens).read_text())
        print(json.dumps(asyncio.run(load(args.load, args.ca, tokens, args.seconds, args.concurrency))))
        return
    import tempfile

    rows: list[dict[str, Any]] = []
    tar = tiny_build() / "bundle.tar"
    tmp = Path(tempfile.mkdtemp(prefix="fedkeys-bench-"))
    with fresh_pg_database() as url:
        server = start_server(
            tmp, url, workers=args.workers, extra_env={"FEDKEYS_RATE_LIMIT_PER_MINUTE": "1000000"}
        )
        try:
            # 1. Between rounds (the common case): a round of 100 filled its pool with the first
            #    130 eligible check-ins and then waits for its devices (an hour's deadlines), so
            #    every other check-in is answered by pace steering.
            bench_task(server, tar, "steady", advertise_seconds=3600)
            for n, label in ((1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")):
                if label == "1M" and args.skip_1m:
                    continue
                have = max((r["devices"] for r in rows), default=0)
                tokens = bulk_devices(url, n - have, f"d{label}")
                for conns in (args.concurrency, args.concurrency // 4):
                    res = run_load(server.url, str(server.ca), tokens, args.seconds, conns)
                    res.update(devices=n, connections=conns, scenario="between rounds")
                    rows.append(res)
                    print(label, res, flush=True)
                if shutil.which("wrk"):
                    res = run_paced(server.url, tokens, args.seconds, args.concurrency, args.rate)
                    res.update(devices=n, connections=args.concurrency, scenario="between rounds, paced")
                    rows.append(res)
                    print(label, res, flush=True)
            # 2. Churn, the worst case: rounds open, fill their pool, select and, with nobody
            #    training, fail at a 5 s advertise deadline and reopen, again and again.
            with server.admin() as admin:
                admin.post("/v1/admin/tasks/steady/pause").raise_for_status()
            bench_task(server, tar, "bench", advertise_seconds=5)
            for conns in (args.concurrency, args.concurrency // 4):
                res = run_load(server.url, str(server.ca), tokens, args.seconds, conns)
                res.update(devices=rows[-1]["devices"], connections=conns, scenario="rounds churning")
                rows.append(res)
                print("churn", res, flush=True)
            if shutil.which("wrk"):
                res = run_paced(server.url, tokens, args.seconds, args.concurrency, args.rate)
                res.update(
                    devices=rows[-1]["devices"],
                    connections=args.concurrency,
                    scenario="rounds churning, paced",
                )
                rows.append(res)
                print("churn", res, flush=True)
            with server.admin() as admin:
                admin.post("/v1/admin/tasks/bench/pause").raise_for_status()
            demo = ROOT / "artifacts/demo/bundle.tar"  # realistic upload sizes when it is built
            ing = ingest(server, demo if demo.exists() else tar)
        finally:
            stop_server(server)
    lines = [
        "## Coordinator (issue 4)",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores; PostgreSQL 15 on loopback, TLS, "
        f"{args.workers} uvicorn workers (uvloop, httptools); load from a separate process "
        f"({rows[0]['generator'] if rows else '?'}, keep-alive connections, a different device token per "
        f"request, {args.seconds:.0f} s per point) on the same 2 cores. *Between rounds*: a round of 100 "
        "filled its pool and waits for its devices, every other eligible check-in gets pace steering (the "
        "common case). *Rounds churning*: rounds open, fill their pool from the check-ins, select 130 and, "
        "with nobody training, fail at a 5 s deadline and reopen, over and over (the worst case: every "
        "closing selection and failing round runs inside the measured window).",
        "",
        "| scenario | registered devices | connections | offered/s | check-ins/s | p50 | p99 | errors | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        offered = f"{r['offered']:.0f}" if "offered" in r else "as fast as answered"
        lines.append(
            f"| {r['scenario']} | {r['devices']:,} | {r['connections']} | {offered} "
            f"| {r['rps']:.0f} | {r['p50_ms']:.1f} ms "
            f"| {r['p99_ms']:.1f} ms | {r['errors']} | >= 1,000/s, p99 < 50 ms |"
        )
    if ing:
        lines += [
            "",
            f"Masked-update ingest (one secure round of {ing['uploads']} devices, model of {ing['dim']:,} "
            f"parameters, every coordinate at 8 bits: {ing['mb_per_upload']:.2f} MB masked uploads, each "
            "checked (header, sizes, CRC) and stored in the database; the sum is streamed from them when "
            f"the stage closes): {ing['mb_per_s']:.1f} MB/s over the {ing['window_s']:.1f} s from the first "
            f"upload to the last answer; {ing['mean_upload_ms']:.0f} ms per upload request.",
        ]
    body = "\n".join(lines)
    print(body)
    _record("Coordinator (issue 4)", body)


if __name__ == "__main__":
    main()
