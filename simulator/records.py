"""What a simulated run records: a row per finished round (participation and drop-outs by
stage, bytes and training tokens per device, stage durations, wall time, simulated time of
day), the heldout metrics of its versions (with per-message counts for confidence intervals),
and the files they are written to; :class:`SimResult` holds them, :func:`readable_round` is a
round as people read it (named columns with units, durations and clock times)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_client.records import RoundRecord
from model_export.evaluate import MessageHits
from protocol.wire import Outcome, RoundKind
from simulator.config import SimConfig

__all__ = [
    "SimResult",
    "attach_device_bytes",
    "clock",
    "duration",
    "progress",
    "readable_round",
    "readable_rounds",
    "round_record",
    "scalar_evals",
    "union_seconds",
    "version_progress",
    "write_records",
]


@dataclass
class SimResult:
    """A finished run: a row per round (:func:`round_record`, with :func:`attach_device_bytes`),
    heldout metrics by version, and each device's result (``simulator.fleet.DeviceResult`` as a
    dict: its :class:`~edge_client.records.RoundRecord` list and byte counts)."""

    config: SimConfig
    rounds: list[dict[str, Any]]
    # version -> eager heldout metrics (simulator.evaluation.scores: scalars and per_message)
    evals: dict[int, dict[str, Any]]
    final: dict[str, float]  # final version through int8 predict.pte
    devices: list[dict[str, Any]]
    seconds: float
    out_dir: Path
    privacy: dict[str, Any] | None = None  # the task's privacy status at the end (admin API)
    final_weights: npt.NDArray[np.float32] | None = None  # of the last version (for baselines)

    def committed(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r["outcome"] == Outcome.COMMITTED and r["kind"] == RoundKind.TRAIN]

    def tokens_trained(self) -> int:
        """Target tokens the committed model saw: the sum over device-rounds whose update was
        aggregated (devices that finished a committed round) of the tokens they trained on
        (``TrainReport.examples``). The central baselines train on as many."""
        return sum(int(d.get("tokens") or 0) for r in self.committed() for d in r.get("device_bytes", []))

    def summary(self) -> dict[str, Any]:
        committed = self.committed()
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
            "upload_bytes_total": int(sum(ups)),
            "device_rounds": len(ups),
            "tokens_trained": self.tokens_trained(),
            "train_share_median": _median([r["train_share"] for r in committed if r.get("train_share")]),
            "non_training_share_median": _median(
                [r["non_training_share"] for r in committed if r.get("non_training_share") is not None]
            ),
            "eval_sample": self.evals.get(last_v, {}).get("sample"),
            "eval_messages": self.evals.get(last_v, {}).get("messages"),
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
    """Add to each round record the bytes its devices sent and received and the tokens they
    trained on (each device that saw the round through, and the round's medians and token
    total), from the devices' own round records."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for d in devices:
        r: RoundRecord
        for r in d.get("rounds", []):
            if r.kind == RoundKind.TRAIN and r.completed:
                by_round.setdefault(r.round, []).append(
                    {
                        "bytes_up": r.bytes_up or 0,
                        "bytes_down": r.bytes_down or 0,
                        "tokens": r.training.examples if r.training is not None else 0,
                        "steps": r.training.steps if r.training is not None else 0,
                        # local training as the round saw it (a slow phone's extra wait included)
                        "train_seconds": (r.seconds or {}).get("train", 0.0),
                        "train_interval": _train_interval(r),
                    }
                )
    for rec in rounds:
        got = by_round.get(rec["round_id"], [])
        rec["device_bytes"] = got
        ups = [b["bytes_up"] for b in got]
        downs = [b["bytes_down"] for b in got]
        rec["bytes_up_per_device"] = float(np.median(ups)) if ups else 0.0
        rec["bytes_down_per_device"] = float(np.median(downs)) if downs else 0.0
        rec["tokens_trained"] = sum(b["tokens"] for b in got)
        trains = [b["train_seconds"] for b in got if b["train_seconds"]]
        wall = rec.get("wall_seconds") or 0.0
        # the share of the round that its median device spent training (the rest is selection,
        # key agreement, transfers, unmasking and aggregation)
        rec["train_seconds_median"] = float(np.median(trains)) if trains else None
        rec["train_share"] = min(float(np.median(trains)) / wall, 1.0) if trains and wall > 0 else None
        # the part of the round during which at least one of its devices trained: when many
        # simulated devices share a few cores each one's training stretches over most of the
        # round, and the rest of the round is what selection, key agreement, transfers,
        # unmasking and aggregation cost
        span = union_seconds([b["train_interval"] for b in got if b["train_interval"] is not None])
        rec["train_span_seconds"] = round(span, 3) if span else None
        rec["non_training_share"] = round(max(1.0 - span / wall, 0.0), 4) if span and wall > 0 else None


def _train_interval(r: RoundRecord) -> tuple[float, float] | None:
    """Wall-clock start and end of a device's local training in a round (its marks: weights
    in hand, then trained)."""
    marks = r.marks or {}
    start, end = marks.get("weights"), marks.get("trained")
    return (start, end) if start is not None and end is not None and end >= start else None


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of closed intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def duration(seconds: float | None) -> str:
    """``3725.4`` -> ``"1:02:05"``; under an hour ``"2:05"``; under a minute ``"4.1 s"``."""
    if seconds is None or not np.isfinite(seconds):
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def clock(hour: float | None) -> str:
    """A simulated time of day in hours (``23.5``) as ``"23:30"``."""
    if hour is None:
        return ""
    minutes = round(hour * 60) % (24 * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _number(v: Any, digits: int = 3) -> Any:
    if v is None:
        return ""
    return round(float(v), digits) if isinstance(v, int | float) and not isinstance(v, bool) else v


def readable_round(r: dict[str, Any]) -> dict[str, Any]:
    """A round record (:func:`round_record` with :func:`attach_device_bytes`) as flat, named
    columns with units: times as durations since the fleet's start or simulated clock times,
    bytes in kB, the pool's arrival quantiles, drop-outs and stage times as a column each."""
    arrivals = r.get("pool_arrivals") or {}
    dropped = r.get("dropped") or {}
    out: dict[str, Any] = {
        "round": r.get("round"),
        "kind": r.get("kind"),
        "outcome": r.get("outcome"),
        "new version": r.get("new_version") or "",
        "failure": r.get("failure") or "",
        "started (since fleet start)": duration(r.get("t")),
        "started (sim clock)": clock(r.get("sim_hour")),
        "wall": duration(r.get("wall_seconds")),
        "candidates": r.get("candidates") if r.get("candidates") is not None else "",
        "selected": r.get("selected"),
        "reported": r.get("reported"),
        "dropped": sum(dropped.values()),
        "pool first arrival (s)": _number(arrivals.get("first", "")),
        "pool median arrival (s)": _number(arrivals.get("p50", "")),
        "pool last arrival (s)": _number(arrivals.get("last", "")),
        "upload kB/device": round(r.get("bytes_up_per_device", 0.0) / 1e3, 1),
        "download kB/device": round(r.get("bytes_down_per_device", 0.0) / 1e3, 1),
        "tokens trained": r.get("tokens_trained", ""),
        "train s/device (median)": _number(r.get("train_seconds_median") or "", 2),
        "training span (s)": _number(r.get("train_span_seconds") or "", 2),
        "non-training share": _number(
            r.get("non_training_share") if r.get("non_training_share") is not None else "", 3
        ),
        "loss before": _number(r.get("mean_loss_before") or ""),
        "loss after": _number(r.get("mean_loss_after") or ""),
    }
    for stage, n in sorted(dropped.items()):
        out[f"dropped at {stage}"] = n
    for stage, secs in (r.get("stage_seconds") or {}).items():
        out[f"{stage} (s)"] = _number(secs, 2)
    for key, value in sorted((r.get("dp") or {}).items()):
        out[f"dp {key}"] = _number(value, 4)
    return out


def version_progress(res: SimResult) -> dict[int, dict[str, float]]:
    """Where the run stood when each evaluated version was committed (:func:`progress`)."""
    return progress(res.rounds, set(res.evals), res.config.day_seconds)


def progress(
    rounds: list[dict[str, Any]], evaluated: set[int], day_seconds: float
) -> dict[int, dict[str, float]]:
    """Training rounds run (failed ones included), simulated hours since the fleet's start, and
    bytes the fleet's devices had uploaded (every device-round of those rounds that a device saw
    through) when each evaluated version was committed, for curves of accuracy against work and
    traffic. Takes a run's rows as recorded (also as read back from its rounds.json). Version 0
    (the bundle's) is at zero; a version whose round is not among the rows is left out."""
    train = sorted((r for r in rounds if r.get("kind") == RoundKind.TRAIN), key=lambda r: r["round"])
    out: dict[int, dict[str, float]] = {}
    if 0 in evaluated:
        out[0] = {"rounds": 0.0, "sim_hours": 0.0, "upload_bytes": 0.0}
    uploaded = 0.0
    for n, r in enumerate(train, 1):
        uploaded += sum(float(b.get("bytes_up") or 0) for b in r.get("device_bytes", []))
        v = r.get("new_version")
        if v and v in evaluated:
            end = float(r.get("t") or 0.0) + float(r.get("wall_seconds") or 0.0)
            out[v] = {"rounds": float(n), "sim_hours": end * 24 / day_seconds, "upload_bytes": uploaded}
    return out


def scalar_evals(evals: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The evaluations without their per-message arrays (for JSON)."""
    return {v: {k: x for k, x in e.items() if not isinstance(x, MessageHits)} for v, e in evals.items()}


def write_records(res: SimResult) -> None:
    """The run's files in ``out_dir/<name>``: rounds.json (as recorded), rounds.csv
    (:func:`readable_round` columns and the version's heldout top-1/top-3), evals.json,
    per_message.npz (each evaluated version's per-message counts: ``v<version>_<field>``),
    summary.json."""
    out = res.out_dir / res.config.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps(res.rounds, indent=2, default=str))
    (out / "evals.json").write_text(json.dumps(scalar_evals(res.evals), indent=2))
    arrays: dict[str, Any] = {
        f"v{v}_{name}": a
        for v, e in res.evals.items()
        if isinstance(hits := e.get("per_message"), MessageHits)
        for name, a in hits.as_arrays().items()
    }
    if arrays:
        np.savez_compressed(out / "per_message.npz", **arrays)
    (out / "summary.json").write_text(
        json.dumps(
            {"config": asdict(res.config), "summary": res.summary(), "final_int8": res.final},
            indent=2,
            default=str,
        )
    )
    rows = readable_rounds(res)
    with (out / "rounds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]) if rows else [], restval="")
        w.writeheader()
        w.writerows(rows)


def readable_rounds(res: SimResult) -> list[dict[str, Any]]:
    """The run's rounds as :func:`readable_round` rows, every row the same columns (a stage
    only some rounds reached is empty in the others), then the heldout top-1/top-3 of the
    version each committed (where it was evaluated)."""
    rows = [readable_round(r) for r in res.rounds]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    out = []
    for r, row in zip(res.rounds, rows, strict=True):
        ev = res.evals.get(r.get("new_version") or -1, {})
        out.append(
            {c: row.get(c, "") for c in cols}
            | {"heldout top-1": ev.get("top1", ""), "heldout top-3": ev.get("top3", "")}
        )
    return out
