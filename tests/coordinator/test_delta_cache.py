"""Weight deltas: only from the last few versions before the one asked for, and a bounded,
least-recently-served on-disk cache whose evictions never break a download in progress."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.services.storage import ArtifactStore
from edge_client.transport import ApiError, ArraySink, Transport
from edge_client.weights_cache import WeightsCache
from protocol.delta import xor_undelta
from protocol.wire import RoundPlan
from tests.coordinator.test_api import bundle_with_weights, enroll
from tests.coordinator.test_rounds import setup_task, task_config
from tests.servers import start_server, stop_server

D = 20_000


def _store(tmp_path: Path, versions: int) -> tuple[ArtifactStore, list[np.ndarray], list[str]]:
    store = ArtifactStore(tmp_path / "data")
    rng = np.random.default_rng(0)
    w = rng.standard_normal(D).astype(np.float32)
    vecs, files = [], []
    for v in range(versions):
        w = w.copy()
        w[rng.integers(0, D, D // 20)] += np.float32(1e-3)
        vecs.append(w)
        files.append(store.save_weights("kb", v, w)[0])
    return store, vecs, files


def _on_disk(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in (store.root / "weights").glob("*/*.xdelta"))


def test_the_cache_keeps_at_most_its_bound_evicting_the_least_recently_served(tmp_path: Path) -> None:
    store, vecs, files = _store(tmp_path, 8)

    def serve(v: int, b: int, max_files: int = 3, max_bytes: int = 1 << 30) -> bytes:
        d = store.open_delta("kb", v, b, files[v], files[b], max_files=max_files, max_bytes=max_bytes)
        with d.file:
            data = d.file.read()
        assert len(data) == d.size and hashlib.sha256(data).hexdigest() == d.sha256
        assert np.array_equal(xor_undelta(data, vecs[b]), vecs[v])
        time.sleep(0.02)  # distinct mtimes (the order the cache evicts by)
        return data

    for v in range(1, 8):
        for b in range(v):
            serve(v, b)
            assert len(_on_disk(store)) <= 3
    assert _on_disk(store) == ["v7-from-v4.xdelta", "v7-from-v5.xdelta", "v7-from-v6.xdelta"]
    serve(7, 4)  # served again: now the most recent
    serve(6, 5)
    assert _on_disk(store) == ["v6-from-v5.xdelta", "v7-from-v4.xdelta", "v7-from-v6.xdelta"]
    size = (store.root / "weights" / "kb" / "v6-from-v5.xdelta").stat().st_size
    serve(5, 4, max_bytes=2 * size + size // 2)  # the byte bound: about two deltas
    assert _on_disk(store) == ["v5-from-v4.xdelta", "v6-from-v5.xdelta"]  # v7-from-v4 was older


def test_eviction_never_breaks_a_download_in_progress(tmp_path: Path) -> None:
    store, vecs, files = _store(tmp_path, 6)
    streaming = store.open_delta("kb", 5, 4, files[5], files[4], max_files=1, max_bytes=1 << 30)
    first = streaming.file.read(100)
    for b in range(4):  # other requests (or workers) fill the cache and evict the streaming file
        store.open_delta("kb", 5, b, files[5], files[b], max_files=1, max_bytes=1 << 30).file.close()
    assert "v5-from-v4.xdelta" not in _on_disk(store)
    with streaming.file:
        data = first + streaming.file.read()
    assert len(data) == streaming.size and np.array_equal(xor_undelta(data, vecs[4]), vecs[5])
    # a temporary file left by a crashed write goes once it is old; a fresh one (a write in
    # progress in another worker) stays
    stale, fresh = (
        store.root / "weights" / "kb" / ".v3-from-v2.xdelta.abc",
        store.root / "weights" / "kb" / ".v3-from-v1.xdelta.def",
    )
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store.evict_deltas(max_files=1, max_bytes=1 << 30)
    assert not stale.exists() and fresh.exists()


def _plan(version: int, w: np.ndarray) -> RoundPlan:
    sha = hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()
    return RoundPlan.model_validate(
        {
            "round_id": version + 1,
            "task": "kb",
            "kind": "train",
            "model_version": version,
            "bundle": {"url": "/b", "sha256": "0" * 64, "size": 1},
            "weights": {"url": f"/v1/tasks/kb/versions/{version}/weights", "sha256": sha, "size": w.nbytes},
            "layout_hash": "x",
            "stage_deadline": time.time() + 60,
        }
    )


@pytest.mark.slow
def test_only_recent_bases_get_a_delta_and_devices_fall_back(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    server = start_server(
        tmp_path,
        f"sqlite:///{tmp_path / 'c.db'}",
        extra_env={"FEDKEYS_DELTA_MAX_BASE_AGE": "2", "FEDKEYS_DELTA_CACHE_MAX_FILES": "2"},
    )
    try:
        w0 = setup_task(server, tiny_bundle_dir.with_suffix(".tar"), task_config())
        w1 = w0.copy()
        w1[: w0.size // 10] += np.float32(1e-3)
        tar = bundle_with_weights(tiny_bundle_dir, w1, tmp_path / "v1.tar")
        with server.admin() as a:
            assert a.post("/v1/admin/tasks/kb/bundle", content=tar.read_bytes()).status_code == 201
            for v in (0, 1, 0, 1):  # versions 2..5 alternate between w0 and w1
                assert a.post("/v1/admin/tasks/kb/rollback", json={"version": v}).status_code == 200
        weights = {v: (w0 if v % 2 == 0 else w1) for v in range(6)}
        _, token = enroll(server)
        with server.client(token) as c:
            for base in (4, 3):
                r = c.get("/v1/tasks/kb/versions/5/weights", params={"base": base})
                assert r.status_code == 200, r.text
                assert np.array_equal(xor_undelta(r.content, weights[base]), w1)
            etag = r.headers["etag"]
            cached = c.get(
                "/v1/tasks/kb/versions/5/weights", params={"base": 3}, headers={"If-None-Match": etag}
            )
            assert cached.status_code == 304
            for base in (2, 0, 6, 99):
                r = c.get("/v1/tasks/kb/versions/5/weights", params={"base": base})
                assert r.status_code == 410 and "whole vector" in r.json()["detail"], (base, r.text)
            for v in range(1, 6):  # every pair a device may ask for
                for base in (v - 1, v - 2):
                    if base >= 0:
                        assert (
                            c.get(f"/v1/tasks/kb/versions/{v}/weights", params={"base": base}).status_code
                            == 200
                        )
                        assert len(list((server.data_dir / "weights" / "kb").glob("*.xdelta"))) <= 2
        # a device holding a version too old for a delta gets the whole vector
        t = Transport(server.url, ca=server.ca, token=token, retries=0)
        with pytest.raises(ApiError) as e:
            t.download_to("/v1/tasks/kb/versions/5/weights", ArraySink(w1.nbytes), params={"base": 0})
        assert e.value.status == 410
        cache = WeightsCache()
        assert np.array_equal(cache.get(t, _plan(0, w0)), w0)
        assert np.array_equal(cache.get(t, _plan(5, w1)), w1)
    finally:
        stop_server(server)
