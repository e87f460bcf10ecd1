"""The fedkeys version, read from the installed distribution's metadata (pyproject.toml is
its one source): what devices report as their client version and the CLI prints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("fedkeys")
except PackageNotFoundError:  # a source tree that was never installed (pip install -e . fixes it)
    __version__ = "0.0.0+unknown"
