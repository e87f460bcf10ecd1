"""A small fleet end to end (tiny model, TLS, secure aggregation and compression), the
availability traces, and the report files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.schemas import DeadlineSettings
from edge_client.records import RoundRecord
from simulator.availability import AvailabilityModel, DeviceTrace, FleetClock, eligible_fraction
from simulator.config import SIM_CODEC, SimConfig
from simulator.report import write_report
from simulator.run import local_coordinator, run_simulation


def test_traces_are_deterministic_per_seed_with_a_day_night_swing() -> None:
    a = [DeviceTrace(7, i) for i in range(300)]
    b = [DeviceTrace(7, i) for i in range(300)]
    hours = [h * 3600 + 2 * 86400 for h in range(24)]
    fa = [eligible_fraction(a, t) for t in hours]
    assert fa == [eligible_fraction(b, t) for t in hours]
    assert fa != [eligible_fraction([DeviceTrace(8, i) for i in range(300)], t) for t in hours]
    night, day = max(fa), min(fa)
    assert 2.5 < night / day < 8  # production fleets: about 4x
    assert fa.index(night) in range(0, 7) or fa.index(night) >= 22  # peak at night
    assert AvailabilityModel().night_coverage > 0.5


def test_clock_compression() -> None:
    c = FleetClock(day_seconds=240, start_hour=21.0, t0=1000.0)
    assert c.hour(1000.0) == pytest.approx(21.0)
    assert c.hour(1000.0 + 60) == pytest.approx(3.0)  # a quarter of a day later
    assert c.real_seconds(3600) == pytest.approx(10.0)


def test_large_fleets_get_more_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulator import run

    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert [run.default_workers(n) for n in (10, 100, 256, 257, 1000)] == [2, 2, 2, 3, 8]
    # the demo's night: 30 rounds of ~20 s from 22:00 end before the morning
    clock = FleetClock(SimConfig().day_seconds, SimConfig().start_hour, 0.0)
    assert 3.0 < clock.hour(30 * 20.0) < 6.0


def _small(**over: Any) -> SimConfig:
    base = SimConfig(
        name="tiny",
        devices=8,
        per_round=3,
        rounds=2,
        min_reports=3,  # a secure sum needs at least three
        over_selection=1.34,
        eval_every=1,
        eval_messages=20,
        local_steps=2,
        day_seconds=600.0,  # the test stays within the simulated night (devices eligible)
        start_hour=1.0,
        dropout=0.1,
        workers=2,
        codec=SIM_CODEC.model_copy(update={"keep_fraction": 0.25, "bits": 6}),
        max_minutes=8,
        deadlines=DeadlineSettings(selection=4.0, advertise=5.0, share=5.0, upload=20.0, unmask=6.0),
    )
    return replace(base, **over)


@pytest.mark.slow
def test_small_fleet_end_to_end(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    cfg = _small()
    with local_coordinator(tmp_path / "coord") as coord:
        res = run_simulation(cfg, tiny_bundle_dir, tmp_path / "out", coord)
    train = [r for r in res.rounds if r["kind"] == "train"]
    assert len(train) >= 2
    for r in train:
        assert r["outcome"] in ("committed", "failed")
        if r["outcome"] == "committed":
            assert r["reported"] >= 2 and r["new_version"] >= 1
            assert r["stage_seconds"].get("masked_input") is not None  # secure aggregation ran
    committed = [r for r in train if r["outcome"] == "committed"]
    assert committed, train
    assert any(r.get("bytes_up_per_device", 0) > 0 for r in committed)
    # a device that did every stage stamped each step, in protocol order
    order = ("start", "plan", "advertised", "shared", "weights", "trained", "uploaded", "unmasked", "done")
    done = [d_r.marks for d in res.devices for d_r in d["rounds"] if d_r.completed]
    assert done
    for marks in done:
        assert list(marks) == list(order) and sorted(marks.values()) == list(marks.values())
    assert 0 in res.evals and max(res.evals) >= 1
    assert 0 <= res.final["top1"] <= 1
    s = res.summary()
    assert s["rounds_committed"] == len(committed)
    for f in ("rounds.json", "rounds.csv", "summary.json", "evals.json"):
        assert (tmp_path / "out" / "tiny" / f).stat().st_size > 0
    page = write_report(
        [res],
        tmp_path / "report",
        summary_rows=[s],
        baselines={"pretrained": res.evals[0]["top1"]},
        title="test",
    )
    assert page.exists() and "<table>" in page.read_text()
    pngs = list((tmp_path / "report").glob("*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 5000 for p in pngs)  # non-empty plots


@pytest.mark.slow
def test_small_fleet_on_a_local_ray(
    tmp_path: Path, tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fleet as Ray tasks on a single-node Ray started by the simulator: a Ray of its
    own, whatever cluster the machine knows of (ray.init without an address joined the last one
    started here: in `make test`, the two-node cluster of another test, which then shut down
    and left this one waiting for its GCS; the environment's address is such a stale one)."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there

    # Ray's workers start slowly on a busy machine: a slow simulated clock (it stays night, when
    # devices are eligible), a longer selection window and a few rounds, one of which must commit.
    cfg = _small(
        name="ray",
        devices=6,
        rounds=4,
        dropout=0.0,
        day_seconds=3600.0,
        ray_address="local",
        deadlines=DeadlineSettings(selection=20.0, advertise=10.0, share=10.0, upload=60.0, unmask=10.0),
    )
    try:
        with local_coordinator(tmp_path / "coord") as coord:
            res = run_simulation(cfg, tiny_bundle_dir, tmp_path / "out", coord)
        assert ray.is_initialized()  # the fleet really ran on Ray
    finally:
        ray.shutdown()
    committed = [r for r in res.rounds if r["kind"] == "train" and r["outcome"] == "committed"]
    assert committed, [(r["outcome"], r["failure"], r["selected"], r["reported"]) for r in res.rounds]
    assert committed[0]["stage_seconds"].get("masked_input") is not None
    assert {d["index"] for d in res.devices} == set(range(6))  # every device reported back
    assert any(d["bytes_up"] > 0 for d in res.devices)


@pytest.mark.slow
def test_privacy_sweep_reports_epsilon_and_accuracy(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """Distributed DP with secure aggregation end to end, then the same fleet without noise:
    the table carries the spent epsilon and the plot is drawn."""
    from simulator.compare import privacy_sweep

    cfg = _small(privacy="distributed", adaptive_clip=True, dropout=0.0)
    with local_coordinator(tmp_path / "coord") as coord:
        runs, rows, baselines = privacy_sweep(
            cfg, tiny_bundle_dir, tmp_path / "out", coord, [8.0, float("inf")]
        )
    private, free = runs
    assert private.privacy is not None and free.privacy is None
    committed = [r for r in private.rounds if r["kind"] == "train" and r["outcome"] == "committed"]
    assert committed, private.rounds
    assert committed[0]["stage_seconds"].get("masked_input") is not None  # secure aggregation ran
    assert committed[0]["dp"]["mode"] == "distributed" and "next_clip_norm" in committed[0]["dp"]
    eps_row = next(r for r in rows if r["configuration"] == "distributed-eps8")
    assert 0 < eps_row["epsilon"] <= 8.0
    assert eps_row["epsilon"] == pytest.approx(private.privacy["epsilon_spent"])
    assert next(r for r in rows if r["configuration"] == "non-private")["epsilon"] == float("inf")
    page = write_report(
        runs, tmp_path / "report", summary_rows=rows, baselines=baselines, title="dp", privacy_rows=rows
    )
    assert "epsilon" in page.read_text()
    assert (tmp_path / "report" / "privacy.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "argv",
    [
        ["--privacy-sweep", "1,x"],
        ["--privacy-sweep", "0,inf"],
        ["--privacy-sweep", "8", "--privacy", "off"],
        ["--privacy", "central"],  # neither a target nor a multiplier
        ["--selection-compare", "random,best"],
        ["--coordinator", "https://127.0.0.1:1"],  # without --ca
    ],
)
def test_simulate_refuses_bad_flags_before_building_anything(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulator.cli
    from fedkeys.cli import main

    def no_build(path: Path) -> Path:
        raise AssertionError("arguments must be checked before the bundle is built")

    monkeypatch.setattr(simulator.cli, "_bundle", no_build)
    assert main(["simulate", "--bundle", "/nonexistent/bundle", *argv]) == 2
    err = capsys.readouterr().err
    assert any(word in err for word in ("privacy", "selection", "--ca")), err


@pytest.mark.slow
def test_central_dp_with_secure_aggregation_in_the_simulator(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    from simulator.compare import privacy_sweep

    cfg = _small(privacy="central", dropout=0.0)
    with local_coordinator(tmp_path / "coord") as coord:
        runs, _, _ = privacy_sweep(cfg, tiny_bundle_dir, tmp_path / "out", coord, [8.0])
    (run,) = runs
    committed = [r for r in run.rounds if r["kind"] == "train" and r["outcome"] == "committed"]
    assert committed and committed[0]["dp"]["mode"] == "central"
    assert committed[0]["stage_seconds"].get("masked_input") is not None
    assert run.privacy is not None and 0 < run.privacy["epsilon_spent"] <= 8.0
    assert run.privacy["rounds_charged"] == len(committed)


def test_time_to_target_and_participation_from_records() -> None:
    from simulator.compare import participation, time_to_target
    from simulator.records import SimResult

    cfg = _small(day_seconds=240.0)  # 10 real seconds = 1 simulated hour
    rounds = [
        {
            "round": 1,
            "kind": "train",
            "outcome": "committed",
            "new_version": 1,
            "t": 0.0,
            "wall_seconds": 10.0,
            "device_bytes": [{"bytes_up": 1000}, {"bytes_up": 1000}],
        },
        {
            "round": 2,
            "kind": "train",
            "outcome": "failed",
            "new_version": None,
            "t": 12.0,
            "wall_seconds": 5.0,
        },
        {
            "round": 3,
            "kind": "train",
            "outcome": "committed",
            "new_version": 2,
            "t": 20.0,
            "wall_seconds": 10.0,
            "device_bytes": [{"bytes_up": 3000}],
        },
        # after the target was reached: not counted (it was, as a failed round)
        {
            "round": 4,
            "kind": "train",
            "outcome": "failed",
            "new_version": None,
            "t": 31.0,
            "wall_seconds": 5.0,
        },
    ]
    evals = {0: {"top1": 0.10}, 1: {"top1": 0.11}, 2: {"top1": 0.13}}
    devices = [
        {"rounds": [RoundRecord(1, "train", completed=True), RoundRecord(3, "train", completed=True)]},
        {"rounds": [RoundRecord(1, "train", completed=True), RoundRecord(2, "evaluate", completed=True)]},
        {"rounds": [RoundRecord(3, "train", completed=False)]},
    ]
    res = SimResult(cfg, rounds, evals, {}, devices, 1.0, Path("."))
    tt = time_to_target(res, 0.12)
    assert tt == {
        "version": 2,
        "rounds": 3,
        "sim_hours": pytest.approx(3.0),
        "upload_MB": pytest.approx(0.005),
    }
    assert time_to_target(res, 0.5)["version"] is None
    p = participation(res)
    assert p["devices_participating"] == 2 and p["max_participations"] == 2
    assert p["gini"] == pytest.approx(2 * (1 * 0 + 2 * 1 + 3 * 2) / (3 * 3) - 4 / 3)
