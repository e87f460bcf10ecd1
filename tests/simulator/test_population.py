"""Population runs of any corpus (``fedkeys simulate --population --corpus FILE``): every
federated participant of a corpus written by the test is one device, with all of its messages;
local work follows each device's data (one pass, capped by ``local_steps``); a bad corpus or a
bundle whose tokenizer does not fit it is a one-line error with exit code 2. And the same
simulation with its devices spread over a two-node Ray cluster (``--ray-address``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.batching import encode_messages
from edge_client.text import normalize
from edge_client.tokenizer import Tokenizer
from model_export.data import load_corpus, split_corpus, split_of
from protocol.bundle import load_bundle
from simulator.config import LOCAL_EPOCHS, SimConfig
from simulator.fleet import population_specs
from tests.corpora import chat_corpus, multilingual_corpus, write_jsonl

CAP = 3  # --local-steps of the population run


def _simulate(argv: list[str]) -> int:
    from fedkeys.cli import main

    return main(["simulate", *argv])


def _device_rounds(out: Path) -> dict[int, list[dict[str, Any]]]:
    """Each device's completed training rounds, from its state directory's history file."""
    got: dict[int, list[dict[str, Any]]] = {}
    for history in out.glob("*/devices/*/device-*/history.jsonl"):
        index = int(history.parent.name.removeprefix("device-"))
        for line in history.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "train" and rec["completed"]:
                got.setdefault(index, []).append(rec)
    return got


def _positions(tok: Tokenizer, texts: list[str], seq_len: int) -> tuple[int, int]:
    """(input positions, sequences) of a device's training share as the agent encodes it."""
    seqs = encode_messages(tok, [t for t in (normalize(x) for x in texts) if t], seq_len)
    return sum(len(s) - 1 for s in seqs), len(seqs)


@pytest.mark.slow
def test_population_of_a_corpus_file(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """Every federated participant of the corpus is a device; rounds commit with secure
    aggregation; a device makes the population's local epochs over its messages: heavy ones
    stop at the step cap, light ones make the few steps their messages fill. The corpus holds
    light (5 messages: one batch a pass) and heavy (150: many batches) writers, so that every
    device that trains has one exact step count, whichever devices the rounds select."""
    corpus = chat_corpus(tmp_path / "chat.jsonl", counts=[150] * 11 + [5] * 11 + [1])
    federated = split_corpus(load_corpus(corpus))["federated"]
    out = tmp_path / "sim"
    code = _simulate(
        [
            "--population",
            "--corpus",
            str(corpus),
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(out),
            "--per-round",
            "3",
            "--rounds",
            "3",
            "--local-steps",
            str(CAP),
            "--min-examples",
            "5",
            "--start-hour",
            "2",  # the simulated night: most devices charge
            "--day-seconds",
            "3600",
            "--dropout",
            "0",
            "--eval-every",
            "1",
            "--eval-messages",
            "40",
            "--final-messages",
            "80",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    # the curves on 40 messages; the summary's rows on the 80 they are nested in
    (summary_file,) = out.glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    (curve,) = out.glob("*/secure/evals.json")
    assert {e["messages"] for e in json.loads(curve.read_text()).values()} == {40}
    assert summary["final_sample"]["messages"] == 80
    assert summary["rows"][0]["configuration"] == "pretrained student (no FL)"
    (run,) = out.glob("*/secure/summary.json")
    summary = json.loads(run.read_text())
    cfg = summary["config"]
    assert cfg["population"] and cfg["devices"] == len(federated) and cfg["local_epochs"] == LOCAL_EPOCHS
    rounds = json.loads(run.with_name("rounds.json").read_text())
    committed = [r for r in rounds if r["kind"] == "train" and r["outcome"] == "committed"]
    assert len(committed) >= 2, [(r["outcome"], r.get("failure")) for r in rounds]
    assert all(r["stage_seconds"].get("masked_input") is not None for r in committed)  # secure

    # the fleet: one device per federated participant, each with all of its messages
    specs = population_specs({u: [m.text for m in ms] for u, ms in federated.items()}, SimConfig().seed)
    assert sorted(s.user for s in specs) == sorted(federated)
    assert all(len(s.texts) == len(federated[s.user]) for s in specs)
    devices = list(out.glob("*/devices/*/device-*"))
    assert len(devices) == len(federated)  # every device ran (and kept its own store)

    # local work follows the data: local epochs over the device's training share, at most CAP
    # steps; a pass packs its sequences into at least the batches their positions fill and at
    # most one batch per batch_size sequences
    bundle = load_bundle(tiny_bundle_dir)
    tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
    spec = bundle.manifest.train
    batch_positions = spec.batch_size * spec.seq_len
    trained = 0
    for index, recs in _device_rounds(out).items():
        texts = list(specs[index].texts)
        assert len(texts) >= 5  # the others never volunteer (--min-examples)
        share = texts[: len(texts) - min(20, len(texts) // 5)]  # the newest are kept for evaluation
        positions, seqs = _positions(tok, share, spec.seq_len)
        fewest = min(CAP, LOCAL_EPOCHS * math.ceil(positions / batch_positions))
        most = min(CAP, LOCAL_EPOCHS * math.ceil(seqs / spec.batch_size))
        assert fewest == most  # light: one batch a pass, fewer steps than CAP; heavy: CAP
        for rec in recs:
            assert rec["training"]["steps"] == most, (index, len(texts), rec["training"]["steps"], most)
            trained += 1
    assert trained >= 2 * 3  # the committed rounds' reports at least


@pytest.mark.parametrize(
    "case",
    ["missing", "not-json", "no-federated", "no-heldout", "tokenizer"],
)
def test_corpus_errors_are_one_line_exit_2(
    case: str, tmp_path: Path, tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "corpus.jsonl"
    if case == "not-json":
        path.write_text('{"user": "a", "text": "hi", "timestamp": 1}\nnot json\n')
    elif case in ("no-federated", "no-heldout"):
        want = "federated" if case == "no-heldout" else "public"
        users = [u for u in (f"user-{i}" for i in range(200)) if split_of(u) == want][:5]
        write_jsonl(
            path, [{"user": u, "text": f"hello {i}", "timestamp": i} for u in users for i in range(30)]
        )
    elif case == "tokenizer":  # many scripts against a bundle built on English chat
        multilingual_corpus(path)
    code = _simulate(["--population", "--corpus", str(path), "--bundle", str(tiny_bundle_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("fedkeys: error:"), err
    expected = {
        "missing": "no such file",
        "not-json": "not valid JSON",
        "no-federated": "federated split",
        "no-heldout": "heldout",
        "tokenizer": "tokenizer",
    }[case]
    assert expected in err, err


def test_a_corpus_without_a_bundle_is_not_built_on_chitchat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = chat_corpus(tmp_path / "chat.jsonl")
    assert _simulate(["--corpus", str(corpus), "--bundle", str(tmp_path / "none")]) == 2
    assert "fedkeys export build --corpus" in capsys.readouterr().err


def test_population_specs_hold_every_participant_in_a_seeded_order() -> None:
    users = {f"u{i}": [f"m{j}" for j in range(i + 1)] for i in range(40)}
    a, b = population_specs(users, 3), population_specs(users, 3)
    assert [s.user for s in a] == [s.user for s in b]
    assert [s.user for s in a] != [s.user for s in population_specs(users, 4)]
    assert sorted(s.user for s in a) == sorted(users) and [s.index for s in a] == list(range(40))
    assert all(s.texts == tuple(users[s.user]) and s.speed >= 1 for s in a)


@pytest.mark.slow
def test_population_over_a_two_node_ray_cluster(
    tmp_path: Path, tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--ray-address``: the population run with its workers spread over a Ray cluster of two
    nodes (Ray's own ``cluster_utils``, both on loopback); devices ran on both, rounds commit."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from coordinator.schemas import DeadlineSettings
    from fedkeys.cli import build_parser
    from simulator.cli import _config
    from simulator.run import local_coordinator, run_simulation

    # Ray addresses nodes by the host's outward address unless told it is not a cluster host:
    # every node and the driver stay on 127.0.0.1
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"num_cpus": 1, "object_store_memory": 80 << 20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        args = build_parser().parse_args(["simulate", "--ray-address", cluster.address])
        assert _config(args).ray_address == cluster.address
        corpus = chat_corpus(tmp_path / "chat.jsonl")
        cfg = SimConfig(
            name="ray-cluster",
            corpus=str(corpus),
            population=True,
            devices=len(split_corpus(load_corpus(corpus))["federated"]),
            per_round=3,
            rounds=2,
            min_reports=3,
            min_examples=5,
            local_epochs=1,
            local_steps=CAP,
            eval_every=2,
            eval_messages=20,
            day_seconds=3600.0,
            start_hour=2.0,
            dropout=0.0,
            workers=2,
            ray_address=cluster.address,
            max_minutes=6,
            # Ray's workers start slowly on a busy machine: a longer selection window
            deadlines=DeadlineSettings(selection=30.0, advertise=10.0, share=10.0, upload=60.0, unmask=10.0),
        )
        with local_coordinator(tmp_path / "coord") as coord:
            res = run_simulation(cfg, tiny_bundle_dir, tmp_path / "out", coord)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(nodes) == 2
    assert {d["node"] for d in res.devices} == nodes  # both nodes ran devices
    assert sorted(d["index"] for d in res.devices) == list(range(cfg.devices))
    committed = [r for r in res.rounds if r["kind"] == "train" and r["outcome"] == "committed"]
    assert committed, [(r["outcome"], r.get("failure"), r["selected"], r["reported"]) for r in res.rounds]
    assert committed[0]["stage_seconds"].get("masked_input") is not None
    assert res.seconds < cfg.max_minutes * 60 - 30  # the stop flag ended the workers, not their timer


def test_the_quick_profile_starts_when_its_rounds_can_fill() -> None:
    """--quick at the default 23:00 found 8 eligible devices for a selection of 8 (every other
    round failed); from 01:00 there are twice that many, and a start that cannot fill rounds
    back to back is said before the run."""
    from dataclasses import replace

    from simulator.config import quick
    from simulator.fleet import availability_note

    cfg = quick(SimConfig())
    assert (cfg.devices, cfg.per_round, cfg.rounds) == (30, 6, 8)
    assert availability_note(cfg, range(cfg.devices)) is None
    note = availability_note(replace(cfg, start_hour=23.0), range(cfg.devices))
    assert note is not None and "8 of 30 devices are eligible" in note and "--start-hour" in note


def test_the_verdict_separates_a_lift_from_noise() -> None:
    from model_export.evaluate import MessageHits
    from simulator.cli import verdict

    rng = np.random.default_rng(0)
    words = rng.integers(5, 15, 2000)
    before = rng.binomial(words, 0.17)

    def run(after: np.ndarray) -> dict[int, dict[str, Any]]:
        return {
            0: {"per_message": MessageHits(words, before, before), "ppl_piece": 80.0},
            8: {"per_message": MessageHits(words, after, after), "ppl_piece": 75.0},
        }

    lifted = verdict(run(np.minimum(before + rng.binomial(1, 0.5, 2000), words)))
    assert lifted is not None and lifted.startswith("federated training improved")
    assert "perplexity/piece 80.0 -> 75.0" in lifted
    same = verdict(run(before))
    assert same is not None and same.startswith("no lift beyond the noise")
    worse = verdict(run(np.maximum(before - rng.binomial(1, 0.5, 2000), 0)))
    assert worse is not None and "worse" in worse


def test_population_defaults_and_flags() -> None:
    """--population takes 100 reports per round and 12 rounds unless told otherwise, with
    deadlines sized for 130 devices training at once; other runs (the demo) 30 and 15; --quick and
    explicit flags win."""
    from fedkeys.cli import build_parser
    from simulator.cli import SimError, _config

    def cfg(*flags: str) -> SimConfig:
        return _config(build_parser().parse_args(["simulate", *flags]))  # type: ignore[no-any-return]

    pop = cfg("--population")
    assert (pop.per_round, pop.rounds, pop.population) == (100, 12, True)
    assert pop.deadlines.upload >= 120 and pop.deadlines.advertise >= 10
    assert pop.local_epochs == LOCAL_EPOCHS
    assert (cfg("--population", "--per-round", "20", "--rounds", "3").per_round, 3) == (20, 3)
    assert (cfg().devices, cfg().per_round, cfg().rounds) == (300, 30, 15)
    assert (cfg("--quick").per_round, cfg("--quick", "--rounds", "4").rounds) == (6, 4)
    assert (cfg("--quick").local_steps, cfg("--quick").server_lr) == (10, 1e-3)  # as measured
    assert cfg("--local-epochs", "0").local_epochs is None and cfg("--local-epochs", "3").local_epochs == 3
    with pytest.raises(SimError, match="--local-epochs"):
        cfg("--local-epochs", "-1")
    tuned = cfg("--population", "--server-lr", "0.02", "--client-lr", "0.05")
    assert (tuned.server_lr, tuned.client_lr) == (0.02, 0.05) and pop.server_lr > cfg().server_lr
    cosine = cfg("--population", "--rounds", "40", "--server-schedule", "cosine").task_config()
    assert (cosine.server_optimizer.schedule, cosine.schedule_rounds) == ("cosine", 40)
    assert pop.task_config().schedule_rounds is None  # constant
    for bad in (["--server-lr", "0"], ["--client-lr", "-0.1"], ["--server-lr", "nan"]):
        with pytest.raises(SimError, match=bad[0]):
            cfg(*bad)
    assert (pop.codec.weight_cap, cfg().codec.weight_cap) == (128, 16)
    assert cfg("--population", "--weight-cap", "64").codec.weight_cap == 64
    for bad in (["--weight-cap", "0"], ["--keep-fraction", "2"]):  # one line, not a traceback
        with pytest.raises(SimError, match=bad[0]):
            cfg(*bad)
    # settings the coordinator would refuse: 390 selected devices' weights overflow a 32-bit ring
    with pytest.raises(SimError, match="ring bits"):
        cfg("--devices", "400", "--per-round", "300", "--weight-cap", str(1 << 24))
    # a long run's simulated day stretches so that its rounds stay within the night
    assert cfg("--population").day_seconds < cfg("--population", "--rounds", "40").day_seconds == 24000
    assert cfg("--population", "--rounds", "40", "--day-seconds", "900").day_seconds == 900
    with pytest.raises(SimError, match="--no-float32"):
        cfg("--population", "--no-float32")
    assert cfg("--population", "--compare", "--no-float32").population


def test_a_privacy_sweep_is_checked_as_the_runs_it_makes() -> None:
    """`--privacy-sweep` (at the demo's size and with --population's example weights) passes the
    task check of its runs, which weigh devices equally and carry each epsilon; the check once
    ran on the sweep's base configuration, which has neither, and refused every sweep."""
    from fedkeys.cli import build_parser
    from simulator.cli import _config

    def cfg(*flags: str) -> SimConfig:
        return _config(build_parser().parse_args(["simulate", *flags]))  # type: ignore[no-any-return]

    for flags in (
        ["--privacy-sweep", "8,inf"],
        ["--population", "--per-round", "200", "--privacy-sweep", "1,8,inf"],
    ):
        base = cfg(*flags)
        runs = [base.privacy_run(e) for e in (1.0, float("inf"))]
        assert [r.codec.weight_cap for r in runs] == [1, 1]
        assert (runs[0].privacy, runs[0].target_epsilon, runs[0].name) == (
            "distributed",
            1.0,
            "distributed-eps1",
        )
        assert (runs[1].privacy, runs[1].target_epsilon, runs[1].name) == ("off", None, "non-private")
        assert all(r.task_config().clients_per_round == base.per_round for r in runs)


@pytest.mark.slow
def test_a_population_privacy_sweep_from_the_command_line(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """`fedkeys simulate --population --privacy-sweep 8,inf` runs both tasks to the end and
    reports each epsilon: the sweep's base configuration (privacy on, no epsilon, the
    population's example weights) is never sent as a task (it was, twice: by the settings
    check and by the availability note, and the command ended in exit 2 or a traceback)."""
    corpus = chat_corpus(tmp_path / "chat.jsonl", counts=[150] * 11 + [5] * 11 + [1])
    out = tmp_path / "sweep"
    code = _simulate(
        [
            *("--population", "--corpus", str(corpus), "--bundle", str(tiny_bundle_dir)),
            *("--out", str(out), "--per-round", "3", "--rounds", "1", "--local-steps", str(CAP)),
            *("--min-examples", "5", "--start-hour", "2", "--day-seconds", "3600", "--dropout", "0"),
            *("--eval-every", "2", "--eval-messages", "40", "--workers", "2"),
            *("--privacy-sweep", "8,inf"),
        ]
    )
    assert code == 0
    (summary_file,) = out.glob("*/summary.json")
    rows = {r["configuration"]: r for r in json.loads(summary_file.read_text())["rows"]}
    assert 0 < float(rows["distributed-eps8"]["epsilon"]) <= 8.0
    assert float(rows["non-private"]["epsilon"]) == math.inf
    assert all(int(rows[name]["rounds"]) >= 1 for name in ("distributed-eps8", "non-private"))
