"""HTTPS client of the coordinator's device API (/v1), with retries.

Every call the device makes is idempotent on the coordinator's side (per device, round and
stage), so a call that failed on the network is simply repeated: with exponential backoff and
jitter on connection errors, 5xx and 429 (honouring ``Retry-After``). 4xx answers other than
429 are final and raised as :class:`ApiError` with the coordinator's reason.

Artifacts (bundles, programs, weights: megabytes) are streamed into a :class:`Sink` chunk by
chunk and hashed on the way, never held whole in memory as a response body;
:meth:`Transport.fetch` checks what arrived against the plan's :class:`ArtifactRef` (size and
sha256) and raises :class:`ArtifactError` when it is not that artifact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from protocol.wire import (
    REPORT_HEADER,
    AdvertiseKeys,
    ArtifactRef,
    CheckinRequest,
    CheckinResponse,
    DeviceState,
    EnrollRequest,
    EnrollResponse,
    EvalCounts,
    MaskedInputRequest,
    RoundPlan,
    RoundStatus,
    ShareKeys,
    ShareKeysRequest,
    Stage,
    TrainReport,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = [
    "ApiError",
    "ArraySink",
    "ArtifactError",
    "CheckedSink",
    "FileSink",
    "Sink",
    "Transport",
    "TransportError",
    "UnsafeUrl",
    "check_origin",
]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

_CHUNK = 1 << 16  # bytes per streamed read

KEEPALIVE_SECONDS = 120.0
"""How long the device keeps an idle connection to the coordinator (httpx's default is 5 s):
a check-in every 30-120 s, or the first request after local training, then reuses it instead
of paying a TLS handshake on both sides. Below the coordinator's ``keep_alive_seconds``."""


class ArtifactError(ValueError):
    """A downloaded artifact is not the one its reference announced: longer than its declared
    size (cut off as it arrives), or another size or sha256 once complete."""


class Sink(Protocol):
    """Where a streamed download goes. ``reset`` starts over (a retried request)."""

    def reset(self) -> None: ...

    def write(self, chunk: bytes) -> None: ...


class CheckedSink(Sink, Protocol):
    """A sink that counts and hashes what it holds (:meth:`Transport.fetch` checks both)."""

    size: int

    def hexdigest(self) -> str: ...


class FileSink:
    """Streams into ``dest`` through a temporary file next to it (owner-only, 0600); SHA-256
    on the way; at most ``limit`` bytes (the artifact's declared size: a longer download is
    cut off with :class:`ArtifactError` instead of filling the disk).

    ``commit()`` renames the finished file into place; ``discard()`` removes the temporary.
    """

    def __init__(self, dest: Path, limit: int | None = None) -> None:
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.part")
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._f: Any = None

    def reset(self) -> None:
        self.close()
        self.dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._f = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.limit is not None and self.size + len(chunk) > self.limit:
            raise ArtifactError(f"download is larger than the expected {self.limit} bytes")
        self._f.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def commit(self) -> Path:
        self.close()
        os.replace(self.tmp, self.dest)
        return self.dest

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


class ArraySink:
    """Streams at most ``limit`` bytes (the artifact's declared size) into one buffer of that
    size, allocated up front (no body copy, no join); more is cut off with
    :class:`ArtifactError`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer: npt.NDArray[np.uint8] = np.empty(limit, dtype=np.uint8)
        self.size = 0
        self._hash = hashlib.sha256()

    def reset(self) -> None:
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if end > self.limit:
            raise ArtifactError(f"download is larger than the expected {self.limit} bytes")
        self.buffer[self.size : end] = np.frombuffer(chunk, dtype=np.uint8)
        self._hash.update(chunk)
        self.size = end

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ApiError(Exception):
    """The coordinator refused a request (4xx): final, with its status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class TransportError(Exception):
    """The coordinator stayed unreachable (or kept failing) through every retry."""


class UnsafeUrl(ValueError):
    """A URL the device will not send its token to: another scheme or host than the configured
    coordinator's (a plan's artifact URLs are paths joined to that origin), or plain http."""


def check_origin(base_url: str, *, allow_http: bool = False) -> httpx.URL:
    """The coordinator's origin, refused unless it is https (``allow_http`` for a loopback lab
    behind nothing: never for a real device, whose token would travel in clear text)."""
    url = httpx.URL(base_url)
    if not url.host or url.scheme not in (("https", "http") if allow_http else ("https",)):
        raise UnsafeUrl(f"the coordinator's address must be an https:// URL, not {base_url!r}")
    return url


class Transport:
    """One device's connection to the coordinator. ``token`` may be set after enrolment."""

    def __init__(
        self,
        base_url: str,
        *,
        ca: Path | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        on_bytes: Callable[[str, int], None] | None = None,
        allow_http: bool = False,
    ) -> None:
        self.origin = check_origin(base_url, allow_http=allow_http)
        verify: Any = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
        self._http = httpx.Client(
            base_url=base_url,
            verify=verify,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS),
        )
        self.token = token
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._sleep = sleep
        self._jitter = random.Random()
        self.on_bytes = on_bytes  # (direction "up"/"down", byte count): accounting hook

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _path(self, url: str) -> str:
        """``url`` as a path on the configured origin: a path (``/v1/...``) as it is; an
        absolute URL only if it names this very origin (then its path); anything else
        (another host or scheme, a scheme-relative ``//host/...``) is :class:`UnsafeUrl`."""
        target = httpx.URL(url)
        if target.is_relative_url and not url.startswith("//") and url.startswith("/"):
            return url
        same = (target.scheme, target.host, target.port) == (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        )
        if not same or not target.is_absolute_url:
            raise UnsafeUrl(f"refusing to send this device's token to {url!r}")
        return target.raw_path.decode("ascii")

    def _request(self, method: str, path: str, *, sink: Sink | None = None, **kwargs: Any) -> httpx.Response:
        """One call with retries. With a ``sink``, a successful body is streamed into it (the
        returned response has no content then); a retry after a broken stream resets it."""
        path = self._path(path)
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                if sink is None:
                    r = self._http.request(method, path, headers=headers, **kwargs)
                    down = len(r.content)
                else:
                    r, down = self._stream(method, path, sink, headers=headers, **kwargs)
            except httpx.TransportError as e:  # connection refused/reset, timeouts, broken streams
                last = e
                wait = delay
            else:
                if self.on_bytes is not None:
                    body = kwargs.get("content") or b""
                    self.on_bytes(
                        "up",
                        len(body) if isinstance(body, bytes | bytearray) else len(r.request.content),
                    )
                    self.on_bytes("down", down)
                if r.status_code < 400 or r.status_code == 304:
                    return r
                if r.status_code != 429 and r.status_code < 500:
                    try:
                        reason = str(r.json().get("detail", r.text))
                    except ValueError:
                        reason = r.text
                    raise ApiError(r.status_code, reason)
                last = ApiError(r.status_code, r.text[:200])
                retry_after = r.headers.get("retry-after", "")
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else delay
            if attempt == self.retries:
                break
            self._sleep(min(wait, self.max_backoff) * (0.5 + self._jitter.random()))
            delay = min(delay * 2, self.max_backoff)
        raise TransportError(f"{method} {path} failed after {self.retries + 1} attempts: {last}")

    def _stream(self, method: str, path: str, sink: Sink, **kwargs: Any) -> tuple[httpx.Response, int]:
        """The body of a 2xx answer into ``sink``; error answers are read whole (they are small)."""
        with self._http.stream(method, path, **kwargs) as r:
            if r.status_code >= 300:
                r.read()
                return r, len(r.content)
            sink.reset()
            down = 0
            for chunk in r.iter_bytes(_CHUNK):
                sink.write(chunk)
                down += len(chunk)
            return r, down

    def _json(self, method: str, path: str, model: type[M], body: BaseModel | None = None) -> M:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = body.model_dump_json().encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        return model.model_validate_json(self._request(method, path, **kwargs).content)

    def _send(self, method: str, path: str, body: BaseModel) -> None:
        self._request(
            method,
            path,
            content=body.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )

    # -- device API ----------------------------------------------------------------------------

    def enroll(self, req: EnrollRequest) -> EnrollResponse:
        return self._json("POST", "/v1/devices/enroll", EnrollResponse, req)

    def checkin(self, state: DeviceState) -> CheckinResponse:
        return self._json("POST", "/v1/checkin", CheckinResponse, CheckinRequest(state=state))

    def plan(self, round_id: int) -> RoundPlan:
        return self._json("GET", f"/v1/rounds/{round_id}/plan", RoundPlan)

    def status(
        self, round_id: int, *, since: Stage | None = None, wait: float = 0.0, payload: bool = False
    ) -> RoundStatus:
        """The round's status; with ``since`` (the stage the device knows) a long poll that the
        coordinator holds up to ``wait`` seconds until the stage changes; with ``payload`` it
        brings the device's message of the stage it reports (roster, shares, unmask request)."""
        query = []
        if since is not None and wait > 0:
            query += [f"since={since}", f"wait={wait:.1f}"]
        if payload:
            query.append("payload=true")
        path = f"/v1/rounds/{round_id}/status" + (f"?{'&'.join(query)}" if query else "")
        return self._json("GET", path, RoundStatus)

    def advertise(self, round_id: int, msg: AdvertiseKeys) -> None:
        self._send("POST", f"/v1/rounds/{round_id}/secagg/advertise", msg)

    def roster(self, round_id: int) -> ShareKeysRequest:
        return self._json("GET", f"/v1/rounds/{round_id}/secagg/roster", ShareKeysRequest)

    def share_keys(self, round_id: int, msg: ShareKeys) -> None:
        self._send("POST", f"/v1/rounds/{round_id}/secagg/shares", msg)

    def inbound_shares(self, round_id: int) -> MaskedInputRequest:
        return self._json("GET", f"/v1/rounds/{round_id}/secagg/shares", MaskedInputRequest)

    def upload(
        self,
        round_id: int,
        body: bytes,
        examples: int,
        omit: Sequence[str] = (),
        report: TrainReport | None = None,
    ) -> bool:
        """The encoded update; ``omit``: neighbours a masked input was made without; ``report``:
        the training report, carried in a header instead of a request of its own."""
        headers = {"Content-Type": "application/octet-stream"}
        if report is not None:
            headers[REPORT_HEADER] = report.model_dump_json()
        r = self._request(
            "PUT",
            f"/v1/rounds/{round_id}/update",
            params={"examples": examples, "omit": list(omit)},
            content=body,
            headers=headers,
        )
        return bool(r.json().get("accepted", False))

    def unmask_request(self, round_id: int) -> UnmaskRequest:
        return self._json("GET", f"/v1/rounds/{round_id}/secagg/unmask", UnmaskRequest)

    def unmask(self, round_id: int, msg: UnmaskResponse) -> None:
        self._send("POST", f"/v1/rounds/{round_id}/secagg/unmask", msg)

    def report(self, round_id: int, msg: TrainReport) -> None:
        self._send("POST", f"/v1/rounds/{round_id}/report", msg)

    def evaluation(self, round_id: int, counts: EvalCounts) -> None:
        self._send("POST", f"/v1/rounds/{round_id}/evaluation", counts)

    def download(self, url: str, *, params: dict[str, Any] | None = None) -> bytes:
        """A small artifact, whole in memory (the caller checks its sha256)."""
        return self._request("GET", url, params=params).content

    def download_to(self, url: str, sink: Sink, *, params: dict[str, Any] | None = None) -> None:
        """An artifact streamed into ``sink`` (the caller checks what the sink received)."""
        self._request("GET", url, params=params, sink=sink)

    def fetch(self, ref: ArtifactRef, sink: CheckedSink) -> None:
        """The artifact ``ref`` streamed into ``sink``, then checked: :class:`ArtifactError`
        unless it is ``ref.size`` bytes with sha256 ``ref.sha256``.

        Make ``sink`` with ``limit=ref.size``, so that a longer body is cut off as it arrives
        rather than written out first. What to do with a good artifact (rename a file into
        place, unpack a bundle, view a buffer) is the caller's; so is discarding a bad one.
        """
        self.download_to(ref.url, sink)
        if sink.size != ref.size or sink.hexdigest() != ref.sha256:
            raise ArtifactError(f"{ref.url} does not match its announced size and sha256")

    def current(self, task: str) -> dict[str, Any]:
        out: dict[str, Any] = self._request("GET", f"/v1/tasks/{task}/current").json()
        return out
