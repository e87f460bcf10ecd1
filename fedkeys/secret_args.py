"""Secrets on the command line: from a file or the environment, not as a flag's value.

A flag's value is visible to every local user in the process list (``ps``,
``/proc/<pid>/cmdline``) and stays in shell history. Each secret option is therefore
``--NAME-file PATH`` (the file holds the secret on one line), with an environment variable as
the fallback. The older ``--NAME VALUE`` still works, for compatibility, with a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

__all__ = ["SecretError", "add_secret_option", "read_secret_file", "secret_value"]

log = logging.getLogger(__name__)

MAX_SECRET_BYTES = 4096


class SecretError(Exception):
    """A secret could not be read (missing or empty file, two sources at once): one line, exit 2."""


def add_secret_option(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    env: str,
    what: str,
    default: object = None,
    legacy_flag: bool = True,
) -> None:
    """``--NAME-file PATH`` and (``legacy_flag``: for commands that had it) the deprecated
    ``--NAME VALUE`` on ``parser``; read them with :func:`secret_value` (which falls back to
    ``$env``). ``default=argparse.SUPPRESS`` lets a sub-command repeat options of its parent
    without overriding them when not given."""
    parser.add_argument(
        f"--{name}-file",
        type=Path,
        default=default,
        metavar="PATH",
        help=f"file holding {what} (or set ${env})",
    )
    if not legacy_flag:
        return
    parser.add_argument(
        f"--{name}",
        default=default,
        metavar="VALUE",
        help=f"deprecated: {what} as a value shows in the process list; use --{name}-file or ${env}",
    )


def read_secret_file(path: Path) -> str:
    """The secret in ``path``: its content without surrounding whitespace, one line."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretError(f"{path}: larger than {MAX_SECRET_BYTES} bytes: not a secret file")
    try:
        value = raw.decode().strip()
    except UnicodeDecodeError:
        raise SecretError(f"{path}: not text") from None
    if not value:
        raise SecretError(f"{path} is empty")
    if "\n" in value:
        raise SecretError(f"{path}: a secret file holds one line")
    if stat.S_ISREG(mode) and mode & 0o077:
        log.warning("%s can be read by other users: chmod 600 it", path)
    return value


def secret_value(args: argparse.Namespace, name: str, *, env: str) -> str | None:
    """The secret of option ``--NAME``: from ``--NAME-file``, else the deprecated ``--NAME``
    (with a warning), else ``$env``; None when none is given."""
    dest = name.replace("-", "_")
    path: Path | None = getattr(args, f"{dest}_file", None)
    plain: str | None = getattr(args, dest, None)
    if path is not None and plain is not None:
        raise SecretError(f"pass --{name}-file or --{name}, not both")
    if path is not None:
        return read_secret_file(path)
    if plain is not None:
        log.warning("--%s shows its value in the process list: use --%s-file or $%s", name, name, env)
        return plain
    return os.environ.get(env) or None
