"""Calls into ExecuTorch's C++ bindings: one thread at a time per process, runtime log kept quiet.

Every call into ``executorch.extension.pybindings._C`` (program loads, method runs, the
threadpool reset) goes through :func:`native_call`. Two things happen there.

**One thread at a time (the deadlock of issue 17, item 12).** The bindings register a log sink
that writes the runtime's ``ET_LOG`` lines to ``std::cerr``, and every bound function runs under
pybind11's ``scoped_estream_redirect``, which points ``std::cerr`` at Python's ``sys.stderr``
for the duration of the call (executorch ``extension/pybindings/pybindings.cpp``: the
``call_guard`` of ``py::scoped_ostream_redirect, py::scoped_estream_redirect`` and
``emit_log_message``). So a native log line is a *Python* write, and writing to a file or pipe
releases the GIL, while the native caller still holds its own locks. The first call that needs
the threadpool (``_unsafe_reset_threadpool``, or a program's first XNNPACK execution) runs
``get_threadpool()`` (``extension/threadpool/threadpool.cpp``), whose function-local
``static const int num_threads`` is initialised by ``cpuinfo::get_num_performant_cores()``,
which logs ("Reading file /sys/devices/soc0/image_version", ``cpuinfo_utils.cpp``). Thread A,
inside that static initialisation, releases the GIL in the log write; thread B takes the GIL,
enters ``get_threadpool()`` and waits in ``__cxa_guard_acquire`` for A's initialisation, holding
the GIL; A waits for the GIL to return from its write: both hang for good, and so does every
other Python thread, the main thread's ``join(timeout)`` and pytest-timeout's timer included
(seen with gdb on a reproduction: B in ``__cxa_guard_acquire`` under ``get_threadpool``, A in
``take_gil`` under ``_io_FileIO_write`` under ``vlogf`` under ``get_num_performant_cores``).
The redirection itself is not thread safe either: it swaps the process-wide ``std::cerr``
buffer, so two threads inside bound calls can leave it pointing at a freed buffer (of five runs
of tests/edge_client/test_runtime_threads.py's workload on the unlocked code, three hung this
way and two died of SIGSEGV after interleaved log lines).

A process-wide lock around every native call rules both out: a thread that waits for the lock
waits in Python, without the GIL, and never inside the runtime. It costs no parallelism, because
the bindings hold the GIL for the whole of every call anyway (only the runtime's own XNNPACK
threadpool runs beside it).

**The runtime's log is kept off stderr.** The log level is fixed when ExecuTorch is compiled
(``ET_MIN_LOG_LEVEL``, Info in the released wheels, ``runtime/platform/log.h``) and the bindings
offer no switch, so during a call ``sys.stderr`` is swapped for :class:`_Capture`: the calling
thread's lines (the runtime's) are passed to this module's logger, at DEBUG level (WARNING when
the call raised: they say why), and anything another thread writes meanwhile goes to the real
stream. Set ``FEDKEYS_NATIVE_LOGS=1`` to let the lines through to stderr as ExecuTorch prints
them (the lock still applies).

What the lock cannot cover: a line logged by one of the runtime's own worker threads (not
Python threads) during a multi-threaded execution needs the GIL, which the calling thread holds
while it waits for those workers. No kernel logged in these runs, and devices run one thread
(``set_threads(1)``), where the threadpool runs everything on the calling thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TextIO, TypeVar

__all__ = ["NATIVE_LOGS_ENV", "native_call", "native_logs_shown", "native_section", "quiet_python_logs"]

log = logging.getLogger(__name__)

NATIVE_LOGS_ENV = "FEDKEYS_NATIVE_LOGS"

P = ParamSpec("P")
R = TypeVar("R")

# Re-entrant: a native call made while the same thread is already inside one (a destructor
# that runs a method, say) must not wait for itself.
_LOCK = threading.RLock()


def native_logs_shown() -> bool:
    """Whether ``FEDKEYS_NATIVE_LOGS=1``: the runtime's log lines go to stderr unchanged."""
    return os.environ.get(NATIVE_LOGS_ENV, "") == "1"


THIRD_PARTY_LOGGERS = ("torchao", "torch", "executorch")
"""Python loggers whose import-time chatter (torchao's optional CUDA kernels that do not load,
torch's deprecation notes) reaches the console of every command that exports or trains."""


def quiet_python_logs() -> None:
    """Raise the third-party loggers to ERROR in this process, unless ``FEDKEYS_NATIVE_LOGS=1``.

    torch sets its loggers' levels when it is imported (``torch._logging``), so it is imported
    first; call this at the start of a process (``fedkeys`` commands, spawned export and
    evaluation children, simulator workers) before executorch or torchao are imported."""
    if native_logs_shown():
        return
    import torch  # noqa: F401  (its import resets the "torch" logger's level)

    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _Capture:
    """Stands in for ``sys.stderr`` while one thread is inside a native call: that thread's
    writes (the runtime's log lines, through the bindings' redirect) are kept, any other
    thread's go to the real stream."""

    def __init__(self, real: TextIO | None) -> None:
        self._real = real
        self._owner = threading.get_ident()
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        if threading.get_ident() == self._owner:
            self.parts.append(s)
            return len(s)
        return self._real.write(s) if self._real is not None else len(s)

    def flush(self) -> None:
        if threading.get_ident() != self._owner and self._real is not None:
            self._real.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, ...: the real stream's
        return getattr(self._real, name)

    def lines(self) -> list[str]:
        return [line for line in "".join(self.parts).splitlines() if line.strip()]


@contextmanager
def native_section() -> Iterator[None]:
    """Hold the process-wide native lock (and keep the runtime's log off stderr) for a block."""
    with _LOCK:
        if native_logs_shown():
            yield
            return
        real = sys.stderr
        capture = _Capture(real)
        sys.stderr = capture
        level = logging.DEBUG
        try:
            yield
        except BaseException:
            level = logging.WARNING  # the runtime's reasons for a failed call
            raise
        finally:
            if sys.stderr is capture:
                sys.stderr = real
            for line in capture.lines():
                log.log(level, "executorch: %s", line)


def native_call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` for a function of ExecuTorch's bindings, under :func:`native_section`."""
    with native_section():
        return fn(*args, **kwargs)
