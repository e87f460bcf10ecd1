"""The split of the suite that ``make unit`` runs in two parts (tests/conftest.py): the client's
suite as on a device's install, and the rest."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]


def _selected(rel: str, client_only: bool) -> bool:
    """Whether a run with ``--client-only`` (else ``--skip-client-suite``) collects the test
    file ``rel``: pytest asks about every folder on the way down, then the file."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        inside = conftest._in_client_suite("/".join(parts[:i]))
        if inside is not None and inside != client_only:
            return False
    return True


def test_every_test_file_runs_in_exactly_one_part() -> None:
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py"))
    client = [f for f in files if _selected(f, client_only=True)]
    rest = [f for f in files if _selected(f, client_only=False)]
    assert sorted(client + rest) == files  # each once
    assert "tests/protocol/test_secagg.py" in client and "tests/edge_client/test_batching.py" in client
    assert set(conftest.CLIENT_SUITE_EXCLUDED) <= set(rest)
    assert "tests/coordinator/test_rounds.py" in rest and "tests/test_client_suite.py" in rest


def test_what_a_device_lacks_is_unimportable_for_the_code_under_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a module name no test has imported (a real one may sit in sys.modules already)
    monkeypatch.setattr(conftest, "NOT_ON_A_DEVICE", conftest.NOT_ON_A_DEVICE | {"server_only_dep"})
    (tmp_path / "client_code_under_test.py").write_text("import server_only_dep\n")
    finder = conftest._DeviceInstall()
    monkeypatch.syspath_prepend(tmp_path)
    sys.meta_path.insert(0, finder)
    try:
        with pytest.raises(ImportError, match="server_only_dep is not part of a device's install"):
            importlib.import_module("client_code_under_test")
        assert finder.find_spec("numpy", None) is None  # what a device has stays importable
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("client_code_under_test", None)
