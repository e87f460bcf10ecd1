"""One simulated federated training run: a coordinator (started here over TLS with SQLite, or an
existing one), a task with the given configuration, the fleet, and per-round records:
participation and drop-outs by stage, bytes per device, stage durations, round wall time and
heldout accuracy of the committed versions."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import math
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from simulator.fleet import DeviceSpec, FleetSpec, make_specs, run_worker

__all__ = [
    "CoordinatorHandle",
    "SimConfig",
    "SimResult",
    "VersionEvaluator",
    "local_coordinator",
    "run_simulation",
]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SimConfig:
    """One configuration of a simulated run (one row of a comparison)."""

    name: str = "secure"
    devices: int = 100
    per_round: int = 10
    rounds: int = 30
    secagg: bool = True
    compress: bool = True
    # 1/16 of the (block-rotated) coordinates at 5 bits: 9-bit ring elements for 13 inputs, about
    # 55x fewer bytes than a dense float32 update; FedAdam absorbs the subsampling noise (in the
    # emulation of bench/fl_tuning.py it ended level with float32 FedAdam, FedAvgM 1.9% below)
    keep_fraction: float = 1 / 16
    bits: int = 5
    clip_norm: float = 2.0
    range_factor: float = 4.0
    weight_cap: int = 16
    optimizer: str = "sgd"  # device optimizer
    client_lr: float = 0.1
    local_steps: int = 10
    max_examples: int = 400
    server_optimizer: str = "fedadam"
    server_lr: float = 1e-3
    server_momentum: float = 0.9  # FedAvgM only
    over_selection: float = 1.3
    min_reports: int = 5
    dropout: float = 0.08
    # 40 real minutes per simulated day, from 23:00: the demo's 30 rounds (~12 minutes) run
    # through one simulated night, when 40-65% of the devices charge; --day-seconds 600 shows a
    # whole day (and its 4x swing) in 10 minutes, but rounds then find few devices by day
    day_seconds: float = 2400.0
    start_hour: float = 23.0
    deadlines: dict[str, float] = field(
        default_factory=lambda: {
            # a selection closes once its pool is full; the deadline only matters when few
            # devices are eligible (6 s failed rounds in a row before the pool could fill)
            "selection": 20.0,
            "advertise": 6.0,
            "share": 6.0,
            "upload": 30.0,
            "unmask": 8.0,
        }
    )
    seed: int = 0
    eval_every: int = 10  # heldout evaluation of every 10th version (and the last)
    eval_messages: int = 300
    noop_training: bool = False
    workers: int = 0  # 0 = one per core, and one per DEVICES_PER_WORKER devices beyond that
    ray_address: str | None = None  # "local" or ray://host:port
    max_minutes: float = 60.0
    # differential privacy (coordinator PrivacySettings): "off", "central" or "distributed";
    # the fleet is the population the accountant samples from, delta = 1/devices**1.1
    privacy: str = "off"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    adaptive_clip: bool = False
    selection: str = "least-recent"  # coordinator SelectionSettings.strategy
    speed_sigma: float = 0.5  # spread of device speeds (simulator.fleet.make_specs)

    def privacy_config(self) -> dict[str, Any]:
        if self.privacy == "off":
            return {"mode": "off"}
        return {
            "mode": self.privacy,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "population": self.devices,
            "adaptive_clip": self.adaptive_clip,
        }

    def task_config(self) -> dict[str, Any]:
        return {
            "clients_per_round": self.per_round,
            "over_selection": self.over_selection,
            "min_reports": min(self.min_reports, self.per_round),
            "cooldown_rounds": 1,
            "selection_pool": 1.0,
            "eligibility": {"min_examples": 20, "min_battery_pct": 20},
            "training": {
                "optimizer": self.optimizer,
                "lr": self.client_lr,
                "local_steps": self.local_steps,
                "max_seconds": 60.0,
                "max_examples": self.max_examples,
            },
            "codec": {
                "compress": self.compress,
                "keep_fraction": self.keep_fraction,
                "bits": self.bits,
                "clip_norm": self.clip_norm,
                "range_factor": self.range_factor,
                "weight_cap": self.weight_cap,
            },
            "secagg": {"enabled": self.secagg},
            "server_optimizer": {
                "name": self.server_optimizer,
                "lr": self.server_lr,
                "momentum": self.server_momentum,
            },
            "deadlines": self.deadlines,
            "privacy": self.privacy_config(),
            "selection": {"strategy": self.selection},
            "max_rounds": self.rounds,
        }


@dataclass
class CoordinatorHandle:
    url: str
    ca: Path
    admin_token: str
    enroll_secret: str
    data_dir: Path | None = None

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=str(self.ca),
            timeout=300,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )


@contextmanager
def local_coordinator(
    workdir: Path, *, workers: int = 1, publish: bool = False, db_url: str | None = None
) -> Iterator[CoordinatorHandle]:
    """A coordinator process on loopback: TLS with a fresh dev CA, SQLite in ``workdir``
    unless ``db_url`` names another database (PostgreSQL for large fleets)."""
    from coordinator.launch import start_local, stop_local

    proc = start_local(
        workdir,
        db_url,
        workers=workers,
        extra_env={
            "FEDKEYS_TICK_SECONDS": "0.25",
            "FEDKEYS_PUBLISH_PREDICT": "true" if publish else "false",
            "FEDKEYS_RATE_LIMIT_PER_MINUTE": "100000",
        },
    )
    try:
        yield CoordinatorHandle(proc.url, proc.ca, proc.admin_token, proc.enroll_secret, proc.data_dir)
    finally:
        stop_local(proc)


class VersionEvaluator:
    """Heldout accuracy of a model version: the bundle's architecture with the version's
    weights, the same beam search devices run (eager fp32 per round; the final version is also
    measured through its int8 ``predict.pte``)."""

    def __init__(self, bundle_dir: Path, texts: list[str]) -> None:
        from edge_client.bundle import load_bundle
        from edge_client.tokenizer import Tokenizer

        self.bundle = load_bundle(bundle_dir)
        self.tok = Tokenizer(self.bundle.path(self.bundle.manifest.tokenizer))
        self.texts = texts

    def eager(self, weights: npt.NDArray[np.float32]) -> dict[str, float]:
        import torch

        from edge_client.predictor import BeamSearch
        from model_export.eager import EagerStepModel
        from model_export.evaluate import EvalResult, count_nll, count_suggestions, fitting
        from model_export.export import model_from_bundle

        torch.set_num_threads(1)
        lm = model_from_bundle(self.bundle.root, self.bundle.manifest, weights)
        m = EagerStepModel(lm, self.bundle.manifest.predict.beam_batch)
        search = BeamSearch(m, self.tok)
        counts = count_suggestions(lambda t, k: [s.word for s in search.suggest(t, k)], self.texts, [])
        counts = counts + count_nll(m.score, self.tok, fitting(self.tok, self.texts, m.max_seq_len))
        r = EvalResult.from_counts("eager", counts)
        return {"top1": r.top1, "top3": r.top3, "ppl_piece": r.ppl_token, "words": r.words}

    def program(self, weights: npt.NDArray[np.float32], workdir: Path) -> dict[str, float]:
        from model_export.export import export_predict_program, model_from_bundle
        from model_export.pipeline import ProgramSpec, evaluate_program

        m = self.bundle.manifest
        lm = model_from_bundle(self.bundle.root, m, weights)
        path = workdir / "final-predict.pte"
        path.write_bytes(export_predict_program(lm, m.predict.quantization, m.predict.beam_batch))
        spec = ProgramSpec(path, self.bundle.path(m.tokenizer), m.predict.max_seq_len, m.predict.beam_batch)
        r = evaluate_program("final", spec, self.texts, [], workers=1)
        return {
            "top1": r.top1,
            "top3": r.top3,
            "ppl_piece": r.ppl_token,
            "ms_per_suggestion": r.ms_per_suggestion,
        }


@dataclass
class SimResult:
    config: SimConfig
    rounds: list[dict[str, Any]]
    evals: dict[int, dict[str, float]]  # version -> eager heldout metrics
    final: dict[str, float]  # final version through int8 predict.pte
    devices: list[dict[str, Any]]
    seconds: float
    out_dir: Path
    privacy: dict[str, Any] | None = None  # the task's privacy status at the end (admin API)

    def summary(self) -> dict[str, Any]:
        committed = [r for r in self.rounds if r["outcome"] == "committed" and r["kind"] == "train"]
        ups = [d["bytes_up"] for r in committed for d in r.get("device_bytes", [])]
        downs = [d["bytes_down"] for r in committed for d in r.get("device_bytes", [])]
        last_v = max(self.evals) if self.evals else 0
        walls = [r["wall_seconds"] for r in committed if r.get("wall_seconds")]
        return {
            "name": self.config.name,
            "rounds_committed": len(committed),
            "rounds_failed": sum(r["outcome"] == "failed" for r in self.rounds),
            "top1_start": self.evals.get(0, {}).get("top1"),
            "top1_final": self.evals.get(last_v, {}).get("top1"),
            "top3_final": self.evals.get(last_v, {}).get("top3"),
            "final_int8_top1": self.final.get("top1"),
            "upload_bytes_per_device": float(np.median(ups)) if ups else None,
            "download_bytes_per_device": float(np.median(downs)) if downs else None,
            "round_seconds_median": float(np.median(walls)) if walls else None,
            "participants_mean": float(np.mean([r["reported"] for r in committed])) if committed else 0.0,
            "seconds": self.seconds,
            "epsilon": self.privacy["epsilon_spent"] if self.privacy else None,
            "delta": self.privacy["delta"] if self.privacy else None,
            "noise_multiplier": self.privacy["noise_multiplier"] if self.privacy else None,
        }


def heldout_sample(n: int, seed: int) -> list[str]:
    from model_export.data import load_chitchat, split_corpus
    from model_export.evaluate import eval_messages

    return eval_messages(split_corpus(load_chitchat())["heldout"], n, seed=seed)


def _fleet_users() -> dict[str, list[str]]:
    from model_export.data import load_chitchat, split_corpus

    fed = split_corpus(load_chitchat())["federated"]
    return {u: [m.text for m in msgs] for u, msgs in fed.items()}


DEVICES_PER_WORKER = 128


def default_workers(devices: int) -> int:
    """Worker processes for a fleet: one per core, and more for large fleets. A device's
    protocol work is a few milliseconds of Python, but the devices of one process share its
    interpreter lock: with 500 threads per process (1,000 devices on 2 cores) a selected device
    waited seconds per stage behind the others' check-ins. More processes than cores cost
    memory (about 250 MB each with torch and ExecuTorch loaded), not speed."""
    return max(1, os.cpu_count() or 1, math.ceil(devices / DEVICES_PER_WORKER))


def _launch(
    specs: list[DeviceSpec], fleet: FleetSpec, workers: int, ray_address: str | None
) -> Callable[[], list[dict[str, Any]]]:
    """Start the fleet; returns a function that waits for it and returns the device results."""
    chunks = [specs[i::workers] for i in range(workers)]
    if ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=None if ray_address == "local" else ray_address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"working_dir": None} if ray_address == "local" else None,
            )
        # more workers than CPUs (large fleets) share them: mostly waiting device threads
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        remote = ray.remote(num_cpus=min(1.0, cpus / len(chunks)))(run_worker)
        refs = [remote.remote(c, fleet) for c in chunks]
        return lambda: [d for part in ray.get(refs) for d in part]
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(run_worker, c, fleet) for c in chunks]

    def wait() -> list[dict[str, Any]]:
        try:
            return [d for f in futures for d in f.result()]
        finally:
            pool.shutdown(wait=True)

    return wait


def run_simulation(
    cfg: SimConfig,
    bundle_dir: Path,
    out_dir: Path,
    coord: CoordinatorHandle,
    *,
    heldout: list[str] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> SimResult:
    """Run ``cfg`` against ``coord`` until its rounds are done (or ``max_minutes``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    task = f"sim-{cfg.name}-{secrets.token_hex(3)}"
    tar = bundle_dir.with_suffix(".tar")
    with coord.admin() as admin:
        r = admin.post("/v1/admin/tasks", json={"name": task, "config": cfg.task_config()})
        r.raise_for_status()
        admin.post(f"/v1/admin/tasks/{task}/bundle", content=tar.read_bytes()).raise_for_status()
    specs = make_specs(_fleet_users(), cfg.devices, cfg.seed, cfg.speed_sigma)
    evaluator = VersionEvaluator(
        bundle_dir, heldout if heldout is not None else heldout_sample(cfg.eval_messages, cfg.seed)
    )
    evals: dict[int, dict[str, float]] = {}
    base_weights = evaluator.bundle.initial_weights()
    evals[0] = evaluator.eager(base_weights)
    if progress:
        progress({"event": "eval", "version": 0, **evals[0]})
    stop_file = out_dir / f".stop-{task}"
    stop_file.unlink(missing_ok=True)
    fleet = FleetSpec(
        coordinator=coord.url,
        ca=str(coord.ca),
        enroll_secret=coord.enroll_secret,
        seed=cfg.seed,
        day_seconds=cfg.day_seconds,
        start_hour=cfg.start_hour,
        t0=time.time(),
        dropout=cfg.dropout,
        round_seconds=sum(cfg.deadlines.values()) / 3,
        stop_after=cfg.max_minutes * 60,
        state_root=str(out_dir / "devices" / task),
        noop_training=cfg.noop_training,
        stop_file=str(stop_file),
    )
    workers = cfg.workers or default_workers(len(specs))
    wait_fleet = _launch(specs, fleet, workers, cfg.ray_address)
    try:  # whatever ends the run (an error, Ctrl-C, SIGTERM), the fleet's workers stop
        with coord.admin() as admin:
            admin.post(f"/v1/admin/tasks/{task}/start").raise_for_status()
        observer = _Observer(coord, task)
        rounds: list[dict[str, Any]] = []
        eval_thread: threading.Thread | None = None
        pending: list[int] = []
        seen: set[int] = set()
        deadline = t_start + cfg.max_minutes * 60
        privacy: dict[str, Any] | None = None
        while time.time() < deadline:
            time.sleep(1.0)
            try:
                with coord.admin() as admin:
                    got = admin.get(f"/v1/admin/tasks/{task}/rounds")
                    got.raise_for_status()
                    rs = got.json()
                    task_info = admin.get(f"/v1/admin/tasks/{task}")
                    task_info.raise_for_status()
                    status = task_info.json()["status"]
                    privacy = task_info.json().get("privacy")
            except httpx.HTTPStatusError as e:
                if e.response.status_code < 500:
                    raise
                log.warning("coordinator busy (%s); polling again", e.response.status_code)
                continue
            except httpx.TransportError as e:
                log.warning("coordinator unreachable (%s); polling again", e)
                continue
            for r in sorted(rs, key=lambda x: x["number"]):
                if r["stage"] == "done" and r["number"] not in seen:
                    seen.add(r["number"])
                    rec = _round_record(r, fleet.t0, cfg.day_seconds, cfg.start_hour)
                    rounds.append(rec)
                    if progress:
                        progress({"event": "round", **rec})
                    v = r.get("new_version")
                    if v and (v % cfg.eval_every == 0 or v == cfg.rounds):
                        pending.append(v)
            if pending and (eval_thread is None or not eval_thread.is_alive()):
                v = pending.pop(0)

                def work(v: int = v) -> None:
                    evals[v] = evaluator.eager(observer.weights(v))
                    if progress:
                        progress({"event": "eval", "version": v, **evals[v]})

                eval_thread = threading.Thread(target=work, daemon=True)
                eval_thread.start()
            if status == "paused" and not any(x["stage"] != "done" for x in rs):
                break
    finally:
        stop_file.write_text("stop")
    devices = wait_fleet()
    if eval_thread is not None:
        eval_thread.join()
    versions = [r["new_version"] for r in rounds if r.get("new_version")]
    last = max(versions) if versions else 0
    for v in pending + ([last] if last and last not in evals else []):
        evals[v] = evaluator.eager(observer.weights(v))
    final = evaluator.program(observer.weights(last) if last else base_weights, out_dir)
    _attach_device_bytes(rounds, devices)
    result = SimResult(
        cfg, rounds, dict(sorted(evals.items())), final, devices, time.time() - t_start, out_dir, privacy
    )
    _write_records(result)
    return result


class _Observer:
    """An enrolled observer device: downloads committed versions' weights like any device."""

    def __init__(self, coord: CoordinatorHandle, task: str) -> None:
        from edge_client.transport import Transport
        from protocol.wire import EnrollRequest

        self.task = task
        self.t = Transport(coord.url, ca=coord.ca)
        r = self.t.enroll(
            EnrollRequest(enrollment_secret=coord.enroll_secret, platform="observer", client_version="0.1.0")
        )
        self.t.token = r.token

    def weights(self, version: int) -> npt.NDArray[np.float32]:
        data = self.t.download(f"/v1/tasks/{self.task}/versions/{version}/weights")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _round_record(r: dict[str, Any], t0: float, day_seconds: float, start_hour: float) -> dict[str, Any]:
    from datetime import datetime

    created = datetime.fromisoformat(r["created_at"]).timestamp()
    finished = datetime.fromisoformat(r["finished_at"]).timestamp() if r.get("finished_at") else created
    sim_hour = (start_hour + (created - t0) * 24 / day_seconds) % 24
    m = r.get("metrics", {}) or {}
    return {
        "round": r["number"],
        "round_id": r["id"],
        "kind": r["kind"],
        "outcome": r["outcome"],
        "failure": r.get("failure_reason"),
        "base_version": r["base_version"],
        "new_version": r.get("new_version"),
        "selected": r["selected"],
        "reported": r["reported"],
        "candidates": m.get("candidates"),
        "pool_arrivals": m.get("pool_arrivals"),
        "dropped": m.get("dropped", {}),
        "stage_seconds": m.get("stage_seconds", {}),
        "bytes_in": r["bytes_in"],
        "wall_seconds": round(finished - created, 3),
        "sim_hour": round(sim_hour, 2),
        "t": round(created - t0, 2),
        "created_ts": created,
        "mean_loss_before": m.get("mean_loss_before"),
        "mean_loss_after": m.get("mean_loss_after"),
        "dp": m.get("dp"),
    }


def _attach_device_bytes(rounds: list[dict[str, Any]], devices: list[dict[str, Any]]) -> None:
    by_round: dict[int, list[dict[str, int]]] = {}
    for d in devices:
        for r in d.get("rounds", []):
            if r.get("kind") == "train" and r.get("completed"):
                by_round.setdefault(r["round"], []).append(
                    {"bytes_up": r.get("bytes_up", 0), "bytes_down": r.get("bytes_down", 0)}
                )
    for rec in rounds:
        got = by_round.get(rec["round_id"], [])
        rec["device_bytes"] = got
        ups = [b["bytes_up"] for b in got]
        downs = [b["bytes_down"] for b in got]
        rec["bytes_up_per_device"] = float(np.median(ups)) if ups else 0.0
        rec["bytes_down_per_device"] = float(np.median(downs)) if downs else 0.0


def _write_records(res: SimResult) -> None:
    out = res.out_dir / res.config.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps(res.rounds, indent=2, default=str))
    (out / "evals.json").write_text(json.dumps(res.evals, indent=2))
    (out / "summary.json").write_text(
        json.dumps(
            {"config": asdict(res.config), "summary": res.summary(), "final_int8": res.final},
            indent=2,
            default=str,
        )
    )
    cols = [
        "round",
        "kind",
        "outcome",
        "selected",
        "reported",
        "candidates",
        "wall_seconds",
        "sim_hour",
        "bytes_up_per_device",
        "bytes_down_per_device",
        "new_version",
        "top1",
        "top3",
    ]
    with (out / "rounds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*cols, "dropped", "stage_seconds"])
        for r in res.rounds:
            ev = res.evals.get(r.get("new_version") or -1, {})
            w.writerow(
                [
                    *(r.get(c, ev.get(c, "")) for c in cols),
                    json.dumps(r["dropped"]),
                    json.dumps(r["stage_seconds"]),
                ]
            )
