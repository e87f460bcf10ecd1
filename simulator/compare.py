"""``fedkeys simulate --compare``: configurations side by side on the same seeds, fleet and
heldout sample, every row with a 95% confidence interval (``simulator.table``):

- the pretrained (distilled) student with no federated training;
- federated training with plain float32 updates, no secure aggregation;
- federated training with the compressed codec and secure aggregation (the default);
- the pretrained student fine-tuned centrally on exactly the messages the fleet holds, for as
  many training tokens as the default federated run trained on (the honest upper bound);
- the student's architecture trained centrally from scratch on public + the fleet's messages;
- the word trigram on public data, and on public + the fleet's messages.

Every row is scored on one fixed heldout sample (``simulator.evaluation.draw_heldout``, 5,000
messages by default); the federated runs' curves over rounds use a nested subsample of it.

``fedkeys simulate --privacy-sweep 1,3,8,inf``: the utility/privacy table
(:func:`privacy_sweep`). ``fedkeys simulate --selection-compare random,least-recent,oort``:
time to accuracy per selection strategy (:func:`selection_compare`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.launch import CoordinatorHandle
from model_export.evaluate import MessageHits
from model_export.stats import DEFAULT_RESAMPLES, paired_bootstrap
from protocol.wire import RoundKind
from simulator.config import SimConfig
from simulator.evaluation import (
    CURVE_MESSAGES,
    EVAL_WORKERS,
    HELDOUT_MESSAGES,
    VersionEvaluator,
    draw_heldout,
    heldout_sample,
    scores,
    text_fingerprint,
)
from simulator.fleet import fleet_specs
from simulator.records import SimResult, duration, version_progress
from simulator.run import run_simulation
from simulator.table import TableRow, ci_text, markdown, quality_table

__all__ = [
    "PRETRAINED",
    "compare",
    "participation",
    "privacy_sweep",
    "selection_compare",
    "subsample_top1",
    "time_to_target",
    "trigram_rows",
    "trigram_scores",
]

log = logging.getLogger(__name__)

PRETRAINED = "pretrained student (no FL)"
FL_FLOAT32 = "FL float32, no secure aggregation"
FL_SECURE = "FL compressed + secure aggregation (default)"
CENTRAL_FINETUNE = "central fine-tune (same data, same tokens)"
CENTRAL_SCRATCH = "central from scratch (public + fleet data)"
TRIGRAM_PUBLIC = "trigram (public)"
TRIGRAM_FLEET = "trigram (public + fleet data)"

Progress = Callable[[dict[str, Any]], None]


def fleet_texts(cfg: SimConfig) -> list[str]:
    """The messages the simulated fleet's devices can train on (each participant once)."""
    from simulator.baselines import fleet_training_texts

    return fleet_training_texts(fleet_specs(cfg))


def trigram_scores(lm: Any, texts: Sequence[str]) -> dict[str, Any]:
    """A word model's next-word hits on ``texts`` as a run records an evaluation."""
    import time

    from model_export.evaluate import EvalResult, count_suggestions

    t0 = time.perf_counter()
    counts = count_suggestions(lm.suggest, texts, [])
    r = EvalResult.from_counts("trigram", counts, per_piece=False)
    return scores(
        r.top1, r.top3, r.words, counts.per_message, text_fingerprint(texts), time.perf_counter() - t0
    )


def trigram_rows(cfg: SimConfig, texts: list[str]) -> dict[str, dict[str, Any]]:
    """The trigram on public data, and on public + the fleet's messages (of ``cfg.corpus``),
    scored on ``texts``."""
    from simulator.baselines import public_texts, trigram

    train, val = public_texts(cfg.corpus)
    public = train + val
    return {
        TRIGRAM_PUBLIC: trigram_scores(trigram(public), texts),
        TRIGRAM_FLEET: trigram_scores(trigram(public + fleet_texts(cfg)), texts),
    }


def _subset(hits: MessageHits, idx: Sequence[int]) -> MessageHits:
    i = np.asarray(idx, dtype=np.int64)
    return MessageHits(hits.words[i], hits.top1[i], hits.top3[i])


def _top1(hits: MessageHits) -> float:
    return float(hits.top1.sum() / max(int(hits.words.sum()), 1))


def subsample_top1(hits: MessageHits, idx: Sequence[int]) -> float:
    """Top-1 of per-message counts on the messages at ``idx`` (a curve's nested subsample)."""
    return _top1(_subset(hits, idx))


def _fl_columns(run: SimResult, dense: int) -> dict[str, Any]:
    s = run.summary()
    up = s["upload_bytes_per_device"]
    return {
        "upload kB/device": round(up / 1e3, 1) if up else "",
        "upload vs dense fp32": f"{dense / up:.1f}x" if up else "",
        "rounds": s["rounds_committed"],
        "device-rounds": s["device_rounds"],
        "tokens trained": s["tokens_trained"],
        "wall time": duration(run.seconds),
        "round (median)": duration(s["round_seconds_median"]),
        "non-training share of round (median)": (
            f"{100 * s['non_training_share_median']:.0f}%"
            if s.get("non_training_share_median") is not None
            else ""
        ),
    }


def compare(
    base: SimConfig,
    bundle_dir: Path,
    out_dir: Path,
    coord: CoordinatorHandle,
    progress: Progress | None = None,
    central_tokens: int | None = None,
    *,
    heldout_messages: int = HELDOUT_MESSAGES,
    curve_messages: int = CURVE_MESSAGES,
    scratch_tokens: int | None = None,
    work: Path | None = None,
    eval_workers: int = EVAL_WORKERS,
    resamples: int = DEFAULT_RESAMPLES,
    float32: bool = True,
) -> tuple[list[SimResult], list[dict[str, Any]], dict[str, float]]:
    """Run the comparison; returns (runs, table rows, top-1 of the baselines on the curves'
    subsample for the accuracy plots). Writes ``comparison.md`` (the table and the sample),
    ``comparison.json`` and ``comparison.npz`` (every row's per-message counts) to ``out_dir``.

    ``central_tokens``: the central fine-tune's budget (default: the tokens the default
    federated run trained on); ``scratch_tokens``: the from-scratch model's (default the same
    budget: the model-quality table's 6,000 steps of 32 rows take about 2.5 hours on two cores,
    longer than the population run itself), cached in ``work`` (default
    ``out_dir/../central-cache``). ``float32=False`` leaves out the float32 federated run
    (``--no-float32``: a long run that only asks about the default against the baselines).
    """
    from simulator.baselines import central_finetune, central_scratch, fleet_training_texts, public_texts
    from simulator.baselines import trigram as fit_trigram

    say: Progress = progress or (lambda ev: None)
    sample = draw_heldout(heldout_messages, base.seed, base.corpus)
    curve_idx = sample.head_indices(curve_messages)
    curve_texts = [sample.texts[i] for i in curve_idx]
    configs = {
        FL_FLOAT32: replace(base.with_codec(compress=False), name="fl-float32", secagg=False),
        FL_SECURE: replace(base.with_codec(compress=True), name="fl-secure-compressed", secagg=True),
    }
    if not float32:
        del configs[FL_FLOAT32]
    fl = {
        name: run_simulation(c, bundle_dir, out_dir, coord, heldout=curve_texts, progress=progress)
        for name, c in configs.items()
    }
    runs = list(fl.values())
    evaluator = VersionEvaluator(bundle_dir, sample.texts, eval_workers)
    evals: dict[str, dict[str, Any]] = {PRETRAINED: evaluator.pretrained()}
    for name, run in fl.items():
        if run.final_weights is None:
            raise RuntimeError(f"run {run.config.name} returned no final weights")
        evals[name] = evaluator.eager(run.final_weights)
    secure = fl[FL_SECURE]
    fleet = fleet_training_texts(fleet_specs(base))
    budget = secure.tokens_trained() if central_tokens is None else central_tokens
    say({"event": "central", "steps": f"{budget:,} tokens"})
    ft = central_finetune(bundle_dir, fleet, budget, seed=base.seed)
    evals[CENTRAL_FINETUNE] = evaluator.eager(ft.weights)
    say({"event": "baseline", "name": CENTRAL_SCRATCH})
    public_train, public_val = public_texts(base.corpus)
    public = public_train + public_val
    sc = central_scratch(
        bundle_dir,
        public_train + fleet,
        work or out_dir.parent / "central-cache",
        tokens=budget if scratch_tokens is None else scratch_tokens,
        val_texts=public_val,
        seed=base.seed,
    )
    evals[CENTRAL_SCRATCH] = evaluator.eager(sc.weights)
    say({"event": "baseline", "name": "trigrams"})
    evals[TRIGRAM_PUBLIC] = trigram_scores(fit_trigram(public), sample.texts)
    evals[TRIGRAM_FLEET] = trigram_scores(fit_trigram(public + fleet), sample.texts)

    dense = 4 * evaluator.bundle.manifest.train.layout.size
    central_cols = {
        CENTRAL_FINETUNE: {"tokens trained": ft.tokens, "wall time": duration(ft.seconds)},
        CENTRAL_SCRATCH: {"tokens trained": sc.tokens, "wall time": duration(sc.seconds)},
    }
    fl_rows = [
        TableRow(
            name,
            evals[name]["per_message"],
            "federated",
            _fl_columns(run, dense),
            relative_to=FL_FLOAT32 if name == FL_SECURE and FL_FLOAT32 in fl else None,
        )
        for name, run in fl.items()
    ]
    rows = [
        TableRow(PRETRAINED, evals[PRETRAINED]["per_message"], "reference"),
        *fl_rows,
        TableRow(
            CENTRAL_FINETUNE,
            evals[CENTRAL_FINETUNE]["per_message"],
            "central",
            central_cols[CENTRAL_FINETUNE],
        ),
        TableRow(
            CENTRAL_SCRATCH, evals[CENTRAL_SCRATCH]["per_message"], "central", central_cols[CENTRAL_SCRATCH]
        ),
        TableRow(TRIGRAM_PUBLIC, evals[TRIGRAM_PUBLIC]["per_message"]),
        TableRow(TRIGRAM_FLEET, evals[TRIGRAM_FLEET]["per_message"]),
    ]
    table = quality_table(
        rows,
        reference=PRETRAINED,
        central=CENTRAL_FINETUNE,
        ngram=TRIGRAM_FLEET,
        resamples=resamples,
        seed=base.seed,
    )
    _write_comparison(
        out_dir,
        table,
        evals,
        sample_info={
            "messages": len(sample.texts),
            "words": int(evals[PRETRAINED]["per_message"].words.sum()),
            "participants": sample.participants,
            "fingerprint": sample.fingerprint,
            "curve_messages": len(curve_texts),
            "fleet_training_messages": len(fleet),
            "central_finetune": {
                "tokens": ft.tokens,
                "steps": ft.steps,
                "messages": ft.messages,
                "val_loss": ft.val_loss,
            },
            "central_scratch": {
                "tokens": sc.tokens,
                "steps": sc.steps,
                "messages": sc.messages,
                "val_loss": sc.val_loss,
            },
        },
    )
    baselines = {
        name: subsample_top1(evals[name]["per_message"], curve_idx)
        for name in (PRETRAINED, CENTRAL_FINETUNE, CENTRAL_SCRATCH, TRIGRAM_PUBLIC, TRIGRAM_FLEET)
    }
    return runs, table, baselines


def _write_comparison(
    out_dir: Path, table: list[dict[str, Any]], evals: dict[str, dict[str, Any]], sample_info: dict[str, Any]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = sample_info
    (out_dir / "comparison.md").write_text(
        f"Heldout sample: {s['messages']:,} messages ({s['words']:,} next-word targets) of "
        f"{s['participants']} heldout participants, sample {s['fingerprint']}; curves over rounds on "
        f"a nested subsample of {s['curve_messages']:,} messages. 95% intervals: paired bootstrap "
        "over heldout messages.\n\n" + markdown(table) + "\n"
    )
    (out_dir / "comparison.json").write_text(
        json.dumps(
            {
                "sample": sample_info,
                "table": table,
                "evals": {n: {k: v for k, v in e.items() if k != "per_message"} for n, e in evals.items()},
            },
            indent=2,
            default=str,
        )
    )
    arrays: dict[str, Any] = {
        f"{i}_{field}": a
        for i, e in enumerate(evals.values())
        for field, a in e["per_message"].as_arrays().items()
    }
    np.savez_compressed(out_dir / "comparison.npz", names=np.array(list(evals)), **arrays)


def _vs_reference(run_eval: dict[str, Any], ref_eval: dict[str, Any], seed: int) -> str:
    """Top-1 difference to the reference evaluation with its paired 95% interval ("" when the
    evaluations carry no per-message counts of the same sample)."""
    a, b = run_eval.get("per_message"), ref_eval.get("per_message")
    if not (isinstance(a, MessageHits) and isinstance(b, MessageHits)) or run_eval.get(
        "sample"
    ) != ref_eval.get("sample"):
        return ""
    return ci_text(paired_bootstrap(a.top1, b.top1, a.words, seed=seed), sign=True)


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
    equally (:meth:`SimConfig.privacy_run`) so that only the noise differs."""
    heldout = heldout_sample(base.eval_messages, base.seed, base.corpus)
    runs = []
    for eps in epsilons:
        cfg = base.privacy_run(eps)
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
                "vs pretrained [95% CI]": _vs_reference(r.evals[max(r.evals)], pre, base.seed),
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
    """Rounds (failed ones included), simulated hours and uploaded bytes until the first
    evaluated version whose heldout top-1 reaches ``target`` (None if it never does)."""
    hit = next((v for v in sorted(run.evals) if v > 0 and run.evals[v]["top1"] >= target), None)
    at = version_progress(run).get(hit) if hit is not None else None
    if hit is None or at is None:
        return {"version": None, "rounds": None, "sim_hours": None, "upload_MB": None}
    return {
        "version": hit,
        "rounds": int(at["rounds"]),
        "sim_hours": at["sim_hours"],
        "upload_MB": at["upload_bytes"] / 1e6,
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
    heldout = heldout_sample(base.eval_messages, base.seed, base.corpus)
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
