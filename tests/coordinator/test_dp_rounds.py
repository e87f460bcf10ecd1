"""Differentially private rounds against a real coordinator: the committed model carries noise
of the configured scale in both modes, epsilon is reported in the admin API and /metrics, and
an exhausted budget stops the task with a clear reason."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.dp_plan import RoundCharge, epsilon_spent
from protocol.codec import CodecParams, kept_count, padded_dim, quant_range
from protocol.dp import level_sensitivity
from tests.coordinator.scripted import run_devices
from tests.coordinator.test_rounds import make_devices, setup_task, task_config, wait_round, wait_task
from tests.servers import Server

pytestmark = pytest.mark.slow

Z, DELTA, POPULATION = 0.7, 1e-5, 50
CLIP, BITS, KEEP = 1.0, 10, 0.5


def dp_config(mode: str, **privacy: Any) -> dict[str, Any]:
    return task_config(
        clients_per_round=4,
        over_selection=1.25,
        min_reports=3,
        codec={"clip_norm": CLIP, "bits": BITS, "keep_fraction": KEEP, "weight_cap": 1},
        eligibility={"min_examples": 1},
        privacy={"mode": mode, "noise_multiplier": Z, "delta": DELTA, "population": POPULATION, **privacy},
        max_rounds=3,
    )


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_dp_round_has_the_configured_noise_and_the_budget_stops_the_task(
    server: Server, tiny_bundle_dir: Path, mode: str
) -> None:
    one_round = epsilon_spent([RoundCharge(5 / POPULATION, Z)], DELTA)
    cfg = dp_config(mode, target_epsilon=one_round * 1.01)  # room for one round, not two
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 5)
    for dv in devs:
        dv.examples = 50
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd
    included = [dv for dv in devs if dv.uploaded]
    n = len(included)
    assert rnd["reported"] == n >= 3
    w1 = np.fromfile(server.data_dir / "weights" / "kb" / "v1.f32", dtype="<f4").astype(np.float64)
    mean = np.mean([dv.delta.astype(np.float64) for dv in included], axis=0)  # norms < C: unclipped
    resid = w1 - (w0 + mean)

    # the expected noise, from first principles: sensitivity in levels, multiplier, survivors
    d = w0.size
    params = CodecParams(
        clip_norm=CLIP, bits=BITS, keep_fraction=KEEP, max_clients=5, seed=b"s" * 32, weight_cap=1
    )
    m, big_d = kept_count(params, d), padded_dim(params, d)
    # the task's default adjacency, replace-one: twice one device's bound
    sens = level_sensitivity(CLIP, BITS, quant_range(params, d), m, adjacency="replace-one")
    total_levels = Z * sens * (math.sqrt(n / 3) if mode == "distributed" else 1.0)
    level = 2 * quant_range(params, d) / ((1 << BITS) - 1)
    # kept coordinates carry total_levels; scaled by D/m, divided by n, spread by the rotation
    per_coord = total_levels * level * (big_d / m) / n * math.sqrt(m / big_d)
    assert abs(resid.std() / per_coord - 1) < 0.1, (resid.std(), per_coord)
    assert rnd["metrics"]["dp"]["mode"] == mode

    # one round spent the budget: the next one is refused and the task says why
    task = wait_task(server, lambda t: t["status"] == "paused")
    assert "privacy budget exhausted" in task["status_reason"]
    priv = task["privacy"]
    assert priv["rounds_charged"] == 1
    assert priv["epsilon_spent"] == pytest.approx(one_round, rel=1e-6)
    assert priv["exhausted"] and priv["epsilon_after_next_round"] > priv["target_epsilon"]
    with server.admin() as admin:
        r = admin.post("/v1/admin/tasks/kb/start")
        assert r.status_code == 409 and "privacy budget exhausted" in r.text
        metrics = admin.get("/metrics").text
    assert f'fedkeys_privacy_epsilon_spent{{task="kb"}} {one_round}' in metrics or (
        'fedkeys_privacy_epsilon_spent{task="kb"}' in metrics
    )
    line = next(x for x in metrics.splitlines() if x.startswith('fedkeys_privacy_epsilon_spent{task="kb"}'))
    assert float(line.split()[-1]) == pytest.approx(one_round, rel=1e-6)


def test_adaptive_clipping_moves_the_clip_towards_the_quantile(
    sqlite_server: Server, tiny_bundle_dir: Path
) -> None:
    server = sqlite_server
    # every device's norm (about 0.5) is within C = 1: the noisy unclipped fraction is near 1
    # and the clip shrinks by about exp(-0.2 * (1 - 0.5))
    cfg = dp_config("distributed", adaptive_clip=True, count_noise=2.0)
    w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), cfg)
    devs = make_devices(server, w0, 5)
    for dv in devs:
        dv.examples = 50
    run_devices(devs)
    rnd = wait_round(server)
    assert rnd["outcome"] == "committed", rnd
    dp = rnd["metrics"]["dp"]
    n = rnd["reported"]
    # count noise of std 2 over n devices: the fraction is within 5 sigma of 1
    assert abs(dp["unclipped_fraction"] - 1.0) < 5 * 2.0 / n
    assert dp["next_clip_norm"] == pytest.approx(
        CLIP * math.exp(-0.2 * (min(1.0, dp["unclipped_fraction"]) - 0.5))
    )
    # the next round opens with the moved clip
    end = time.time() + 20
    with server.admin() as admin:
        while time.time() < end:
            rounds = admin.get("/v1/admin/tasks/kb/rounds").json()
            if len(rounds) >= 2:
                break
            time.sleep(0.3)
    latest = max(rounds, key=lambda r: r["number"])
    assert latest["number"] == 2
    assert latest["metrics"]["dp"]["clip_norm"] == pytest.approx(dp["next_clip_norm"])


def test_privacy_settings_no_round_could_honour_are_refused(sqlite_server: Server) -> None:
    cfg = dp_config("central", adaptive_clip=True, count_noise=0.1)  # count noise below z
    with sqlite_server.admin() as admin:
        r = admin.post("/v1/admin/tasks", json={"name": "kb", "config": cfg})
        assert r.status_code == 422 and "clip-count noise" in r.json()["detail"]
        assert admin.get("/v1/admin/tasks/kb").status_code == 404  # nothing created
