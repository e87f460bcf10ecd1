"""Hostile devices and a hostile network (issue 17): a hostile device plays one misbehaviour per
round against a real coordinator over TLS, with three real honest agents (ExecuTorch training)
around it, on SQLite and PostgreSQL. For each misbehaviour the round commits without the
hostile device's input (the new model is the old one plus the exact mean of the honest
survivors' encodings) or fails cleanly with a reason, and the next round opens; every honest
agent keeps running; no response is a 5xx; 1 GB bodies to every route grow the coordinator's RSS
by less than 50 MB. See tests/coordinator/hostile.py for the misbehaviours.

A hostile input that looks like a valid encoding (``saturated_input``) cannot be told from one
under secure aggregation: it stays in the sum, and the test checks what bounds it (the
aggregate's norm check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.coordinator.hostile import MISBEHAVIOURS
from tests.coordinator.hostile_scenario import ScenarioConfig, describe, honest_texts, run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts() -> list[list[str]]:
    return honest_texts(3)


def test_hostile_device_in_real_rounds(
    db_url: str, tmp_path: Path, tiny_bundle_dir: Path, texts: list[list[str]]
) -> None:
    names = MISBEHAVIOURS
    result = run_scenario(tmp_path, db_url, tiny_bundle_dir, texts, ScenarioConfig(misbehaviours=names))
    report = describe(result)
    assert [r.misbehaviour for r in result.rounds] == list(names), report
    assert not result.problems, report
    # the agents took part throughout (the falsely accused one lost its round)
    assert all(n >= len(names) - 2 for n in result.agent_rounds_completed), report
    bodies = next(r for r in result.rounds if r.misbehaviour == "huge_bodies")
    assert bodies.extra["rss"]["requests"] >= 60, report  # every route, two framings
