"""Real coordinator processes for tests and benchmarks: uvicorn over TLS on a free loopback port,
against a SQLite file or a fresh PostgreSQL database of its own (see the fixtures in conftest.py)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parents[1]


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A PostgreSQL database with a random name (CI reuses the server), dropped afterwards."""
    import psycopg

    name = f"fedkeys_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    ca: Path
    admin_token: str
    enroll_secret: str
    data_dir: Path
    db_url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=str(self.ca),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=60,
        )

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=str(self.ca), headers=headers, timeout=60)


def start_server(
    tmp: Path,
    db_url: str,
    *,
    port: int | None = None,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    tls_dir: Path | None = None,
    admin_token: str | None = None,
    enroll_secret: str | None = None,
    data_dir: Path | None = None,
) -> Server:
    from coordinator.security import make_dev_certs

    tls = tls_dir or tmp / "tls"
    if not (tls / "server.pem").exists():
        make_dev_certs(tls, ["127.0.0.1", "localhost"])
    port = port or free_port()
    admin_token = admin_token or secrets.token_urlsafe(16)
    enroll_secret = enroll_secret or secrets.token_urlsafe(16)
    data = data_dir or tmp / "data"
    env = {
        **os.environ,
        "FEDKEYS_DATABASE_URL": db_url,
        "FEDKEYS_DATA_DIR": str(data),
        "FEDKEYS_ADMIN_TOKEN": admin_token,
        "FEDKEYS_ENROLLMENT_SECRET": enroll_secret,
        "FEDKEYS_TICK_SECONDS": "0.2",
        "FEDKEYS_PUBLISH_PREDICT": "false",
        "FEDKEYS_LOG_JSON": "true",
        **(extra_env or {}),
    }
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedkeys.cli",
            "coordinator",
            "serve",
            "--port",
            str(port),
            "--tls-dir",
            str(tls),
            "--workers",
            str(workers),
        ],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(
        f"https://127.0.0.1:{port}", tls / "ca.pem", admin_token, enroll_secret, data, db_url, proc, log
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", verify=str(server.ca), timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("coordinator did not become ready")


def stop_server(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    os.killpg(server.proc.pid, sig)
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
