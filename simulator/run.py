"""One simulated federated training run: a coordinator (started here over TLS with SQLite, or an
existing one), a task with the given configuration (``simulator.config``), the fleet
(``simulator.fleet``), and what the run records (``simulator.records``) as rounds finish, with
heldout accuracy of the committed versions (``simulator.evaluation``)."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from coordinator.launch import CoordinatorHandle, LocalCoordinator, start_local, stop_local
from protocol.version import __version__
from protocol.wire import Stage
from simulator.config import SimConfig
from simulator.evaluation import VersionEvaluator, heldout_sample, lower_thread_priority
from simulator.fleet import DeviceSpec, FleetSpec, StopFlag, fleet_specs, run_worker
from simulator.records import SimResult, attach_device_bytes, round_record, write_records

__all__ = ["DEVICES_PER_WORKER", "FLEET_START_RATE", "default_workers", "local_coordinator", "run_simulation"]

log = logging.getLogger(__name__)


@contextmanager
def local_coordinator(
    workdir: Path, *, workers: int = 1, publish: bool = False, db_url: str | None = None
) -> Iterator[LocalCoordinator]:
    """:func:`coordinator.launch.start_local` with the simulator's settings (a 0.25 s tick, no
    rate limit a fleet on loopback would hit), stopped on exit: TLS with a fresh dev CA, SQLite
    in ``workdir`` unless ``db_url`` names another database (PostgreSQL for large fleets)."""
    coord = start_local(
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
        yield coord
    finally:
        stop_local(coord)


DEVICES_PER_WORKER = 128

FLEET_START_RATE = 25.0
"""Devices the fleet starts per second (FleetSpec.start_spread): a population run's 1,065
devices come up over 43 s rather than within a second, when their enrolments and first
check-ins all met the coordinator's single SQLite writer at once (the first rounds of that run
failed for minutes); 100 devices come up in 4 s."""


def default_workers(devices: int) -> int:
    """Worker processes for a fleet: one per core, and more for large fleets. A device's
    protocol work is a few milliseconds of Python, but the devices of one process share its
    interpreter lock: with 500 threads per process (1,000 devices on 2 cores) a selected device
    waited seconds per stage behind the others' check-ins. More processes than cores cost
    memory (about 250 MB each with torch and ExecuTorch loaded), not speed."""
    return max(1, os.cpu_count() or 1, math.ceil(devices / DEVICES_PER_WORKER))


@dataclass(frozen=True)
class _Running:
    """A started fleet: ``stop`` tells its workers the run is over (besides the stop file),
    ``wait`` waits for them and returns the device results."""

    stop: Callable[[], None]
    wait: Callable[[], list[dict[str, Any]]]


def _launch(specs: list[DeviceSpec], fleet: FleetSpec, workers: int, ray_address: str | None) -> _Running:
    """Start the fleet: worker processes here, or Ray tasks spread over a cluster's nodes."""
    chunks = [specs[i::workers] for i in range(workers)]
    if ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(
                # "local" starts a Ray of this run's own: with address=None ray.init joins any
                # cluster this machine last started (tests: a cluster another test had begun
                # and then shut down, whose GCS it then waited for without end)
                address=ray_address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"working_dir": None} if ray_address == "local" else None,
            )
        # the other machines of a cluster see neither the stop file nor this console: a flag
        # actor ends the run, and workers keep their stderr (Ray writes it to its own logs)
        flag = ray.remote(num_cpus=0)(StopFlag).remote()
        fleet = replace(fleet, stop_flag=flag, log_dir="")
        # more workers than CPUs (large fleets) share them: mostly waiting device threads
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        remote = ray.remote(num_cpus=min(1.0, cpus / len(chunks)))(run_worker)
        refs = [remote.options(scheduling_strategy="SPREAD").remote(c, fleet) for c in chunks]

        def stop() -> None:
            ray.get(flag.set.remote(), timeout=60)  # type: ignore[attr-defined]

        return _Running(stop=stop, wait=lambda: [d for part in ray.get(refs) for d in part])
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(run_worker, c, fleet) for c in chunks]

    def wait() -> list[dict[str, Any]]:
        try:
            return [d for f in futures for d in f.result()]
        finally:
            pool.shutdown(wait=True)

    return _Running(stop=lambda: None, wait=wait)


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
    specs = fleet_specs(cfg)
    if cfg.population and cfg.devices != len(specs):  # the task's population (DP delta) is the fleet
        cfg = replace(cfg, devices=len(specs))
    task = f"sim-{cfg.name}-{secrets.token_hex(3)}"
    tar = bundle_dir.with_suffix(".tar")
    with coord.admin() as admin:
        r = admin.post(
            "/v1/admin/tasks", json={"name": task, "config": cfg.task_config().model_dump(mode="json")}
        )
        r.raise_for_status()
        admin.post(f"/v1/admin/tasks/{task}/bundle", content=tar.read_bytes()).raise_for_status()
    evaluator = VersionEvaluator(
        bundle_dir,
        heldout if heldout is not None else heldout_sample(cfg.eval_messages, cfg.seed, cfg.corpus),
    )
    evals: dict[int, dict[str, float]] = {}
    base_weights = evaluator.bundle.initial_weights()

    def weights_of(version: int) -> npt.NDArray[np.float32]:
        return base_weights if version == 0 else observer.weights(version)

    stop_file = out_dir / f".stop-{task}"
    stop_file.unlink(missing_ok=True)
    d = cfg.deadlines
    fleet = FleetSpec(
        coordinator=coord.url,
        ca=str(coord.ca),
        enroll_secret=coord.enroll_secret,
        seed=cfg.seed,
        day_seconds=cfg.day_seconds,
        start_hour=cfg.start_hour,
        t0=time.time(),
        dropout=cfg.dropout,
        round_seconds=(d.selection + d.advertise + d.share + d.upload + d.unmask) / 3,
        stop_after=cfg.max_minutes * 60,
        state_root=str(out_dir / "devices" / task),
        noop_training=cfg.noop_training,
        min_examples=cfg.min_examples,
        stop_file=str(stop_file),
        log_dir=str(out_dir / "logs"),
        start_spread=len(specs) / FLEET_START_RATE,
    )
    workers = cfg.workers or default_workers(len(specs))
    running = _launch(specs, fleet, workers, cfg.ray_address)
    try:  # whatever ends the run (an error, Ctrl-C, SIGTERM), the fleet's workers stop
        with coord.admin() as admin:
            admin.post(f"/v1/admin/tasks/{task}/start").raise_for_status()
        observer = _Observer(coord, task)
        rounds: list[dict[str, Any]] = []
        eval_thread: threading.Thread | None = None
        pending: list[int] = [0]  # the pretrained student too is scored beside the rounds
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
                if r["stage"] == Stage.DONE and r["number"] not in seen:
                    seen.add(r["number"])
                    rec = round_record(r, fleet.t0, cfg.day_seconds, cfg.start_hour)
                    rounds.append(rec)
                    if progress:
                        progress({"event": "round", **rec})
                    v = r.get("new_version")
                    if v and (v % cfg.eval_every == 0 or v == cfg.rounds):
                        pending.append(v)
            if pending and (eval_thread is None or not eval_thread.is_alive()):
                v = pending.pop(0)

                def work(v: int = v) -> None:
                    lower_thread_priority()  # the devices' rounds come first
                    evals[v] = evaluator.eager(weights_of(v))
                    if progress:
                        progress({"event": "eval", "version": v, **evals[v]})

                eval_thread = threading.Thread(target=work, daemon=True)
                eval_thread.start()
            if status == "paused" and not any(x["stage"] != Stage.DONE for x in rs):
                break
    finally:
        stop_file.write_text("stop")
        running.stop()
    devices = running.wait()
    if eval_thread is not None:
        eval_thread.join()
    versions = [r["new_version"] for r in rounds if r.get("new_version")]
    last = max(versions) if versions else 0
    for v in pending + ([last] if last and last not in evals else []):
        evals[v] = evaluator.eager(weights_of(v))
    final_weights = observer.weights(last) if last else base_weights
    observer.close()
    final = evaluator.program(final_weights, out_dir)
    attach_device_bytes(rounds, devices)
    result = SimResult(
        cfg,
        rounds,
        dict(sorted(evals.items())),
        final,
        devices,
        time.time() - t_start,
        out_dir,
        privacy,
        final_weights=final_weights,
    )
    write_records(result)
    return result


class _Observer:
    """An enrolled observer device: downloads committed versions' weights like any device."""

    def __init__(self, coord: CoordinatorHandle, task: str) -> None:
        from edge_client.transport import Transport
        from protocol.wire import EnrollRequest

        self.task = task
        self.t = Transport(coord.url, ca=coord.ca)
        r = self.t.enroll(
            EnrollRequest(
                enrollment_secret=coord.enroll_secret, platform="observer", client_version=__version__
            )
        )
        self.t.token = r.token

    def close(self) -> None:
        self.t.close()

    def weights(self, version: int) -> npt.NDArray[np.float32]:
        data = self.t.download(f"/v1/tasks/{self.task}/versions/{version}/weights")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
