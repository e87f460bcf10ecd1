"""``fedkeys simulate --compare``: configurations side by side on the same seeds and fleet.

- the pretrained (distilled) student with no federated training;
- federated training with plain float32 updates, no secure aggregation;
- federated training with the compressed codec and secure aggregation (the default);
- the same student trained centrally on the union of the simulated devices' messages (what a
  server holding their raw text would reach: the upper bound);
- the word-trigram baseline (public data, and public + the devices' messages).

``fedkeys simulate --privacy-sweep 1,3,8,inf``: the utility/privacy table
(:func:`privacy_sweep`). ``fedkeys simulate --selection-compare random,least-recent,oort``:
time to accuracy per selection strategy (:func:`selection_compare`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.launch import CoordinatorHandle
from protocol.wire import Outcome, RoundKind
from simulator.config import SimConfig
from simulator.evaluation import VersionEvaluator, heldout_sample
from simulator.fleet import fleet_users, make_specs
from simulator.records import SimResult
from simulator.run import run_simulation

__all__ = [
    "central_upper_bound",
    "compare",
    "participation",
    "privacy_sweep",
    "selection_compare",
    "time_to_target",
    "trigram_rows",
]

log = logging.getLogger(__name__)


def device_texts(devices: int, seed: int, max_examples: int, holdout: int = 20) -> list[list[str]]:
    """Each simulated device's training messages (its newest ``holdout`` excluded)."""
    from edge_client.text import normalize

    out: list[list[str]] = []
    for spec in make_specs(fleet_users(), devices, seed):
        keep = spec.texts[: max(len(spec.texts) - min(holdout, len(spec.texts) // 5), 0)][-max_examples:]
        out.append([t for t in (normalize(x) for x in keep) if t])
    return out


def fleet_texts(cfg: SimConfig, holdout: int = 20) -> list[str]:
    """The messages the simulated devices train on (their newest ``holdout`` excluded)."""
    return [t for texts in device_texts(cfg.devices, cfg.seed, cfg.max_examples, holdout) for t in texts]


def central_upper_bound(
    cfg: SimConfig, bundle_dir: Path, evaluator: VersionEvaluator, steps: int = 1500
) -> dict[str, float]:
    """Fine-tune the pretrained student on the union of the fleet's messages, centrally."""
    import torch

    from edge_client.batching import encode_messages, pack_batches
    from model_export.export import model_from_bundle
    from model_export.train import TrainConfig, train_lm

    b = evaluator.bundle
    base = model_from_bundle(b.root, b.manifest)
    texts = fleet_texts(cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(texts))
    val = [texts[i] for i in order[: max(len(texts) // 20, 50)]]
    train = [texts[i] for i in order[len(val) :]]
    seq = base.cfg.max_seq_len
    seqs = encode_messages(evaluator.tok, train, seq)
    val_batches = list(pack_batches(encode_messages(evaluator.tok, val, seq), 32, seq))
    torch.set_num_threads(2)
    tc = TrainConfig(steps=steps, batch_size=32, lr=5e-4, warmup=50, eval_every=250, min_lr_ratio=0.1)
    res = train_lm(replace(base.cfg, dropout=0.1), tc, seqs, val_batches, init=base.state_dict())
    weights = b.manifest.train.layout.flatten(
        {n: p.detach().numpy() for n, p in res.model.named_parameters()}
    )
    out = evaluator.eager(weights)
    out.update(steps=steps, messages=len(train), val_loss=res.best_val_loss)
    return out


def trigram_rows(cfg: SimConfig, texts: list[str]) -> dict[str, dict[str, float]]:
    from model_export.data import load_chitchat
    from model_export.evaluate import EvalResult, count_suggestions
    from model_export.ngram import TrigramLM
    from model_export.pipeline import prepare_texts

    split = prepare_texts(load_chitchat())
    out = {}
    for name, corpus in (
        ("trigram (public)", split.public_train + split.public_val),
        ("trigram (public + devices)", split.public_train + split.public_val + fleet_texts(cfg)),
    ):
        lm = TrigramLM().fit(corpus)
        r = EvalResult.from_counts(name, count_suggestions(lm.suggest, texts, []), per_piece=False)
        out[name] = {"top1": r.top1, "top3": r.top3}
    return out


def compare(
    base: SimConfig,
    bundle_dir: Path,
    out_dir: Path,
    coord: CoordinatorHandle,
    progress: Any = None,
    central_steps: int = 1500,
) -> tuple[list[SimResult], list[dict[str, Any]], dict[str, float]]:
    """Run the comparison; returns (runs, summary rows, baselines for the accuracy plot)."""
    heldout = heldout_sample(base.eval_messages, base.seed)
    configs = [
        replace(base.with_codec(compress=False), name="fl-float32", secagg=False),
        replace(base.with_codec(compress=True), name="fl-secure-compressed", secagg=True),
    ]
    runs = [
        run_simulation(c, bundle_dir, out_dir, coord, heldout=heldout, progress=progress) for c in configs
    ]
    evaluator = VersionEvaluator(bundle_dir, heldout)
    if progress:
        progress({"event": "central", "steps": central_steps})
    central = central_upper_bound(base, bundle_dir, evaluator, central_steps)
    trigrams = trigram_rows(base, heldout)
    pre = runs[0].evals[0]
    rows: list[dict[str, Any]] = [
        {
            "configuration": "pretrained student (no FL)",
            "top1": pre["top1"],
            "top3": pre["top3"],
            "upload kB/device": 0.0,
            "rounds": 0,
        }
    ]
    dense = 4 * evaluator.bundle.manifest.train.layout.size
    for r in runs:
        s = r.summary()
        up = s["upload_bytes_per_device"] or float("nan")
        rows.append(
            {
                "configuration": r.config.name,
                "top1": s["top1_final"],
                "top3": s["top3_final"],
                "upload kB/device": up / 1e3,
                "upload vs dense fp32": dense / up if np.isfinite(up) and up else float("nan"),
                "rounds": s["rounds_committed"],
                "round s (median)": s["round_seconds_median"],
                "int8 top1": s["final_int8_top1"],
            }
        )
    rows.append(
        {
            "configuration": "central (union of device data)",
            "top1": central["top1"],
            "top3": central["top3"],
            "upload kB/device": float("nan"),
            "rounds": 0,
        }
    )
    for name, t in trigrams.items():
        rows.append(
            {
                "configuration": name,
                "top1": t["top1"],
                "top3": t["top3"],
                "upload kB/device": float("nan"),
                "rounds": 0,
            }
        )
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[1]).index(k) if k in rows[1] else 99)
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    baselines = {
        "pretrained": pre["top1"],
        "central": central["top1"],
        **{k: v["top1"] for k, v in trigrams.items()},
    }
    return runs, rows, baselines


def privacy_sweep(
    base: SimConfig,
    bundle_dir: Path,
    out_dir: Path,
    coord: CoordinatorHandle,
    epsilons: list[float],
    progress: Any = None,
) -> tuple[list[SimResult], list[dict[str, Any]], dict[str, float]]:
    """Heldout accuracy against epsilon: one run per target (``inf`` = the same configuration
    without noise), on the same fleet, seeds and heldout sample. Every run weighs devices
    equally (weight_cap 1, which DP needs) so that only the noise differs."""
    heldout = heldout_sample(base.eval_messages, base.seed)
    runs = []
    for eps in epsilons:
        private = math.isfinite(eps)
        cfg = replace(
            base.with_codec(weight_cap=1),
            name=f"{base.privacy}-eps{eps:g}" if private else "non-private",
            privacy=base.privacy if private else "off",
            target_epsilon=eps if private else None,
        )
        runs.append(run_simulation(cfg, bundle_dir, out_dir, coord, heldout=heldout, progress=progress))
    pre = runs[0].evals[0]
    rows: list[dict[str, Any]] = [
        {
            "configuration": "pretrained student (no FL)",
            "epsilon": "",
            "top1": pre["top1"],
            "top3": pre["top3"],
        }
    ]
    free = next((r for r in runs if r.privacy is None), None)
    for r in runs:
        s = r.summary()
        rows.append(
            {
                "configuration": r.config.name,
                "epsilon": s["epsilon"] if s["epsilon"] is not None else math.inf,
                "delta": s["delta"] if s["delta"] is not None else "",
                "noise multiplier": s["noise_multiplier"] if s["noise_multiplier"] is not None else 0.0,
                "top1": s["top1_final"],
                "top3": s["top3_final"],
                "vs pretrained": (s["top1_final"] or 0) - pre["top1"],
                "vs non-private": (s["top1_final"] or 0) - free.summary()["top1_final"] if free else "",
                "rounds": s["rounds_committed"],
            }
        )
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in cols} for r in rows]
    return runs, rows, {"pretrained": pre["top1"]}


def _sim_hours(cfg: SimConfig, seconds: float) -> float:
    return seconds * 24 / cfg.day_seconds


def time_to_target(run: SimResult, target: float) -> dict[str, Any]:
    """Rounds, simulated hours and uploaded bytes until the first evaluated version whose
    heldout top-1 reaches ``target`` (None if it never does)."""
    hit = next((v for v in sorted(run.evals) if v > 0 and run.evals[v]["top1"] >= target), None)
    if hit is None:
        return {"version": None, "rounds": None, "sim_hours": None, "upload_MB": None}
    upto = [r for r in run.rounds if r["kind"] == RoundKind.TRAIN and (r["new_version"] or 0) <= hit]
    upto = [r for r in upto if r["outcome"] == Outcome.FAILED or r["new_version"] is not None]
    done = next(r for r in run.rounds if r.get("new_version") == hit)
    finished = done["t"] + done["wall_seconds"]
    up = sum(b["bytes_up"] for r in upto for b in r.get("device_bytes", []))
    return {
        "version": hit,
        "rounds": len(upto),
        "sim_hours": _sim_hours(run.config, finished),
        "upload_MB": up / 1e6,
    }


def participation(run: SimResult) -> dict[str, float]:
    """How evenly the training rounds spread over the fleet."""
    counts = [
        sum(1 for r in d.get("rounds", []) if r.kind == RoundKind.TRAIN and r.completed) for d in run.devices
    ]
    if not counts:
        return {"devices_participating": 0.0, "max_participations": 0.0, "gini": 0.0}
    xs = sorted(counts)
    n, total = len(xs), sum(xs)
    gini = (2 * sum((i + 1) * x for i, x in enumerate(xs)) / (n * total) - (n + 1) / n) if total else 0.0
    return {
        "devices_participating": float(sum(1 for c in counts if c > 0)),
        "max_participations": float(max(counts)),
        "gini": float(gini),
    }


def selection_compare(
    base: SimConfig,
    bundle_dir: Path,
    out_dir: Path,
    coord: CoordinatorHandle,
    strategies: list[str],
    target: float | None = None,
    progress: Any = None,
) -> tuple[list[SimResult], list[dict[str, Any]], dict[str, float]]:
    """Time to accuracy per selection strategy, on the same fleet (speeds, data, availability)
    and seeds. ``target`` defaults to the best top-1 that every strategy reached, so each row
    says how long that strategy took to get there."""
    heldout = heldout_sample(base.eval_messages, base.seed)
    runs = [
        run_simulation(
            replace(base, name=f"select-{s}", selection=s),
            bundle_dir,
            out_dir,
            coord,
            heldout=heldout,
            progress=progress,
        )
        for s in strategies
    ]
    pre = runs[0].evals[0]["top1"]
    if target is None:
        target = min(
            max(v["top1"] for k, v in r.evals.items() if k > 0) if len(r.evals) > 1 else pre for r in runs
        )
    rows: list[dict[str, Any]] = []
    for r in runs:
        s = r.summary()
        tt = time_to_target(r, target)
        rows.append(
            {
                "strategy": r.config.selection,
                "target top1": target,
                "rounds to target": tt["rounds"],
                "sim hours to target": tt["sim_hours"],
                "upload MB to target": tt["upload_MB"],
                "final top1": s["top1_final"],
                "rounds committed": s["rounds_committed"],
                "round s (median)": s["round_seconds_median"],
                **participation(r),
            }
        )
    return runs, rows, {"pretrained": pre, "target": target}
