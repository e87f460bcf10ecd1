"""What an Android phone's Termux:API can and cannot say about charging, idleness and metering.

The shapes below are those the Termux:API app writes (termux/termux-api,
``app/src/main/java/com/termux/api/apis/BatteryStatusAPI.java`` and ``WifiAPI.java``):

- ``termux-battery-status``: ``plugged`` is ``UNPLUGGED``, ``PLUGGED_AC``, ``PLUGGED_USB``,
  ``PLUGGED_WIRELESS``, ``PLUGGED_DOCK`` or ``PLUGGED_<n>``; ``status`` is ``CHARGING``,
  ``DISCHARGING``, ``FULL``, ``NOT_CHARGING`` or ``UNKNOWN``; ``percentage`` is left out when
  the battery service does not report it (then ``level``/``scale`` still give it).
- ``termux-wifi-connectioninfo``: ``supplicant_state`` (``COMPLETED`` once associated) and
  ``ip`` written once per address of the phone's *active* network, which is the mobile network
  when Wi-Fi is down; or ``{"API_ERROR": ...}``. **There is no metered field**: a phone
  tethered to another phone's hotspot is on Wi-Fi and metered.
- **Nothing reports idleness** (screen off, not in use).

What cannot be read is taken from Android's JobScheduler instead: deploy/android/schedule.sh
asks Termux:API's job scheduler for charging, idle and an unmetered network (the ``idle`` extra
is passed to ``libexec/termux-api JobScheduler`` directly: the ``termux-job-scheduler`` command
has no option for it), so Android starts deploy/android/fedkeys-job.sh only when all three hold,
and the job passes those constraints on in ``FEDKEYS_JOB_CONSTRAINTS``. The scheduler checks
them when it starts the job, not after (the Termux:API ``JobSchedulerService`` returns from
``onStartJob`` at once), so the job runs for a bounded time (``fedkeys client run
--max-minutes``) and charging, which can be read, is read at every check-in.

Inside ``proot-distro login`` (the Debian userland where the client's wheels install), the
Termux:API commands are reachable under Termux's prefix, which proot-distro binds (and puts at
the end of ``PATH``) unless ``--isolated`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CONSTRAINTS_ENV",
    "TERMUX_BIN",
    "Battery",
    "Wifi",
    "command_path",
    "job_constraints",
    "parse_battery",
    "parse_wifi",
]

TERMUX_BIN = Path("/data/data/com.termux/files/usr/bin")  # Termux's fixed prefix on every phone
CONSTRAINTS_ENV = "FEDKEYS_JOB_CONSTRAINTS"
KNOWN_CONSTRAINTS = frozenset({"charging", "idle", "unmetered"})


@dataclass(frozen=True)
class Battery:
    plugged: bool  # on external power (charging, full, or held at a charge limit)
    percent: float | None


@dataclass(frozen=True)
class Wifi:
    associated: bool  # connected to an access point (metered or not: Android does not say here)


def _object(raw: str | None) -> dict[str, object] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or "API_ERROR" in value:
        return None
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_battery(raw: str | None) -> Battery | None:
    """``termux-battery-status`` output, or None when it is missing or not the API's shape."""
    b = _object(raw)
    if b is None or not isinstance(b.get("plugged"), str):
        return None
    plugged = str(b["plugged"]).upper()
    pct = _number(b.get("percentage"))
    if pct is None:
        level, scale = _number(b.get("level")), _number(b.get("scale"))
        pct = 100.0 * level / scale if level is not None and scale and scale > 0 else None
    if pct is not None and not 0 <= pct <= 100:
        pct = None
    # NOT_CHARGING while plugged is a phone holding its battery at a charge limit: on power
    return Battery(plugged.startswith("PLUGGED") and b.get("status") != "DISCHARGING", pct)


def parse_wifi(raw: str | None) -> Wifi | None:
    """``termux-wifi-connectioninfo`` output, or None when it is missing or an API error."""
    w = _object(raw)
    if w is None or "supplicant_state" not in w:
        return None
    return Wifi(w.get("supplicant_state") == "COMPLETED" and bool(w.get("ip")))


def job_constraints(env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The conditions Android's JobScheduler enforced when it started this process."""
    given = {c.strip().lower() for c in env.get(CONSTRAINTS_ENV, "").split(",") if c.strip()}
    return frozenset(given & KNOWN_CONSTRAINTS)


def command_path(name: str, termux_bin: Path = TERMUX_BIN) -> str | None:
    """A Termux:API command on ``PATH``, or under Termux's prefix (from a proot-distro guest)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = termux_bin / name
    return str(candidate) if os.access(candidate, os.X_OK) else None
