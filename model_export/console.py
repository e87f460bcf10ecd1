"""Terminal output of the commands: a rich display of a pipeline's progress and tables.

Used by ``fedkeys export``/``suggest`` (``fedkeys.cli``), ``fedkeys simulate`` (``simulator.cli``)
and the benchmarks. It lives here, below all of them, because :func:`rich_progress` displays
:data:`model_export.pipeline.Progress` and rich comes with the ``export`` extra that
``model_export`` needs; the simulator, which builds bundles, depends on that package anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["console", "print_table", "rich_progress"]

# Piped output (`make demo > log`, CI) would otherwise wrap tables at rich's default 80 columns.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 132)


@contextmanager
def rich_progress() -> Iterator[Callable[[str, int], Callable[[int, int, str], None]]]:
    """Yields a factory ``(name, total) -> update(done, total, status)`` backed by one display."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    ) as progress:

        def factory(name: str, total: int) -> Callable[[int, int, str], None]:
            task = progress.add_task(name, total=total, status="")

            def update(done: int, total_: int, status: str) -> None:
                progress.update(task, completed=done, total=total_, status=status)

            return update

        yield factory


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)
