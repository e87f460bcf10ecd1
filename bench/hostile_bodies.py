"""Hostile request bodies against a real coordinator (issue 17, items 2 and 11).

Starts a coordinator (uvicorn over TLS, SQLite or PostgreSQL), then sends a 1 GB body to every
route it serves (the OpenAPI document's operations, the docs pages, an unknown path): once
with a ``Content-Length`` header and once chunked without one, with no valid token and with a
valid one (the admin token on admin routes, an enrolled device's elsewhere). Prints a table
(route, status, seconds, MB sent, server RSS after) and the server's RSS before and its peak
after. Goal: every answer a 4xx (never a 5xx, a hang, or a drop without an answer) and the
server's peak RSS less than 50 MB above its RSS before.

    .venv/bin/python bench/hostile_bodies.py [--postgres] [--gb 1]

The client is a raw TLS socket: it reads the answer while it sends, so a server that refuses
at its limit and closes the connection is seen answering (413) even though the client had
far more to send; a reset with no answer at all is reported as such.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.launch import LocalCoordinator  # noqa: E402
from protocol.version import __version__  # noqa: E402
from tests.servers import fresh_pg_database, start_server, stop_server  # noqa: E402

CHUNK = 64 * 1024
GB = 1_000_000_000
PATH_PARAMS = {"round_id": "1", "name": "kb", "task": "kb", "version": "0", "bundle": "0" * 64}
BINARY_ROUTES = {("PUT", "/v1/rounds/{round_id}/update"), ("POST", "/v1/admin/tasks/{name}/bundle")}


@dataclass(frozen=True)
class Probe:
    method: str
    template: str  # the route's path template
    token: str  # "bad" | "device" | "admin"
    chunked: bool


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    status: int | None  # None: no answer
    error: str  # "" | "reset" | "hang"
    sent: int  # body bytes the server took before it answered or closed
    seconds: float

    @property
    def refused(self) -> bool:
        """A 4xx answer: the only acceptable outcome for these bodies."""
        return self.status is not None and 400 <= self.status < 500


def routes(server: LocalCoordinator) -> list[tuple[str, str]]:
    """(method, path template) of every route: the OpenAPI operations, the docs pages and a
    path that matches none."""
    with httpx.Client(verify=server.tls(), timeout=30) as c:
        doc = c.get(f"{server.url}/openapi.json").json()
    out = [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"]
    out += [("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")]
    return [*sorted(out), ("POST", "/no/such/route")]


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_PARAMS.get(m.group(1), "1"), template)


def enroll_device(server: LocalCoordinator) -> str:
    with server.client() as c:
        r = c.post(
            "/v1/devices/enroll",
            json={
                "enrollment_secret": server.enroll_secret,
                "platform": "bench",
                "client_version": __version__,
            },
        )
    r.raise_for_status()
    token: str = r.json()["token"]
    return token


def _status(data: bytes) -> int | None:
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else None


def _frames(total: int, chunked: bool) -> Iterator[bytes]:
    block = b"\0" * CHUNK
    left = total
    while left > 0:
        n = min(CHUNK, left)
        left -= n
        yield (b"%x\r\n" % n + block[:n] + b"\r\n") if chunked else block[:n]
    if chunked:
        yield b"0\r\n\r\n"


def send(
    server: LocalCoordinator, probe: Probe, bearer: str | None, total: int, timeout: float = 60.0
) -> Outcome:
    """Send ``probe`` with a body of ``total`` bytes; the answer's status as soon as one comes."""
    url = urlsplit(server.url)
    host, port = url.hostname or "127.0.0.1", url.port or 443
    ctx = ssl.create_default_context(cafile=str(server.ca))
    is_binary = (probe.method, probe.template) in BINARY_ROUTES
    head = [
        f"{probe.method} {concrete(probe.template)} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Type: {'application/octet-stream' if is_binary else 'application/json'}",
        "Transfer-Encoding: chunked" if probe.chunked else f"Content-Length: {total}",
    ]
    if bearer is not None:
        head.append(f"Authorization: Bearer {bearer}")
    received = b""
    sent = 0
    started = time.perf_counter()
    error = ""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as sock,
    ):

        def answered() -> bool:
            """Whether the server has answered (or closed), without waiting: a readable
            socket may hold only TLS records that are not data (session tickets)."""
            nonlocal received
            sock.setblocking(False)
            try:
                while data := sock.recv(65536):
                    received += data
                return True  # closed
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return b"\r\n" in received
            finally:
                sock.settimeout(timeout)

        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            for frame in _frames(total, probe.chunked):
                if answered():
                    break
                sock.sendall(frame)
                sent += len(frame)
            while b"\r\n" not in received and (data := sock.recv(65536)):  # the timeout bounds it
                received += data
        except TimeoutError:
            error = "hang"
        except (ConnectionError, ssl.SSLError):
            # the server closed while the client was sending: read what it said before
            try:
                while b"\r\n" not in received and (data := sock.recv(65536)):
                    received += data
            except (OSError, ssl.SSLError):
                pass
    status = _status(received)
    if status is None and not error:
        error = "reset"
    return Outcome(probe, status, error, sent, time.perf_counter() - started)


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the process and its children (uvicorn's workers), in kB."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in total:
                total[key] += int(value.split()[0])
    return total


def attack(
    server: LocalCoordinator, total: int, tokens: tuple[str, ...] = ("bad", "valid")
) -> tuple[dict[str, int], list[tuple[Outcome, int]]]:
    """Every route x token x framing; (RSS before, [(outcome, VmRSS kB after it)])."""
    assert server.proc is not None
    device = enroll_device(server)
    for _ in range(3):  # warm up the paths the probes take
        send(server, Probe("POST", "/v1/checkin", "bad", False), "x", 10)
    before = rss_kb(server.proc.pid)
    results = []
    for method, template in routes(server):
        for token in tokens:
            bearer, kind = "not-a-valid-token", "bad"
            if token == "valid":
                kind = "admin" if template.startswith("/v1/admin") else "device"
                bearer = server.admin_token if kind == "admin" else device
            for chunked in (False, True):
                out = send(server, Probe(method, template, kind, chunked), bearer, total)
                results.append((out, rss_kb(server.proc.pid)["VmRSS"]))
    return before, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database (default SQLite)")
    ap.add_argument("--gb", type=float, default=1.0, help="body size in GB (default 1)")
    args = ap.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hostile-")))
        db = stack.enter_context(fresh_pg_database()) if args.postgres else f"sqlite:///{tmp / 'c.db'}"
        server = start_server(tmp, db)
        stack.callback(stop_server, server)
        before, results = attack(server, int(args.gb * GB))
        assert server.proc is not None
        after = rss_kb(server.proc.pid)
    print(f"{'route':52} {'token':6} {'framing':8} {'status':>6} {'s':>6} {'MB sent':>8} {'RSS MB':>7}")
    for out, rss in results:
        p = out.probe
        status = str(out.status) if out.status is not None else out.error
        print(
            f"{p.method + ' ' + p.template:52} {p.token:6} {'chunked' if p.chunked else 'length':8} "
            f"{status:>6} {out.seconds:6.2f} {out.sent / 1e6:8.1f} {rss / 1024:7.1f}"
        )
    bad = [o for o, _ in results if not o.refused]
    print(
        f"\n{len(results)} requests of {args.gb:g} GB, {'PostgreSQL' if args.postgres else 'SQLite'}: "
        f"RSS before {before['VmRSS'] / 1024:.1f} MB, after {after['VmRSS'] / 1024:.1f} MB, "
        f"peak (VmHWM) {after['VmHWM'] / 1024:.1f} MB (+{(after['VmHWM'] - before['VmRSS']) / 1024:.1f} MB "
        f"over the RSS before); answers not a 4xx: {len(bad)}"
    )
    for o in bad:
        print(f"  NOT REFUSED: {o.probe} -> {o.status or o.error}")


if __name__ == "__main__":
    main()
