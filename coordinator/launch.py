"""Start a coordinator as a child process on loopback (uvicorn over TLS with a fresh dev CA).

One launcher for everything that needs a real coordinator next to it: the simulator
(``fedkeys simulate`` without ``--coordinator``), the test fixtures and the benchmarks. What a
client needs to reach any coordinator, local or not, is a :class:`CoordinatorHandle`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["CoordinatorHandle", "LocalCoordinator", "free_port", "start_local", "stop_local"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CoordinatorHandle:
    """What a client needs to reach a coordinator and administer it: its URL, the CA that signed
    its certificate, its admin token and its fleet's enrolment secret."""

    url: str
    ca: Path
    admin_token: str
    enroll_secret: str

    def tls(self) -> ssl.SSLContext:
        """A TLS context that trusts only this coordinator's CA (the dev CA it was made with)."""
        return ssl.create_default_context(cafile=str(self.ca))

    def admin(self, timeout: float = 300) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=self.tls(),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=timeout,
        )

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.tls(), headers=headers, timeout=60)


@dataclass
class LocalCoordinator(CoordinatorHandle):
    """A coordinator process started here (:func:`start_local`): its handle, where it keeps its
    data, and the process itself."""

    data_dir: Path
    db_url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def start_local(
    workdir: Path,
    db_url: str | None = None,
    *,
    port: int | None = None,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    tls_dir: Path | None = None,
    admin_token: str | None = None,
    enroll_secret: str | None = None,
    data_dir: Path | None = None,
    ready_timeout: float = 90.0,
) -> LocalCoordinator:
    """Start ``fedkeys coordinator serve`` in its own session and wait until ``/readyz``.

    ``db_url`` defaults to SQLite in ``workdir``; the TLS certificates (a dev CA and a server
    certificate for 127.0.0.1/localhost) are made in ``tls_dir`` (default ``workdir/tls``)
    unless they exist. The server's output goes to ``workdir/coordinator-<port>.log``.
    """
    from coordinator.security import make_dev_certs

    workdir.mkdir(parents=True, exist_ok=True)
    tls = tls_dir or workdir / "tls"
    if not (tls / "server.pem").exists():
        make_dev_certs(tls, ["127.0.0.1", "localhost"])
    port = port or free_port()
    db_url = db_url or f"sqlite:///{workdir / 'coordinator.db'}"
    handle = LocalCoordinator(
        url=f"https://127.0.0.1:{port}",
        ca=tls / "ca.pem",
        admin_token=admin_token or secrets.token_urlsafe(24),
        enroll_secret=enroll_secret or secrets.token_urlsafe(24),
        data_dir=data_dir or workdir / "data",
        db_url=db_url,
        log=workdir / f"coordinator-{port}.log",
    )
    env = {
        **os.environ,
        "FEDKEYS_DATABASE_URL": db_url,
        "FEDKEYS_DATA_DIR": str(handle.data_dir),
        "FEDKEYS_ADMIN_TOKEN": handle.admin_token,
        "FEDKEYS_ENROLLMENT_SECRET": handle.enroll_secret,
        "FEDKEYS_TICK_SECONDS": "0.2",
        "FEDKEYS_PUBLISH_PREDICT": "false",
        "FEDKEYS_LOG_JSON": "true",
        # a local fleet (the simulator's ~1,100 devices) enrols at once, from loopback, with the
        # fleet secret: no enrolment limits here unless a caller sets them (extra_env)
        "FEDKEYS_ENROLLMENT_PER_ADDRESS_PER_MINUTE": "1000000",
        "FEDKEYS_ENROLLMENT_PER_MINUTE": "1000000",
        "FEDKEYS_ENROLLMENT_SECRET_MAX_DEVICES": "unlimited",
        **(extra_env or {}),
    }
    argv = [sys.executable, "-m", "fedkeys.cli", "coordinator", "serve"]
    argv += ["--port", str(port), "--tls-dir", str(tls), "--workers", str(workers)]
    assert handle.log is not None
    with handle.log.open("ab") as log_file:  # the child keeps its own descriptor
        handle.proc = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if handle.proc.poll() is not None:
            tail = handle.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the coordinator exited (log {handle.log}):\n{tail}")
        try:
            if httpx.get(f"{handle.url}/readyz", verify=handle.tls(), timeout=2).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_local(handle)
    raise RuntimeError(f"the coordinator did not become ready in {ready_timeout:.0f} s (log {handle.log})")


def stop_local(handle: LocalCoordinator, sig: int = signal.SIGTERM) -> None:
    """Stop the process group (``sig`` first, SIGKILL after 20 s)."""
    proc = handle.proc
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
