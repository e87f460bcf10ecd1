"""Property-based API fuzzing (schemathesis) against a real coordinator: no input may cause a
5xx. Requests carry a valid device or admin token so that they reach past authentication."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.coordinator.test_rounds import task_config
from tests.servers import Server, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    server = start_server(tmp, f"sqlite:///{tmp / 'coordinator.db'}")
    try:
        with server.admin() as admin:
            admin.post("/v1/admin/tasks", json={"name": "kb", "config": task_config(max_rounds=None)})
            admin.post("/v1/admin/tasks/kb/bundle", content=tiny_bundle_dir.with_suffix(".tar").read_bytes())
            admin.post("/v1/admin/tasks/kb/start")
        with server.client() as c:
            token = c.post(
                "/v1/devices/enroll",
                json={
                    "enrollment_secret": server.enroll_secret,
                    "platform": "fuzz",
                    "client_version": "0.1.0",
                },
            ).json()["token"]
        yield server, token
    finally:
        stop_server(server)


def test_no_server_errors(live: tuple[Server, str]) -> None:
    """Every operation of the OpenAPI document, fuzzed from its schema (schemathesis'
    generators driven by hypothesis directly: its pytest plugin does not load on pytest 9)."""
    server, token = live
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", verify=str(server.ca))
    session = requests.Session()
    session.verify = str(server.ca)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    for op in operations:
        fuzz_operation(op, server, token, session)


def fuzz_operation(op: Any, server: Server, token: str, session: requests.Session) -> None:
    bearer = server.admin_token if op.path.startswith("/v1/admin") else token
    headers = {"Authorization": f"Bearer {bearer}"}
    if op.path.endswith("/bundle"):
        headers["Content-Type"] = "application/octet-stream"  # fuzzed tarballs must be a 4xx

    @given(case=op.as_strategy())
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(
            base_url=server.url, session=session, headers=headers, timeout=30, verify=str(server.ca)
        )
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

    check()
