"""What a simulated run records: a row per finished round (participation and drop-outs by
stage, bytes per device, stage durations, wall time, simulated time of day), the heldout
metrics of its versions, and the files they are written to; :class:`SimResult` holds them."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.records import RoundRecord
from protocol.wire import Outcome, RoundKind
from simulator.config import SimConfig

__all__ = ["SimResult", "attach_device_bytes", "round_record", "write_records"]


@dataclass
class SimResult:
    """A finished run: a row per round (:func:`round_record`, with :func:`attach_device_bytes`),
    heldout metrics by version, and each device's result (``simulator.fleet.DeviceResult`` as a
    dict: its :class:`~edge_client.records.RoundRecord` list and byte counts)."""

    config: SimConfig
    rounds: list[dict[str, Any]]
    evals: dict[int, dict[str, float]]  # version -> eager heldout metrics
    final: dict[str, float]  # final version through int8 predict.pte
    devices: list[dict[str, Any]]
    seconds: float
    out_dir: Path
    privacy: dict[str, Any] | None = None  # the task's privacy status at the end (admin API)

    def summary(self) -> dict[str, Any]:
        committed = [
            r for r in self.rounds if r["outcome"] == Outcome.COMMITTED and r["kind"] == RoundKind.TRAIN
        ]
        ups = [d["bytes_up"] for r in committed for d in r.get("device_bytes", [])]
        downs = [d["bytes_down"] for r in committed for d in r.get("device_bytes", [])]
        last_v = max(self.evals) if self.evals else 0
        walls = [r["wall_seconds"] for r in committed if r.get("wall_seconds")]
        return {
            "name": self.config.name,
            "rounds_committed": len(committed),
            "rounds_failed": sum(r["outcome"] == Outcome.FAILED for r in self.rounds),
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


def round_record(r: dict[str, Any], t0: float, day_seconds: float, start_hour: float) -> dict[str, Any]:
    """A finished round as the run records it, from the admin API's round ``r`` (``t0``: the
    fleet's start, which the simulated time of day counts from)."""
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


def attach_device_bytes(rounds: list[dict[str, Any]], devices: list[dict[str, Any]]) -> None:
    """Add to each round record the bytes its devices sent and received (each device that saw
    the round through, and their medians), from the devices' own round records."""
    by_round: dict[int, list[dict[str, int]]] = {}
    for d in devices:
        r: RoundRecord
        for r in d.get("rounds", []):
            if r.kind == RoundKind.TRAIN and r.completed:
                by_round.setdefault(r.round, []).append(
                    {"bytes_up": r.bytes_up or 0, "bytes_down": r.bytes_down or 0}
                )
    for rec in rounds:
        got = by_round.get(rec["round_id"], [])
        rec["device_bytes"] = got
        ups = [b["bytes_up"] for b in got]
        downs = [b["bytes_down"] for b in got]
        rec["bytes_up_per_device"] = float(np.median(ups)) if ups else 0.0
        rec["bytes_down_per_device"] = float(np.median(downs)) if downs else 0.0


def write_records(res: SimResult) -> None:
    """The run's files in ``out_dir/<name>``: rounds.json, rounds.csv, evals.json, summary.json."""
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
