"""Shared fixtures. The tiny model bundle is built once per code version and shared between
pytest-xdist workers through a file lock (tests.servers.tiny_build). Coordinator
fixtures start the real server (uvicorn over TLS on loopback) against a SQLite file or a fresh
PostgreSQL database of the test's own.

Hypothesis runs the "ci" profile unless ``HYPOTHESIS_PROFILE`` names another: derandomized
(the same examples on every run, so a submission's fate does not hang on a draw) and without
deadlines (timing on a shared 2-core box is noise). ``HYPOTHESIS_PROFILE=long`` (``make
test-hypothesis``) draws at random, ten times as many examples per test.

A test that outlives its pytest-timeout limit (pyproject.toml, or its ``timeout`` marker) ends
the run of its process with every thread's stack on the real stderr; under xdist the worker is
reported crashed while running that test and replaced. The timer is faulthandler's watchdog, a C
thread, in place of pytest-timeout's own: those are Python code (a ``threading.Timer`` or a
SIGALRM handler), which cannot run while another thread holds the GIL and waits in native code
(the ExecuTorch deadlock described in edge_client.native was one: ``--timeout 900`` never
fired), and the thread method's stack dump is lost under xdist.
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck

from tests import servers
from tests.servers import Server, fresh_pg_database, pg_available, start_server, stop_server

HYPOTHESIS_PROFILE_ENV = "HYPOTHESIS_PROFILE"
LONG_RUN_FACTOR = 10  # the "long" profile: this many times each test's max_examples
LONG_RUN_EXAMPLES = 1000  # ... and for tests that do not set it (hypothesis's default: 100)
_stderr_fd = pytest.StashKey[int]()

hypothesis.settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
hypothesis.settings.register_profile(
    "long",
    max_examples=LONG_RUN_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
hypothesis.settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under the "long" profile, scale the tests' own ``max_examples`` too (a test's
    ``@settings`` wins over the profile)."""
    if hypothesis.settings.get_current_profile_name() != "long":
        return
    for item in items:
        fn = getattr(item, "obj", None)
        if fn is None or not hypothesis.is_hypothesis_test(fn):
            continue
        own = fn._hypothesis_internal_use_settings
        if own.max_examples != LONG_RUN_EXAMPLES:  # set by the test itself
            scaled = hypothesis.settings(own, max_examples=own.max_examples * LONG_RUN_FACTOR)
            fn._hypothesis_internal_use_settings = scaled


def pytest_configure(config: pytest.Config) -> None:
    # the real stderr: pytest's capture points fd 2 elsewhere during a test
    config.stash[_stderr_fd] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    fd = config.stash.get(_stderr_fd, None)
    if fd is not None:
        os.close(fd)


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool:
    """pytest-timeout's hook: the test's limit, kept by faulthandler's watchdog (see above)."""
    faulthandler.dump_traceback_later(settings.timeout, exit=True, file=item.config.stash[_stderr_fd])
    return True


def pytest_timeout_cancel_timer(item: pytest.Item) -> bool:
    faulthandler.cancel_dump_traceback_later()
    return True


@pytest.fixture(scope="session")
def tiny_build() -> Path:
    """Directory holding ``bundle/`` (tiny profile) and ``work/``: see tests.servers.tiny_build."""
    return servers.tiny_build()


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_build: Path) -> Path:
    return tiny_build / "bundle"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name, dropped after the test."""
    if not pg_available():
        pytest.fail("PostgreSQL at 127.0.0.1:5432 is not reachable (the tests need it)")
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    s = start_server(tmp_path, db_url)
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}")
    try:
        yield s
    finally:
        stop_server(s)
