"""Measurement of a comparison: the heldout sample, prefix-cached and parallel scoring, the
table with paired confidence intervals, the central baselines, readable round records, the
report's curves, and a small comparison end to end (tiny bundle)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.schemas import DeadlineSettings, RoundPublic
from edge_client.records import RoundRecord
from model_export.evaluate import MessageHits
from model_export.stats import paired_bootstrap, paired_ratio
from protocol.wire import RoundKind, TrainReport
from simulator.config import SIM_CODEC, SimConfig
from simulator.evaluation import HeldoutSample, draw_heldout, text_fingerprint
from simulator.records import (
    SimResult,
    attach_device_bytes,
    readable_round,
    readable_rounds,
    round_record,
    version_progress,
)
from simulator.table import TableRow, markdown, quality_table
from tests.corpora import chat_corpus

# -- the heldout sample ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus of 300 people (28 of them, with 360 messages, in the heldout split) with
    skewed sizes."""
    return chat_corpus(tmp_path_factory.mktemp("corpus") / "chat.jsonl", users=300, heavy=400)


def test_heldout_sample_is_fixed_per_seed_and_covers_every_heldout_participant(chat_file: Path) -> None:
    from model_export.data import load_corpus, normalize, split_corpus, split_of

    held = split_corpus(load_corpus(chat_file))["heldout"]
    people = {u for u, msgs in held.items() if any(normalize(m.text) for m in msgs)}
    total = sum(1 for msgs in held.values() for m in msgs if normalize(m.text))
    assert 10 < len(people) < total // 2  # the corpus is shaped as the test needs

    a, b = draw_heldout(len(people) + 40, 7, chat_file), draw_heldout(len(people) + 40, 7, chat_file)
    assert a == b and a.fingerprint == b.fingerprint == text_fingerprint(a.texts)
    other = draw_heldout(len(people) + 40, 8, chat_file)
    assert other.texts != a.texts and other.fingerprint != a.fingerprint
    assert len(a.texts) == len(people) + 40
    assert set(a.users) == people and a.participants == len(people)  # nobody left out
    assert all(split_of(u) == "heldout" for u in a.users)
    mine = {u: [normalize(m.text) for m in held[u]] for u in people}
    for u, t in zip(a.users, a.texts, strict=True):
        assert t in mine[u]
    assert list(a.users) == sorted(a.users)  # by participant
    # fewer messages than participants: a uniform draw; more than there are: all of them
    assert len(draw_heldout(5, 7, chat_file).texts) == 5
    assert len(draw_heldout(10 * total, 7, chat_file).texts) == total
    with pytest.raises(ValueError, match="at least one message"):
        draw_heldout(0, 7, chat_file)
    # the fingerprint follows the texts and their order
    swapped = HeldoutSample((a.texts[1], a.texts[0], *a.texts[2:]), a.users, a.seed)
    assert swapped.fingerprint != a.fingerprint


def test_heldout_sample_of_chitchat_holds_no_fleet_participant() -> None:
    from simulator.fleet import fleet_users

    sample = draw_heldout(300, 0)
    assert len(sample.texts) == 300 and sample.participants > 50
    assert not set(sample.users) & set(fleet_users())


def test_head_indices_are_nested_stable_and_in_sample_order(chat_file: Path) -> None:
    s = draw_heldout(200, 3, chat_file)
    again = HeldoutSample(s.texts, s.users, s.seed)
    small, mid, large = (s.head_indices(n) for n in (10, 50, 150))
    assert again.head_indices(50) == mid  # the same for every run of the sample
    assert set(small) <= set(mid) <= set(large)
    assert [len(x) for x in (small, mid, large)] == [10, 50, 150]
    assert mid == sorted(mid) and len(set(mid)) == 50
    assert s.head_indices(10_000) == list(range(200))
    head = s.head(50)
    assert head.texts == tuple(s.texts[i] for i in mid) and head.users == tuple(s.users[i] for i in mid)
    assert HeldoutSample(s.texts, s.users, s.seed + 1).head_indices(50) != mid
    with pytest.raises(ValueError, match="at least one message"):
        s.head_indices(0)


# -- scoring -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_prefix_cache_suggests_exactly_what_the_eager_model_does(tiny_bundle_dir: Path) -> None:
    import torch

    from edge_client.predictor import BeamSearch
    from edge_client.text import targets
    from edge_client.tokenizer import Tokenizer
    from model_export.eager import EagerStepModel
    from model_export.export import model_from_bundle
    from protocol.bundle import load_bundle
    from simulator.evaluation import PrefixCachedModel

    torch.set_num_threads(1)
    bundle = load_bundle(tiny_bundle_dir)
    tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
    lm = model_from_bundle(bundle.root, bundle.manifest, bundle.initial_weights())
    beams = bundle.manifest.predict.beam_batch
    plain = BeamSearch(EagerStepModel(lm, beams), tok)
    model = PrefixCachedModel(EagerStepModel(lm, beams), tok)
    cached = BeamSearch(model, tok)
    texts = list(draw_heldout(12, 0).texts)
    # longer than the window: its late contexts are trimmed by the search (not prefixes)
    long = " ".join(["see you tomorrow at the cinema near the station"] * 4)
    assert len(tok.encode(long)) > model.max_seq_len
    checked = 0
    for text in [*texts, long]:
        model.begin(text)
        # the message's own contexts (prefix hits), then another message's (misses)
        contexts = [c for c, _ in targets(text)] + ["how are you doing", "ok see yo"]
        for context in contexts:
            want, got = plain.suggest(context, 3), cached.suggest(context, 3)
            assert [s.word for s in got] == [s.word for s in want], context
            np.testing.assert_allclose([s.logprob for s in got], [s.logprob for s in want], atol=1e-4)
            checked += 1
    assert model.hits > checked / 2 and model.misses >= 2 * len(texts) + 2
    # a prefill of a cached prefix is the full model's: log-probs and the valid cache slots
    model.begin(texts[0])
    ids = model._ids[:3]
    for a, b in zip(model.prefill(ids), model.inner.prefill(ids), strict=True):
        if a.ndim == 1:
            np.testing.assert_allclose(a, b, atol=1e-4)
        else:
            np.testing.assert_allclose(a[..., :3, :], b[..., :3, :], atol=1e-5)


@pytest.mark.slow
def test_parallel_scoring_is_the_one_process_scoring_in_order(tiny_bundle_dir: Path) -> None:
    from protocol.bundle import load_bundle
    from simulator.evaluation import score_messages, score_parallel

    texts = list(draw_heldout(60, 1).texts)
    weights = load_bundle(tiny_bundle_dir).initial_weights()
    one = score_messages(tiny_bundle_dir, weights, texts)
    two = score_parallel(tiny_bundle_dir, weights, texts, 2, min_per_worker=1)
    assert len(one.per_message) == len(two.per_message) == len(texts)
    for field in ("words", "top1", "top3"):
        np.testing.assert_array_equal(getattr(two.per_message, field), getattr(one.per_message, field))
    assert (two.targets, two.top1, two.top3, two.calls) == (one.targets, one.top1, one.top3, one.calls)
    assert (two.pieces, two.words) == (one.pieces, one.words) and two.nll == pytest.approx(one.nll, rel=1e-5)
    assert one.targets == int(one.per_message.words.sum()) > len(texts)
    assert one.top1 == int(one.per_message.top1.sum()) > 0
    # too few messages for two workers: scored in this process, the same counts
    small = score_parallel(tiny_bundle_dir, weights, texts[:10], 2)
    np.testing.assert_array_equal(small.per_message.top3, one.per_message.top3[:10])


# -- the comparison table ----------------------------------------------------------------------


def _hits(words: list[int], top1: list[int], top3: list[int] | None = None) -> MessageHits:
    return MessageHits.from_lists(words, top1, top3 if top3 is not None else top1)


def _interval(text: str) -> tuple[float, float, float]:
    """``"+0.2000 [-0.0500, +0.4000]"`` or ``"57.14% [40.00, 80.00]"`` -> the three numbers."""
    nums = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]
    assert len(nums) == 3, text
    return nums[0], nums[1], nums[2]


def test_quality_table_against_hand_computed_values() -> None:
    words = [2, 3, 1, 4, 5, 2, 3]  # 20 targets
    rows = [
        TableRow("pretrained", _hits(words, [1, 0, 0, 1, 1, 0, 1], [1, 1, 0, 2, 2, 1, 1]), "reference"),
        TableRow("fl float32", _hits(words, [1, 1, 0, 2, 2, 1, 1]), "federated", {"rounds": 30}),
        TableRow("fl secure", _hits(words, [1, 1, 0, 2, 1, 1, 1]), "federated", {"rounds": 29}, "fl float32"),
        TableRow("central", _hits(words, [2, 2, 1, 3, 3, 1, 2]), "central", {"tokens trained": 123456}),
        TableRow("trigram", _hits(words, [0, 1, 0, 1, 2, 0, 1])),
    ]
    table = quality_table(
        rows, reference="pretrained", central="central", ngram="trigram", resamples=500, seed=1
    )
    by = {r["model"]: r for r in table}
    assert list(by) == ["pretrained", "fl float32", "fl secure", "central", "trigram"]
    assert len({tuple(r) for r in table}) == 1  # every row the same columns
    ref_col = "top-1 vs pretrained [95% CI]"
    # estimates: sums over messages, by hand
    assert by["pretrained"]["top-1"] == 4 / 20 and by["pretrained"]["top-3"] == 8 / 20
    assert by["fl float32"]["top-1"] == 8 / 20 and by["central"]["top-1"] == 14 / 20
    assert by["pretrained"][ref_col] == "" and by["pretrained"]["top-1 / central fine-tune"] == ""
    for name, top1 in (("pretrained", 0.2), ("fl float32", 0.4), ("central", 0.7), ("trigram", 0.25)):
        low, high = (float(x) for x in re.findall(r"\d\.\d+", by[name]["top-1 95% CI"]))
        assert low <= top1 <= high and low < high, name
    diff = _interval(by["fl float32"][ref_col])
    assert diff[0] == pytest.approx(0.2) and diff[1] <= 0.2 <= diff[2]
    assert by["fl float32"]["top-3 vs reference"] == "+0.0000"  # same top-3 hits as the reference
    share = _interval(by["fl float32"]["top-1 / central fine-tune"])
    assert share[0] == pytest.approx(100 * 8 / 14, abs=0.005) and share[1] <= share[0] <= share[2]
    vs_ngram = _interval(by["fl float32"]["vs trigram (same data)"])
    assert vs_ngram[0] == pytest.approx(0.15)
    rel = _interval(by["fl secure"]["relative to"].split(": ")[1])
    assert rel[0] == pytest.approx(100 * (7 / 8 - 1), abs=0.005) and rel[1] <= rel[0] <= rel[2]
    assert by["fl float32"]["relative to"] == "" and by["central"]["top-1 / central fine-tune"] == ""
    # the half-width ratio is the paired interval's, on the same resamples
    d = paired_bootstrap(rows[1].hits.top1, rows[0].hits.top1, words, resamples=500, seed=1)
    assert by["fl float32"]["lift / CI half-width"] == round(d.estimate / d.half_width, 1)
    q = paired_ratio(rows[1].hits.top1, rows[3].hits.top1, words, resamples=500, seed=1)
    assert share[1] == pytest.approx(100 * q.low, abs=0.005)
    assert by["central"]["tokens trained"] == 123456 and by["trigram"]["rounds"] == ""


def test_quality_table_refuses_rows_it_cannot_compare() -> None:
    a = TableRow("a", _hits([2, 3], [1, 1]), "reference")
    b = TableRow("b", _hits([2, 3], [2, 0]))
    with pytest.raises(ValueError, match="same messages"):
        quality_table([a, TableRow("c", _hits([3, 2], [1, 1]))], reference="a")
    with pytest.raises(ValueError, match="same messages"):
        quality_table([a, TableRow("c", _hits([2, 3, 1], [1, 1, 0]))], reference="a")
    with pytest.raises(ValueError, match="unique"):
        quality_table([a, b, TableRow("b", b.hits)], reference="a")
    for kw in ({"reference": "z"}, {"reference": "a", "central": "z"}, {"reference": "a", "ngram": "z"}):
        with pytest.raises(ValueError, match="no row named 'z'"):
            quality_table([a, b], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no row named 'z'"):
        quality_table([a, replace(b, relative_to="z")], reference="a")


def test_markdown_renders_every_row_and_escapes_pipes() -> None:
    rows = [
        {"model": "a", "top-1": 0.17142857, "tokens": 1234567, "note": "x | y", "ppl": float("nan")},
        {"model": "b", "top-1": 0.2, "tokens": 12, "note": "", "ppl": 10280.4},
    ]
    lines = markdown(rows).splitlines()
    assert lines[0] == "| model | top-1 | tokens | note | ppl |" and lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| a | 0.1714 | 1,234,567 | x \\| y |  |"
    assert lines[3] == "| b | 0.2 | 12 |  | 10,280 |"
    assert markdown([]) == ""


# -- round records -----------------------------------------------------------------------------


_T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _api_round(number: int, *, start: float, wall: float, version: int | None, dp: bool = False) -> Any:
    """A finished round as the admin API returns it (coordinator.schemas.RoundPublic)."""
    metrics: dict[str, Any] = {
        "candidates": 14,
        "candidate_rate": 3.2,
        "pool_arrivals": {"first": 0.412, "p50": 2.25, "last": 4.143},
        "dropped": {"upload": 1, "share": 1} if version else {"selection": 2},
        "stage_seconds": {"selecting": 4.3, "advertising": 0.8, "masked_input": 9.25},
        "reports": 10,
        "update_norm": 0.5,
        "mean_loss_before": 4.25,
        "mean_loss_after": 4.0,
    }
    if dp:
        metrics["dp"] = {"mode": "distributed", "noise_multiplier": 0.71234, "clip_norm": 2.0}
    return RoundPublic(
        id=100 + number,
        number=number,
        kind="train",
        stage="done",
        outcome="committed" if version else "failed",
        failure_reason=None if version else "selection: only 2 eligible devices",
        base_version=(version or 2) - 1,
        new_version=version,
        selection_target=13,
        selected=13,
        reported=10 if version else 0,
        bytes_in=250_000,
        bytes_out=4_000_000,
        created_at=_T0 + timedelta(seconds=start),
        finished_at=_T0 + timedelta(seconds=start + wall),
        metrics=metrics,
    ).model_dump(mode="json")


def _device(rounds: list[tuple[int, int]], trained: tuple[float, float] = (10.0, 13.0)) -> dict[str, Any]:
    """A device result with completed training rounds: (round id, bytes up); it trains from
    ``trained[0]`` to ``trained[1]`` seconds after each round's start (marks)."""
    return {
        "rounds": [
            RoundRecord(
                rid,
                RoundKind.TRAIN,
                completed=True,
                training=TrainReport(loss_before=4.2, loss_after=4.0, examples=900, steps=5, seconds=3.0),
                seconds={"train": 3.0},
                bytes_up=up,
                bytes_down=2_000_000,
                marks={"weights": 1e9 + rid * 1e4 + trained[0], "trained": 1e9 + rid * 1e4 + trained[1]},
            )
            for rid, up in rounds
        ]
    }


def _records(day_seconds: float) -> list[dict[str, Any]]:
    t0 = _T0.timestamp() - 30.0  # the fleet started 30 s before the first round
    api = [
        _api_round(1, start=0.0, wall=65.0, version=1, dp=True),
        _api_round(2, start=70.0, wall=20.0, version=None),
        _api_round(3, start=95.0, wall=3725.0, version=2),
    ]
    rounds = [round_record(r, t0, day_seconds, 23.0) for r in api]
    attach_device_bytes(
        rounds, [_device([(101, 20_000), (103, 30_000)]), _device([(101, 22_000)], trained=(12.0, 20.0))]
    )
    return rounds


def test_a_round_reads_as_named_columns_with_units() -> None:
    first, failed, last = _records(day_seconds=2400.0)
    row = readable_round(first)
    for value in row.values():
        assert not isinstance(value, dict | list | tuple), row
    assert row["started (since fleet start)"] == "30.0 s"
    assert row["started (sim clock)"] == "23:18"  # 30 s of a 2,400 s day after 23:00
    assert row["wall"] == "1:05"
    assert readable_round(last)["wall"] == "1:02:05"
    assert row["pool first arrival (s)"] == 0.412 and row["pool last arrival (s)"] == 4.143
    assert row["dropped"] == 2 and row["dropped at upload"] == 1 and row["dropped at share"] == 1
    assert row["masked_input (s)"] == 9.25 and row["dp noise_multiplier"] == 0.7123
    assert row["upload kB/device"] == 21.0 and row["download kB/device"] == 2000.0
    assert row["tokens trained"] == 1800 and row["new version"] == 1
    # two devices trained over [10, 13] and [12, 20] s of the round's 65: a 10 s span
    assert row["training span (s)"] == 10.0 and row["non-training share"] == round(1 - 10 / 65, 3)
    assert readable_round(failed)["failure"].startswith("selection") and readable_round(failed)["wall"]
    text = json.dumps(row)
    assert "{" not in text.strip("{}") and not re.search(r"\d\.\d+e\+09|17\d{8}", text)


def _result(rounds: list[dict[str, Any]], day_seconds: float = 2400.0) -> SimResult:
    cfg = SimConfig(name="run", day_seconds=day_seconds)
    evals = {v: {"top1": 0.1 + v / 100, "top3": 0.2, "messages": 30} for v in (0, 1, 2)}
    return SimResult(cfg, rounds, evals, {}, [], 100.0, Path("."))


def test_rounds_and_progress_of_a_run() -> None:
    res = _result(_records(day_seconds=240.0), day_seconds=240.0)
    rows = readable_rounds(res)
    assert len(rows) == 3 and len({tuple(r) for r in rows}) == 1  # the same columns, in order
    assert rows[0]["heldout top-1"] == 0.11 and rows[1]["heldout top-1"] == ""
    prog = version_progress(res)
    assert prog[0] == {"rounds": 0.0, "sim_hours": 0.0, "upload_bytes": 0.0}
    # version 1: round 1 ended 30 + 65 s after the start: 95 s of a 240 s day
    assert prog[1] == {"rounds": 1.0, "sim_hours": pytest.approx(9.5), "upload_bytes": 42_000.0}
    # version 2: after the failed round too; 30 + 95 + 3725 s
    assert prog[2] == {"rounds": 3.0, "sim_hours": pytest.approx(385.0), "upload_bytes": 72_000.0}


# -- central baselines -------------------------------------------------------------------------


def test_tokens_per_batch_and_steps_by_hand() -> None:
    from simulator.baselines import steps_for_tokens, tokens_per_batch

    # 5 tokens = 4 inputs each: two to a row of 8, two rows to a batch: 16 targets per batch;
    # the 13th sequence makes a partial batch, which training drops
    seqs = [np.arange(5, dtype=np.int64)] * 13
    assert tokens_per_batch(seqs, 2, 8) == 16.0
    assert [steps_for_tokens(t, seqs, 2, 8) for t in (0, 1, 16, 17, 100)] == [0, 1, 1, 2, 7]
    # 7 tokens (6 inputs) fill one row each: rows of 6 targets, 12 per batch of 2
    assert tokens_per_batch([np.arange(7, dtype=np.int64)] * 4, 2, 8) == 12.0
    # 2 sequences fill one row, half a batch: dropped (3 fill two rows: one batch, kept)
    with pytest.raises(ValueError, match="one batch"):
        tokens_per_batch(seqs[:2], 2, 8)
    assert tokens_per_batch(seqs[:3], 2, 8) == 12.0


def test_training_share_holds_back_the_newest_fifth_up_to_twenty() -> None:
    from simulator.baselines import fleet_training_texts, training_share
    from simulator.fleet import DeviceSpec

    msgs = [f"Message  {i}" for i in range(7)]
    assert training_share(msgs) == [f"message {i}" for i in range(6)]  # 7 // 5 = 1 held back
    assert len(training_share([f"m {i}" for i in range(50)])) == 40
    assert len(training_share([f"m {i}" for i in range(300)])) == 280  # at most 20
    assert training_share(["a", "b", "c", "d"]) == ["a", "b", "c", "d"]  # 4 // 5 = 0
    assert training_share(["a", "   ", "c", "d", "e"]) == ["a", "c", "d"]  # empty ones dropped
    specs = [
        DeviceSpec(0, "ann", tuple(msgs), 1.0, "phone"),
        DeviceSpec(1, "bob", ("x", "y"), 1.0, "phone"),
        DeviceSpec(2, "ann", tuple(msgs), 1.0, "tablet"),  # the same person's second device
    ]
    assert fleet_training_texts(specs) == [*training_share(msgs), "x", "y"]


@pytest.mark.slow
def test_central_finetune_trains_the_pretrained_weights_for_the_budget(tiny_bundle_dir: Path) -> None:
    from model_export.export import model_from_bundle
    from protocol.bundle import load_bundle
    from simulator.baselines import central_finetune, fleet_training_texts
    from simulator.fleet import fleet_users, make_specs

    texts = fleet_training_texts(make_specs(fleet_users(), 4, 0))
    budget = 3000
    ft = central_finetune(tiny_bundle_dir, texts, budget, threads=1)
    bundle = load_bundle(tiny_bundle_dir)
    window = model_from_bundle(bundle.root, bundle.manifest).cfg.max_seq_len
    batch = 32 * window  # the most targets one batch of 32 rows holds
    assert ft.weights.shape == bundle.initial_weights().shape and ft.weights.dtype == np.float32
    assert np.abs(ft.weights - bundle.initial_weights()).max() > 1e-4
    assert abs(ft.tokens - budget) <= batch and ft.steps >= 2
    assert 0 < ft.messages < len(texts) and math.isfinite(ft.val_loss)
    none = central_finetune(tiny_bundle_dir, texts, 0, threads=1)
    assert none.steps == 0 and np.array_equal(none.weights, bundle.initial_weights())


# -- a comparison end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_compare_end_to_end_with_report(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """Both federated runs, the central models and trigrams on one heldout sample, the table
    with intervals, and the report (curves, readable rounds) read from what the run wrote."""
    from simulator.compare import CENTRAL_FINETUNE, FL_SECURE, PRETRAINED, TRIGRAM_FLEET, compare
    from simulator.report import write_report
    from simulator.run import local_coordinator

    cfg = SimConfig(
        name="tiny",
        devices=8,
        per_round=3,
        rounds=2,
        min_reports=3,
        over_selection=1.34,
        eval_every=1,
        local_steps=2,
        day_seconds=600.0,
        start_hour=1.0,
        dropout=0.0,
        workers=2,
        codec=SIM_CODEC.model_copy(update={"keep_fraction": 0.25, "bits": 6}),
        max_minutes=6,
        deadlines=DeadlineSettings(selection=4.0, advertise=5.0, share=5.0, upload=20.0, unmask=6.0),
    )
    out = tmp_path / "out"
    with local_coordinator(tmp_path / "coord") as coord:
        runs, table, baselines = compare(
            cfg,
            tiny_bundle_dir,
            out,
            coord,
            central_tokens=2000,
            heldout_messages=80,
            curve_messages=30,
            scratch_tokens=2000,
            work=tmp_path / "cache",
            eval_workers=1,
            resamples=200,
        )
    assert [r.config.name for r in runs] == ["fl-float32", "fl-secure-compressed"]
    assert not runs[0].config.secagg and runs[1].config.secagg
    for r in runs:
        assert {e["messages"] for e in r.evals.values()} == {30}  # curves on the nested subsample
    by = {row["model"]: row for row in table}
    assert len(by) == 7 and set(baselines) < set(by)
    assert PRETRAINED in baselines and CENTRAL_FINETUNE in baselines and TRIGRAM_FLEET in baselines
    for name, row in by.items():
        low, high = (float(x) for x in re.findall(r"\d\.\d+", row["top-1 95% CI"]))
        assert low <= row["top-1"] <= high, name
    assert by[FL_SECURE]["relative to"].startswith("FL float32")
    assert by[FL_SECURE]["top-1 / central fine-tune"].endswith("]")
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["sample"]["messages"] == 80 and saved["sample"]["curve_messages"] == 30
    ft = saved["sample"]["central_finetune"]
    assert ft["steps"] >= 1 and abs(ft["tokens"] - 2000) <= 32 * 32
    npz = np.load(out / "comparison.npz")
    assert len(npz["names"]) == 7 and all(npz[f"{i}_words"].size == 80 for i in range(7))
    assert "| model |" in (out / "comparison.md").read_text()

    page = write_report(runs, out, summary_rows=table, baselines=baselines, title="comparison")
    text = page.read_text()
    assert "95% CI" in text and "paired bootstrap" in text and "started (sim clock)" in text
    assert "{&#x27;" not in text and "{'" not in text  # no dicts in the tables
    assert not re.search(r"<td>1\.\d+e\+09</td>|<td>17\d{8}", text)  # no epoch stamps
    assert (out / "accuracy.png").stat().st_size > 20_000


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 50)), max_size=30))
def test_union_of_intervals_matches_a_fine_grid(raw: list[tuple[float, float]]) -> None:
    """union_seconds against counting the cells of a 0.01 s grid that some interval covers
    (intervals on the grid, so the count is exact)."""
    from simulator.records import union_seconds

    cells = [(round(a * 100), round(a * 100) + round(w * 100)) for a, w in raw]
    covered: set[int] = set()
    for lo, hi in cells:
        covered.update(range(lo, hi))
    got = union_seconds([(lo / 100, hi / 100) for lo, hi in cells])
    assert got == pytest.approx(len(covered) / 100, abs=1e-6)


def test_an_evaluation_thread_lowers_its_own_priority_and_its_childrens_only() -> None:
    """The run's evaluations yield the CPU to its devices: the evaluating thread (and the
    scoring processes it starts) run at a higher nice value, the rest of the process does not."""
    import os
    import subprocess
    import sys
    import threading

    from simulator.evaluation import BACKGROUND_NICENESS, lower_thread_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def work() -> None:
        seen["thread"] = lower_thread_priority()
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
            capture_output=True,
            text=True,
            check=True,
        )
        seen["child"] = int(out.stdout)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    expected = min(19, before + BACKGROUND_NICENESS)
    assert seen == {"thread": expected, "child": expected}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_background_work_returns_its_value_or_raises_its_error_at_low_priority() -> None:
    import os
    import threading

    from simulator.evaluation import BACKGROUND_NICENESS, Background

    before = os.getpriority(os.PRIO_PROCESS, 0)

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert Background(niceness).result() == min(19, before + BACKGROUND_NICENESS)

    def broken() -> int:
        raise ValueError("no heldout messages")

    with pytest.raises(ValueError, match="no heldout messages"):
        Background(broken).result()
