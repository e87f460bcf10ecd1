"""One federated round of the demo student through real device agents (issue 5).

    .venv/bin/python bench/client_bench.py [--bundle artifacts/demo/bundle] [--devices 3]

A coordinator is started on loopback (TLS, SQLite) with a task of the demo bundle and the
simulator's default training and codec settings (secure aggregation and compression on). Each
device is a separate ``fedkeys client`` process (import its participant's messages, enroll,
``run --rounds 1 --provider static``), exactly what a Raspberry Pi runs; ``os.wait4`` gives each
process's CPU seconds and peak RSS. The devices' ``history.jsonl`` gives bytes up and down and
the local training's steps and seconds. Suggestion latency is then measured through the client
API (``edge_client.runtime.Predictor`` on the bundle and program the device downloaded).
Results are printed as a table and recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import _record  # noqa: E402

FEDKEYS = [sys.executable, "-m", "fedkeys.cli"]  # --client-python replaces the interpreter


def _device_texts(n: int) -> list[list[str]]:
    """``n`` participants of the federated split with at least 400 messages (their newest 400)."""
    from model_export.data import load_chitchat, split_corpus

    fed = split_corpus(load_chitchat())["federated"]
    users = sorted((u for u, m in fed.items() if len(m) >= 400), key=lambda u: -len(fed[u]))
    if len(users) < n:
        raise SystemExit(f"only {len(users)} participants have >= 400 messages")
    return [[m.text for m in fed[u]][-400:] for u in users[:n]]


def _run(args: list[str], **kw: Any) -> str:
    out = subprocess.run([*FEDKEYS, *args], capture_output=True, text=True, check=False, **kw)
    if out.returncode != 0:
        raise SystemExit(f"fedkeys {' '.join(args[:2])} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def one_round(bundle: Path, devices: int, work: Path) -> list[dict[str, Any]]:
    from coordinator.launch import start_local, stop_local
    from simulator.run import SimConfig

    coord = start_local(work / "coordinator", extra_env={"FEDKEYS_PUBLISH_PREDICT": "true"})
    try:
        cfg = SimConfig(per_round=devices, min_reports=devices, over_selection=1.0, rounds=1).task_config()
        cfg["deadlines"] = {"selection": 60, "advertise": 60, "share": 60, "upload": 600, "unmask": 60}
        with coord.admin() as admin:
            admin.post("/v1/admin/tasks", json={"name": "bench", "config": cfg}).raise_for_status()
            tar = bundle.with_suffix(".tar")
            admin.post("/v1/admin/tasks/bench/bundle", content=tar.read_bytes()).raise_for_status()
        states = []
        for i, texts in enumerate(_device_texts(devices)):
            state = work / f"device-{i}"
            state.mkdir(parents=True)
            msgs = state / "messages.jsonl"
            now = time.time()
            msgs.write_text(
                "".join(
                    json.dumps({"text": t, "timestamp": now - 600 * (len(texts) - j)}) + "\n"
                    for j, t in enumerate(texts)
                )
            )
            common = ["client", "--state-dir", str(state)]
            _run([*common, "import", str(msgs)])
            msgs.unlink()
            _run(
                [*common, "enroll", "--coordinator", coord.url, "--ca", str(coord.ca)],
                env={**os.environ, "FEDKEYS_ENROLLMENT_SECRET": coord.enroll_secret},
            )
            states.append(state)
        with coord.admin() as admin:
            admin.post("/v1/admin/tasks/bench/start").raise_for_status()
        procs = {}
        t0 = time.time()
        for state in states:
            argv = [
                *FEDKEYS,
                "client",
                "--state-dir",
                str(state),
                "run",
                "--provider",
                "static",
                "--rounds",
                "1",
            ]
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(state / "run.log").open("wb"))
            procs[p.pid] = (state, time.time())
        results = []
        while procs:
            pid, status, ru = os.wait4(-1, 0)
            if pid not in procs:
                continue
            state, started = procs.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"device {state.name} failed: {(state / 'run.log').read_text()[-2000:]}")
            history = [json.loads(x) for x in (state / "history.jsonl").read_text().splitlines() if x.strip()]
            train = [h for h in history if h.get("kind") == "train"][-1]
            results.append(
                {
                    "device": state.name,
                    "state": state,
                    "wall_s": time.time() - started,
                    "cpu_s": ru.ru_utime + ru.ru_stime,
                    "peak_rss_mb": ru.ru_maxrss / 1024,
                    "completed": train.get("completed"),
                    "outcome": train.get("outcome"),
                    "bytes_up": train.get("bytes_up", 0),
                    "bytes_down": train.get("bytes_down", 0),
                    "training": train.get("training") or {},
                    "stages": train.get("seconds") or {},
                }
            )
        with coord.admin() as admin:
            rounds = admin.get("/v1/admin/tasks/bench/rounds").json()
        for r in results:
            r["round_outcome"] = rounds[-1]["outcome"] if rounds else None
            r["round_wall_s"] = time.time() - t0
        return results
    finally:
        stop_local(coord)


def suggestion_latency(state: Path, prefixes: list[str]) -> dict[str, float]:
    from edge_client.bundle import load_bundle
    from edge_client.runtime import Predictor, set_threads

    set_threads(1)
    bundle = load_bundle(sorted((state / "bundles").glob("*/manifest.json"))[-1].parent)
    programs = sorted((state / "programs").glob("*.pte"), key=lambda p: p.stat().st_mtime)
    predictor = Predictor.from_bundle(bundle, programs[-1] if programs else None)
    for p in prefixes[:10]:
        predictor.suggest(p, 3)
    lat = []
    for p in prefixes:
        t0 = time.perf_counter()
        predictor.suggest(p, 3)
        lat.append(1000 * (time.perf_counter() - t0))
    lat.sort()
    return {"p50_ms": statistics.median(lat), "p95_ms": lat[int(0.95 * len(lat)) - 1], "n": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "artifacts/demo/bundle")
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--suggestions", type=int, default=300)
    ap.add_argument(
        "--client-python",
        default=sys.executable,
        help="interpreter of the devices, e.g. a fresh venv with only `pip install '.[client]'`",
    )
    args = ap.parse_args()
    FEDKEYS[0] = args.client_python
    if not (args.bundle / "manifest.json").exists() or not args.bundle.with_suffix(".tar").exists():
        print(f"no bundle at {args.bundle}: run `make demo` or `fedkeys export build` first", file=sys.stderr)
        raise SystemExit(2)
    from edge_client.bundle import load_bundle
    from model_export.data import load_chitchat, split_corpus
    from model_export.evaluate import eval_messages
    from simulator.run import SimConfig

    sim = SimConfig()
    load = os.getloadavg()[0]
    load_note = f" (load average {load:.1f} before the run: other work was running)" if load > 0.5 else ""
    manifest = load_bundle(args.bundle).manifest
    dense = 4 * manifest.train.layout.size
    with tempfile.TemporaryDirectory(prefix="fedkeys-client-bench-") as tmp:
        res = one_round(args.bundle, args.devices, Path(tmp))
        heldout = eval_messages(split_corpus(load_chitchat())["heldout"], 200, seed=1)
        prefixes = [" ".join(m.split()[: max(1, len(m.split()) // 2)]) + " " for m in heldout][
            : args.suggestions
        ]
        lat = suggestion_latency(res[0]["state"], prefixes)
    lines = [
        "## Device client: one round (issue 5)",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores. `bench/client_bench.py`: "
        f"{args.devices} `fedkeys client run --rounds 1` processes (one real participant's newest 400 "
        f"messages each; client interpreter `{args.client_python}`"
        + (
            " = the project venv"
            if args.client_python == sys.executable
            else ", a venv with only `.[client]`"
        )
        + ") "
        f"against a local coordinator (TLS, SQLite); demo bundle "
        f"({manifest.train.layout.size:,} trainable parameters), the simulator's default round "
        f"({sim.local_steps} local SGD steps of 4 rows, secure aggregation, rotation + "
        f"{sim.keep_fraction:.4g} of the coordinates at {sim.bits} bits; with {args.devices} inputs the "
        "ring needs fewer bits than in a 13-device round). The devices share the 2 cores"
        f"{load_note}; per-process figures from `wait4`.",
        "",
        "| device | outcome | process wall s | process CPU s | peak RSS | local steps | train s | "
        "steps/s | bytes up | up vs dense fp32 | bytes down |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        t = r["training"]
        sps = t.get("steps", 0) / t["seconds"] if t.get("seconds") else float("nan")
        lines.append(
            f"| {r['device']} | {r['outcome']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} MB | {t.get('steps', 0)} | {t.get('seconds', 0):.2f} | {sps:.1f} | "
            f"{r['bytes_up'] / 1e3:.0f} kB | {dense / max(r['bytes_up'], 1):.1f}x | "
            f"{r['bytes_down'] / 1e6:.1f} MB |"
        )
    lines += [
        "",
        f"Bytes down include the bundle on first contact ({args.bundle.with_suffix('.tar').stat().st_size / 1e6:.1f} MB "
        f"tarball) and the round's weights ({dense / 1e6:.1f} MB); later rounds download only weights. "
        f"Dense float32 update: {dense / 1e3:.0f} kB. Goal for peak RSS: <= 300 MB.",
        "",
        f"Suggestion latency through the client (`Predictor` on the device's downloaded bundle and "
        f"predict.pte, top-3 words, 1 thread, {lat['n']} heldout prefixes): p50 {lat['p50_ms']:.2f} ms, "
        f"p95 {lat['p95_ms']:.2f} ms.",
    ]
    body = "\n".join(lines)
    print(body)
    _record("Device client: one round (issue 5)", body)


if __name__ == "__main__":
    main()
