"""The device's own policy (issue 17.7 and 17.13): what it refuses to send whatever a plan
asks, how its metrics are rounded, and owner-only files."""

from __future__ import annotations

import io
import random
import statistics
import tarfile
from pathlib import Path

import pytest

from edge_client.datastore import DataStore
from edge_client.policy import (
    EVAL_WORDS,
    LOSS_STEP,
    DevicePolicy,
    PolicyRefusal,
    bucket_eval_counts,
    bucket_train_report,
)
from protocol.bundle import BundleError, extract_bundle
from protocol.codec import CodecParams
from protocol.wire import ArtifactRef, EvalCounts, RoundPlan, SecAggParams, TrainingPlan, TrainReport


def _plan(codec: bool, secagg: bool, kind: str = "train") -> RoundPlan:
    ref = ArtifactRef(url="/v1/x", sha256="0" * 64, size=1)
    params = (
        CodecParams(clip_norm=1.0, max_clients=10, seed=b"\x01" * 32, keep_fraction=1.0, weight_cap=1)
        if codec
        else None
    )
    sec = SecAggParams(round_id=1, vector_length=5, ring_bits=16, graph_seed=b"\x02" * 32) if secagg else None
    return RoundPlan(
        round_id=1,
        task="kb",
        kind=kind,
        model_version=0,
        bundle=ref,
        weights=ref,
        layout_hash="0" * 64,
        training=TrainingPlan(
            optimizer="sgd", lr=0.1, momentum=0.0, local_steps=1, max_seconds=1.0, max_examples=1
        ),
        codec=params,
        secagg=sec,
        stage_deadline=0.0,
    )


def test_a_real_device_refuses_plans_that_would_send_its_update_unmasked() -> None:
    strict = DevicePolicy()
    with pytest.raises(PolicyRefusal, match="float32"):
        strict.check_plan(_plan(codec=False, secagg=False))
    with pytest.raises(PolicyRefusal, match="secure aggregation"):
        strict.check_plan(_plan(codec=True, secagg=False))
    strict.check_plan(_plan(codec=True, secagg=True))
    strict.check_plan(_plan(codec=False, secagg=False, kind="evaluate"))  # no update in it
    DevicePolicy(require_secure_aggregation=False).check_plan(_plan(codec=False, secagg=False))


def test_private_training_reports_are_coarse_and_unbiased() -> None:
    rng = random.Random(1)
    report = TrainReport(loss_before=3.1337, loss_after=2.71828, examples=1234, steps=37, seconds=12.6)
    sent = [bucket_train_report(report, rng) for _ in range(4000)]
    for r in sent:
        assert r.loss_before / LOSS_STEP == round(r.loss_before / LOSS_STEP)
        assert r.loss_before in (3.0, 3.25) and r.loss_after in (2.5, 2.75)
        assert (r.examples, r.steps, r.seconds) == (1024, 32, 13.0)
    assert statistics.fmean(r.loss_before for r in sent) == pytest.approx(3.1337, abs=0.01)
    assert statistics.fmean(r.loss_after for r in sent) == pytest.approx(2.71828, abs=0.01)


def test_private_evaluation_counts_speak_for_a_fixed_number_of_words() -> None:
    rng = random.Random(2)
    counts = EvalCounts(words=37, top1=9, top3=17, loss_sum=120.0, tokens=50)
    sent = [bucket_eval_counts(counts, rng) for _ in range(4000)]
    assert {s.words for s in sent} == {EVAL_WORDS}
    assert all(s.top1 <= s.top3 <= s.words for s in sent)
    assert statistics.fmean(s.top1 for s in sent) / EVAL_WORDS == pytest.approx(9 / 37, abs=0.01)
    assert statistics.fmean(s.top3 for s in sent) / EVAL_WORDS == pytest.approx(17 / 37, abs=0.01)
    per_token = statistics.fmean(s.loss_sum / s.tokens for s in sent)
    assert per_token == pytest.approx(120.0 / 50, abs=0.01)


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../manifest.json", "./../x", "a/b", ".", "./", "manifest.json/"])
def test_bundle_tarballs_hold_flat_files_only(tmp_path: Path, name: str) -> None:
    tar = tmp_path / "b.tar"
    tar.write_bytes(_tar([(name, b"{}")]))
    with pytest.raises(BundleError, match="unexpected entry"):
        extract_bundle(tar, tmp_path / "out")


def test_bundle_tarball_entries_are_unique(tmp_path: Path) -> None:
    tar = tmp_path / "b.tar"
    tar.write_bytes(_tar([("manifest.json", b"{}"), ("./manifest.json", b"[]")]))
    with pytest.raises(BundleError, match="unexpected entry"):
        extract_bundle(tar, tmp_path / "out")


def test_the_message_store_is_owner_only_from_its_creation(tmp_path: Path) -> None:
    store = DataStore(tmp_path / "state" / "messages.db")
    store.add(["hello there"])
    assert (tmp_path / "state" / "messages.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "error",
    [
        "SecAggError",  # a roster below the floors, a neighbour's low-order key
        "DecryptionError",
        "WireError",
        "UnsafeUrl",
        "ValidationError",  # a malformed answer
    ],
)
def test_a_protocol_error_ends_the_round_never_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """Issue 17.3: only Aborted/ApiError/TransportError were caught, so a neighbour's bad
    share or key raised out of the agent's loop and ended the honest device's process."""
    import time

    import httpx
    from pydantic import BaseModel

    from edge_client import agent as agent_module
    from edge_client.agent import Agent, AgentConfig
    from edge_client.device_state import Conditions, StaticProvider
    from edge_client.transport import Transport, UnsafeUrl
    from protocol.secagg import DecryptionError, SecAggError
    from protocol.wire import WireError

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"action": "train", "round_id": 7, "task": "t"})

    class Strict(BaseModel):
        x: int

    def broken(*args: object, **kwargs: object) -> None:
        if error == "ValidationError":
            Strict.model_validate({"x": "not a number"})
        raise {
            "SecAggError": SecAggError,
            "DecryptionError": DecryptionError,
            "WireError": WireError,
            "UnsafeUrl": UnsafeUrl,
        }[error]("hostile input")

    monkeypatch.setattr(agent_module, "run_round", broken)
    store = DataStore(tmp_path / "m.db")
    store.add((f"message {i}", time.time() - 60 * i) for i in range(20))
    transport = Transport("https://coord", token="t", transport=httpx.MockTransport(answer))
    cfg = AgentConfig(coordinator="https://coord", state_dir=tmp_path / "s", min_examples=10)
    ready = Conditions(True, True, True, 90.0, 5000.0, "static")
    agent = Agent(cfg, StaticProvider(ready), store=store, transport=transport)
    assert agent.step() == (0.0, True)  # took part, left the round, still running
    record = agent.stats.rounds[-1]
    assert record.completed is False and "protocol error" in (record.reason or "")
