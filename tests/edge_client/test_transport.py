"""Transport retries and error mapping, against httpx's MockTransport (no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from edge_client.transport import (
    ApiError,
    ArraySink,
    ArtifactError,
    FileSink,
    Transport,
    TransportError,
    UnsafeUrl,
)
from protocol.wire import ArtifactRef, DeviceState, Stage


def state() -> DeviceState:
    return DeviceState(
        charging=True, idle=True, unmetered=True, battery_pct=90, free_storage_mb=100, client_version="0.1.0"
    )


def make(handler, retries: int = 4) -> tuple[Transport, list[float]]:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    t = Transport(
        "https://coord",
        token="tok",
        retries=retries,
        backoff=0.1,
        sleep=sleeps.append,
        transport=httpx.MockTransport(handler),
    )
    return t, sleeps


def test_retries_5xx_429_and_connection_errors_then_succeeds() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        assert request.headers["authorization"] == "Bearer tok"
        if calls["n"] == 1:
            raise httpx.ConnectError("refused")
        if calls["n"] == 2:
            return httpx.Response(503, json={"detail": "busy"})
        if calls["n"] == 3:
            return httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "slow down"})
        return httpx.Response(200, json={"action": "retry", "retry_after": 3.0})

    t, sleeps = make(handler)
    r = t.checkin(state())
    assert r.action == "retry" and r.retry_after == 3.0
    assert calls["n"] == 4
    assert 3.5 <= sleeps[2] <= 10.5  # honours Retry-After (with jitter)


def test_4xx_is_final_with_reason() -> None:
    t, sleeps = make(lambda r: httpx.Response(409, json={"detail": "round 3 is in stage 'unmask'"}))
    with pytest.raises(ApiError) as e:
        t.status(3)
    assert e.value.status == 409 and "unmask" in e.value.reason
    assert sleeps == []


def test_gives_up_after_retries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down")

    t, sleeps = make(handler, retries=3)
    with pytest.raises(TransportError, match="4 attempts"):
        t.plan(1)
    assert len(sleeps) == 3
    assert sleeps == sorted(sleeps) or max(sleeps) <= 2  # exponential (jittered) backoff


class Chunks(httpx.SyncByteStream):
    """A body in chunks; optionally the connection breaks after ``fail_after`` of them."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.fail_after = data, fail_after

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i, start in enumerate(range(0, len(self.data), 1000)):
            if self.fail_after is not None and i == self.fail_after:
                raise httpx.ReadError("connection reset")
            yield self.data[start : start + 1000]


def test_download_streams_into_a_file_and_restarts_it_after_a_broken_stream(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(200, stream=Chunks(data, fail_after=3 if calls["n"] == 1 else None))

    t, sleeps = make(handler)
    down: list[int] = []
    t.on_bytes = lambda d, n: down.append(n) if d == "down" else None
    sink = FileSink(tmp_path / "a" / "file.bin")
    t.download_to("/x", sink)
    assert calls["n"] == 2 and len(sleeps) == 1
    assert sink.size == len(data) and sink.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sink.commit().read_bytes() == data
    assert not sink.tmp.exists()
    assert down == [len(data)]


def test_download_errors_are_api_errors_and_leave_the_sink_alone(tmp_path: Path) -> None:
    t, _ = make(lambda r: httpx.Response(404, json={"detail": "no such version"}))
    sink = ArraySink(16)
    with pytest.raises(ApiError, match="no such version"):
        t.download_to("/x", sink)
    assert sink.size == 0
    too_long, _ = make(lambda r: httpx.Response(200, content=b"x" * 17))
    with pytest.raises(ValueError, match="larger"):
        too_long.download_to("/x", sink)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/v1/tasks/kb/versions/1/weights",
        "http://coord/v1/tasks/kb/versions/1/weights",  # same host, clear text
        "https://coord:8443/v1/x",  # another port
        "//evil.example/v1/x",  # scheme-relative
        "v1/x",  # not a path on the origin
    ],
)
def test_the_token_goes_only_to_the_configured_origin(url: str) -> None:
    """Issue 17.5: plan URLs are joined to the configured https origin; a plan that names any
    other place gets no request (and no bearer token) at all."""
    seen: list[httpx.Request] = []
    t, _ = make(lambda r: seen.append(r) or httpx.Response(200, content=b"x"))
    with pytest.raises(UnsafeUrl):
        t.download(url)
    assert seen == []


def test_paths_and_same_origin_urls_are_fetched_with_the_token() -> None:
    seen: list[httpx.Request] = []
    t, _ = make(lambda r: seen.append(r) or httpx.Response(200, content=b"x"))
    t.download("/v1/bundles/ab.tar")
    t.download("https://coord/v1/bundles/ab.tar?x=1")
    assert [str(r.url) for r in seen] == [
        "https://coord/v1/bundles/ab.tar",
        "https://coord/v1/bundles/ab.tar?x=1",
    ]
    assert all(r.headers["authorization"] == "Bearer tok" for r in seen)


def test_plain_http_coordinator_is_refused_unless_allowed() -> None:
    with pytest.raises(UnsafeUrl, match="https"):
        Transport("http://coord", token="t")
    Transport("http://127.0.0.1:8000", token="t", allow_http=True).close()


def test_file_sink_stops_at_the_declared_size(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "a.bin", limit=10)
    sink.reset()
    sink.write(b"12345")
    with pytest.raises(ValueError, match="larger"):
        sink.write(b"123456")
    sink.discard()
    assert not (tmp_path / "a.bin").exists()
    sink = FileSink(tmp_path / "d" / "b.bin", limit=10)
    sink.reset()
    sink.write(b"1")
    assert sink.tmp.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    sink.commit()


def test_fetch_checks_size_and_sha256_into_either_sink(tmp_path: Path) -> None:
    """One check for every artifact (bundle, predict.pte, whole weights): what arrived is the
    announced number of bytes with the announced sha256, or :class:`ArtifactError`."""
    data = bytes(range(256)) * 8
    t, _ = make(lambda r: httpx.Response(200, content=data))
    good = ArtifactRef(url="/v1/x", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    buf = ArraySink(good.size)
    t.fetch(good, buf)
    assert buf.buffer.tobytes() == data
    sink = FileSink(tmp_path / "f.bin", limit=good.size)
    t.fetch(good, sink)
    assert sink.commit().read_bytes() == data
    other = good.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ArtifactError, match="sha256"):
        t.fetch(other, ArraySink(other.size))
    longer = good.model_copy(update={"size": good.size + 1})  # a body shorter than announced
    with pytest.raises(ArtifactError, match="size"):
        t.fetch(longer, ArraySink(longer.size))
    shorter = good.model_copy(update={"size": 100})  # cut off as it arrives
    cut = FileSink(tmp_path / "g.bin", limit=shorter.size)
    with pytest.raises(ArtifactError, match="larger than the expected 100 bytes"):
        t.fetch(shorter, cut)
    cut.discard()
    assert list(tmp_path.iterdir()) == [tmp_path / "f.bin"]


def test_a_status_poll_can_ask_for_the_stage_message() -> None:
    """``payload=True`` asks the coordinator to bring the device's message of the stage the
    answer reports; an answer without it (an older coordinator) parses as before."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.query, "ascii"))
        return httpx.Response(
            200, json={"round_id": 3, "stage": "share_keys", "stage_deadline": 0, "retry_after": 0}
        )

    t, _ = make(handler)
    st = t.status(3, since=Stage.ADVERTISE_KEYS, wait=10, payload=True)
    assert st.roster is None and st.stage == Stage.SHARE_KEYS
    t.status(3, payload=True)
    t.status(3)
    assert seen == ["since=advertise_keys&wait=10.0&payload=true", "payload=true", ""]
