"""The device's cache of global weight vectors: streamed downloads, files on disk, XOR deltas."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_client.errors import Aborted
from edge_client.transport import Transport
from edge_client.weights_cache import WeightsCache
from protocol.delta import xor_delta
from protocol.wire import RoundPlan

D = 50_000


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def sha(v: np.ndarray) -> str:
    return hashlib.sha256(v.astype("<f4").tobytes()).hexdigest()


def plan(version: int, v: np.ndarray) -> RoundPlan:
    ref = {"url": f"/v1/weights/{version}", "sha256": sha(v), "size": 4 * v.shape[0]}
    return RoundPlan.model_validate(
        {
            "round_id": version,
            "task": "t",
            "kind": "train",
            "model_version": version,
            "bundle": {"url": "/b", "sha256": "0" * 64, "size": 1},
            "weights": ref,
            "layout_hash": "x",
            "stage_deadline": time.time() + 60,
        }
    )


class Server:
    """Serves weight versions (and XOR deltas against a held base), counting requests."""

    def __init__(self, versions: dict[int, np.ndarray]) -> None:
        self.versions = versions
        self.requests: list[httpx.Request] = []
        self.corrupt = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        v = self.versions[int(request.url.path.rsplit("/", 1)[1])]
        base = request.url.params.get("base")
        if base is not None:
            return httpx.Response(200, content=xor_delta(v, self.versions[int(base)]))
        body = bytearray(v.astype("<f4").tobytes())
        if self.corrupt:
            body[0] ^= 1
        return httpx.Response(200, content=bytes(body))

    def transport(self) -> Transport:
        return Transport("https://coord", token="t", transport=httpx.MockTransport(self))


def test_disk_cache_streams_to_a_file_and_maps_it_read_only(tmp_path: Path) -> None:
    v1 = vec(1)
    srv = Server({1: v1})
    cache = WeightsCache(directory=tmp_path / "w")
    got = cache.get(srv.transport(), plan(1, v1))
    np.testing.assert_array_equal(got, v1)
    assert not got.flags.writeable
    assert [f.name for f in (tmp_path / "w").iterdir()] == [f"v1-{sha(v1)}.f32"]
    assert cache.get(srv.transport(), plan(1, v1)) is got  # held: no second download
    # a restarted device finds the vector on disk
    again = WeightsCache(directory=tmp_path / "w").get(srv.transport(), plan(1, v1))
    np.testing.assert_array_equal(again, v1)
    assert len(srv.requests) == 1


def test_disk_cache_refetches_a_corrupt_file_and_refuses_a_wrong_download(tmp_path: Path) -> None:
    v1 = vec(1)
    srv = Server({1: v1})
    WeightsCache(directory=tmp_path / "w").get(srv.transport(), plan(1, v1))
    f = tmp_path / "w" / f"v1-{sha(v1)}.f32"
    f.write_bytes(b"\0" * f.stat().st_size)
    got = WeightsCache(directory=tmp_path / "w").get(srv.transport(), plan(1, v1))
    np.testing.assert_array_equal(got, v1)
    assert len(srv.requests) == 2
    srv.corrupt = True
    with pytest.raises(Aborted, match="sha256"):
        WeightsCache(directory=tmp_path / "x").get(srv.transport(), plan(1, v1))
    assert list((tmp_path / "x").iterdir()) == []  # no partial file left behind


@pytest.mark.parametrize("on_disk", [True, False])
def test_newer_version_comes_as_a_delta_and_old_ones_are_evicted(tmp_path: Path, on_disk: bool) -> None:
    v1, v2 = vec(1), vec(1) + np.float32(1e-3) * vec(2)
    srv = Server({1: v1, 2: v2})
    cache = WeightsCache(max_items=1, directory=tmp_path / "w" if on_disk else None)
    cache.get(srv.transport(), plan(1, v1))
    got = cache.get(srv.transport(), plan(2, v2))
    np.testing.assert_array_equal(got, v2)
    assert not got.flags.writeable
    assert srv.requests[-1].url.params.get("base") == "1"
    if on_disk:
        assert [f.name for f in (tmp_path / "w").iterdir()] == [f"v2-{sha(v2)}.f32"]


def test_memory_cache_refuses_a_longer_download_than_announced() -> None:
    v1 = vec(1)
    srv = Server({1: v1})
    p = plan(1, v1)
    short = p.model_copy(update={"weights": p.weights.model_copy(update={"size": 8})})
    with pytest.raises(Aborted, match="larger"):
        WeightsCache().get(srv.transport(), short)


def test_without_deltas_a_newer_version_is_downloaded_whole(tmp_path: Path) -> None:
    v1, v2 = vec(1), vec(2)
    srv = Server({1: v1, 2: v2})
    cache = WeightsCache(directory=tmp_path / "w", deltas=False)
    cache.get(srv.transport(), plan(1, v1))
    np.testing.assert_array_equal(cache.get(srv.transport(), plan(2, v2)), v2)
    assert [r.url.params.get("base") for r in srv.requests] == [None, None]


@pytest.mark.parametrize("directory", [True, False])
def test_a_new_device_starts_from_the_bundles_weights(tmp_path: Path, directory: bool) -> None:
    v0 = vec(0)
    v3 = (v0 + np.float32(1e-3) * vec(3)).astype(np.float32)
    srv = Server({0: v0, 3: v3})
    d = tmp_path / "w" if directory else None
    # still at the bundle's version: nothing to download
    cache = WeightsCache(directory=d)
    np.testing.assert_array_equal(cache.get(srv.transport(), plan(0, v0), lambda: (0, v0.copy())), v0)
    assert srv.requests == []
    # later versions: a delta from the bundle's weights, not the whole vector
    fresh = WeightsCache(directory=tmp_path / "w2" if directory else None)
    got = fresh.get(srv.transport(), plan(3, v3), lambda: (0, v0.copy()))
    np.testing.assert_array_equal(got, v3)
    assert [r.url.params.get("base") for r in srv.requests] == ["0"]
    # bundle weights of another shape (or a newer version than the plan's) are not used
    other = WeightsCache(directory=tmp_path / "w3" if directory else None)
    got = other.get(srv.transport(), plan(3, v3), lambda: (0, v0[:10].copy()))
    np.testing.assert_array_equal(got, v3)
    assert srv.requests[-1].url.params.get("base") is None
