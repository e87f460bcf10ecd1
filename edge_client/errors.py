"""How a device leaves a round: :class:`Aborted`.

Its own module because three layers of the device raise it (the weights cache, the round's
stages in ``participation``, the agent's bundle and program downloads) and the agent catches
it: kept below all of them, it needs no import between them.
"""

from __future__ import annotations

__all__ = ["Aborted"]


class Aborted(Exception):
    """The device stopped taking part (no longer eligible, shutting down, dropped)."""
