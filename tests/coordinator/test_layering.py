"""The coordinator stands on ``protocol``, never on the device package: bundle reading is
contract (issue 18), so no module under coordinator/ imports ``edge_client``, at any depth."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import coordinator

COORDINATOR = Path(coordinator.__file__).parent


def _imports(tree: ast.AST) -> Iterator[str]:
    """Every absolute module an import statement names (in functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            yield node.module


def test_no_coordinator_module_imports_the_edge_client() -> None:
    sources = sorted(COORDINATOR.rglob("*.py"))
    assert COORDINATOR / "app.py" in sources and COORDINATOR / "services" / "storage.py" in sources
    found = [
        f"{path.relative_to(COORDINATOR.parent)}: {name}"
        for path in sources
        for name in _imports(ast.parse(path.read_text(), filename=str(path)))
        if name == "edge_client" or name.startswith("edge_client.")
    ]
    assert found == []
