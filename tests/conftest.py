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

``--client-only`` runs the client's suite alone (:data:`CLIENT_SUITE`: the protocol's and the
device's tests) with the modules a device does not install made unimportable
(deploy/install-client.sh; deploy/arm64-check.sh runs it in the emulated arm64 userland); the
tiny bundle then comes from ``FEDKEYS_TEST_TINY_BUNDLE`` (built where the exporter is).
``--skip-client-suite`` runs everything else: ``make unit`` runs both.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import os
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

import hypothesis
import pytest
from hypothesis import HealthCheck

if TYPE_CHECKING:
    from tests.servers import Server

CLIENT_SUITE = ("tests/protocol", "tests/edge_client")
"""The tests of what a device installs (``fedkeys[client]``: protocol/ and edge_client/)..."""
CLIENT_SUITE_EXCLUDED = ("tests/edge_client/test_agent.py", "tests/edge_client/test_install_client.py")
"""... but these, which start a coordinator or install a client into a new venv."""
NOT_ON_A_DEVICE = frozenset(
    {
        # the coordinator's, the exporter's and the simulator's dependencies (pyproject's extras)
        *("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "pydantic_settings"),
        *("prometheus_client", "dp_accounting", "chitchat_dataset", "rich", "matplotlib", "ray"),
        # executorch's, which a device skips (installed with --no-deps)
        *("torchao", "pandas", "sklearn", "scipy", "hydra", "coremltools"),
    }
)
"""Top-level modules a device's install (deploy/install-client.sh) lacks: the client's suite
must not import any of them (this checkout's own packages are all installed; a server side
module that imports one of these fails as it would on a device)."""
TINY_BUNDLE_ENV = "FEDKEYS_TEST_TINY_BUNDLE"

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


class _DeviceInstall(importlib.abc.MetaPathFinder):
    """Makes what a device's install lacks unimportable (``--client-only``) for the code under
    test; the tests themselves may still use such a module as a reference (scipy's binomial
    tail, say: the arm64 check installs the tests' own dependencies beside the client)."""

    TESTS = str(Path(__file__).resolve().parent) + os.sep

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top not in NOT_ON_A_DEVICE or (fullname != top and top in sys.modules):
            return None  # allowed, or a part of a package a test imported
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(self.TESTS):
            return None
        raise ImportError(f"{fullname} is not part of a device's install (pytest --client-only)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--client-only", action="store_true", help="only the client's suite, as on a device's install"
    )
    parser.addoption("--skip-client-suite", action="store_true", help="every test but the client's suite")


def _in_client_suite(rel: str) -> bool | None:
    """True inside the client's suite, False outside, None for a folder that holds some of it
    and some of the rest."""
    if rel in CLIENT_SUITE_EXCLUDED:
        return False
    if any(e.startswith(rel + "/") for e in CLIENT_SUITE_EXCLUDED):
        return None
    if any(rel == d or rel.startswith(d + "/") for d in CLIENT_SUITE):
        return True
    return None if any(d.startswith(rel + "/") for d in CLIENT_SUITE) or rel == "." else False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    client_only, skip_suite = config.getoption("--client-only"), config.getoption("--skip-client-suite")
    if not (client_only or skip_suite):
        return None
    try:
        rel = collection_path.relative_to(config.rootpath).as_posix()
    except ValueError:  # a path given outside the checkout
        return None
    inside = _in_client_suite(rel)
    if inside is None:
        return None
    return (not inside) if client_only else (inside or None)


def pytest_configure(config: pytest.Config) -> None:
    # the real stderr: pytest's capture points fd 2 elsewhere during a test
    config.stash[_stderr_fd] = os.dup(2)
    if config.getoption("--client-only") and config.getoption("--skip-client-suite"):
        raise pytest.UsageError("--client-only and --skip-client-suite exclude each other")
    if config.getoption("--client-only"):
        loaded = sorted(m for m in NOT_ON_A_DEVICE if m in sys.modules)
        if loaded:
            raise pytest.UsageError(
                f"--client-only: {', '.join(loaded)} already imported by a plugin (disable it: -p no:NAME)"
            )
        sys.meta_path.insert(0, _DeviceInstall())


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
    from tests import servers

    return servers.tiny_build()


@pytest.fixture(scope="session")
def tiny_bundle_dir(request: pytest.FixtureRequest) -> Path:
    """The tiny bundle: ``FEDKEYS_TEST_TINY_BUNDLE`` when set (a bundle built elsewhere, for
    the client's suite on a device), else the one :func:`tiny_build` keeps."""
    given = os.environ.get(TINY_BUNDLE_ENV)
    if given:
        if not (Path(given) / "manifest.json").is_file():
            pytest.fail(f"{TINY_BUNDLE_ENV}={given} holds no bundle (manifest.json)")
        return Path(given)
    if request.config.getoption("--client-only"):
        pytest.fail(f"--client-only needs {TINY_BUNDLE_ENV}: the exporter is server side")
    return request.getfixturevalue("tiny_build") / "bundle"  # type: ignore[no-any-return]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name, dropped after the test."""
    from tests.servers import fresh_pg_database, pg_available

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
    from tests.servers import start_server, stop_server

    s = start_server(tmp_path, db_url)
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    from tests.servers import start_server, stop_server

    s = start_server(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}")
    try:
        yield s
    finally:
        stop_server(s)
