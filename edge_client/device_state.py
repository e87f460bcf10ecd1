"""Is this device charging, idle and on an unmetered network right now?

Providers behind one interface, chosen automatically (``auto_provider``) unless configured:

- :class:`LinuxProvider`: ``/sys/class/power_supply`` (mains/USB ``online``, battery ``status``
  and ``capacity``; a board without a battery, like a Raspberry Pi on mains, counts as
  charging), the default route's interface from ``/proc/net/route`` (wireless or wired) and,
  where NetworkManager runs, its metered flag (``nmcli``); idle from logind's ``IdleHint`` or,
  failing that, a low load average.
- :class:`TermuxProvider`: ``termux-battery-status`` and ``termux-wifi-connectioninfo`` (JSON)
  from the termux-api package on Android.
- :class:`StaticProvider`: fixed values (configuration, simulations, tests).

Anything missing or unreadable counts as "not eligible", never as an error: a garbage value in
sysfs must not make a phone train on battery.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

__all__ = [
    "Conditions",
    "LinuxProvider",
    "StateProvider",
    "StaticProvider",
    "TermuxProvider",
    "auto_provider",
    "run_command",
]

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], str | None]


def run_command(cmd: Sequence[str], timeout: float = 5.0) -> str | None:
    """stdout of a command, or None if it is missing, fails or times out."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass(frozen=True)
class Conditions:
    """The device's state as the coordinator's eligibility policy sees it."""

    charging: bool = False
    idle: bool = False
    unmetered: bool = False
    battery_pct: float = 0.0
    free_storage_mb: float = 0.0
    source: str = "unknown"
    notes: tuple[str, ...] = field(default=())

    @property
    def eligible(self) -> bool:
        """The default policy (charging, idle, unmetered); the coordinator has the final say."""
        return self.charging and self.idle and self.unmetered


class StateProvider(Protocol):
    def read(self) -> Conditions: ...


def _free_mb(path: Path) -> float:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0.0
    return st.f_bavail * st.f_frsize / 1e6


@dataclass
class StaticProvider:
    """Fixed conditions; ``conditions`` may be replaced at any time (simulations do)."""

    conditions: Conditions = field(default_factory=lambda: Conditions(True, True, True, 100.0, 1e6, "static"))

    def read(self) -> Conditions:
        return self.conditions


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


@dataclass
class LinuxProvider:
    power_supply: Path = Path("/sys/class/power_supply")
    net_class: Path = Path("/sys/class/net")
    route_file: Path = Path("/proc/net/route")
    loadavg_file: Path = Path("/proc/loadavg")
    storage_path: Path = field(default_factory=Path.home)
    idle_load: float = 0.6  # 1-minute load per core below which the machine counts as idle
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    runner: Runner = run_command

    def read(self) -> Conditions:
        notes: list[str] = []
        charging, battery = self._power(notes)
        unmetered = self._network(notes)
        idle = self._idle(notes)
        return Conditions(
            charging, idle, unmetered, battery, _free_mb(self.storage_path), "linux", tuple(notes)
        )

    def _power(self, notes: list[str]) -> tuple[bool, float]:
        try:
            supplies = sorted(p for p in self.power_supply.iterdir() if p.is_dir())
        except OSError:
            notes.append("no power_supply class")
            return False, 0.0
        mains_online = False
        batteries: list[tuple[str | None, float | None]] = []
        for sup in supplies:
            kind = _read(sup / "type")
            if kind in ("Mains", "USB", "USB_C", "USB_PD", "Wireless"):
                online = _read(sup / "online")
                mains_online |= online == "1"
            elif kind == "Battery":
                status = _read(sup / "status")
                cap_raw = _read(sup / "capacity")
                try:
                    cap = float(cap_raw) if cap_raw is not None else None
                except ValueError:
                    cap = None
                if cap is not None and not 0 <= cap <= 100:
                    cap = None
                batteries.append((status, cap))
        if not batteries:
            if mains_online or not supplies:
                notes.append("no battery: mains powered")
                return True, 100.0
            return False, 0.0
        status, cap = batteries[0]
        if cap is None:
            notes.append("unreadable battery capacity")
            return False, 0.0
        charging = status in ("Charging", "Full") or (mains_online and status == "Not charging")
        return charging, cap

    def _default_interface(self) -> str | None:
        text = _read(self.route_file)
        if not text:
            return None
        for line in text.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 4 and cols[1] == "00000000":
                try:
                    flags = int(cols[3], 16)
                except ValueError:
                    continue
                if flags & 0x1:  # RTF_UP
                    return cols[0]
        return None

    def _network(self, notes: list[str]) -> bool:
        iface = self._default_interface()
        if iface is None:
            notes.append("no default route")
            return False
        wireless = (self.net_class / iface / "wireless").exists() or (
            self.net_class / iface / "phy80211"
        ).exists()
        kind = "wifi" if wireless else "wired"
        if iface.startswith(("wwan", "rmnet", "ppp", "usb")):
            notes.append(f"{iface}: mobile data")
            return False
        metered = self.runner(["nmcli", "-t", "-f", "GENERAL.METERED", "device", "show", iface])
        if metered is not None:
            value = metered.strip().split(":", 1)[-1].lower()
            if value.startswith("yes"):
                notes.append(f"{iface}: metered ({kind})")
                return False
            if value.startswith("no") or value.startswith("unknown"):
                return True
            notes.append(f"{iface}: unreadable metered flag")
            return False
        return True  # no NetworkManager: wired or Wi-Fi without a metered flag

    def _idle(self, notes: list[str]) -> bool:
        session = os.environ.get("XDG_SESSION_ID")
        if session:
            out = self.runner(["loginctl", "show-session", session, "-p", "IdleHint", "--value"])
            if out is not None and out.strip() in ("yes", "no"):
                return out.strip() == "yes"
        text = _read(self.loadavg_file)
        try:
            load1 = float(text.split()[0]) if text else None
        except (ValueError, IndexError):
            load1 = None
        if load1 is None or load1 < 0:
            notes.append("unreadable load average")
            return False
        return load1 / self.cpu_count < self.idle_load


@dataclass
class TermuxProvider:
    storage_path: Path = field(default_factory=Path.home)
    runner: Runner = run_command

    def read(self) -> Conditions:
        notes: list[str] = []
        charging, battery = False, 0.0
        raw = self.runner(["termux-battery-status"])
        try:
            b = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            b = None
        if isinstance(b, dict):
            pct = b.get("percentage")
            if isinstance(pct, int | float) and 0 <= pct <= 100:
                battery = float(pct)
            plugged = str(b.get("plugged", "UNPLUGGED")).upper()
            status = str(b.get("status", "")).upper()
            charging = plugged != "UNPLUGGED" and status in ("CHARGING", "FULL")
        else:
            notes.append("termux-battery-status unavailable")
        unmetered = False
        raw = self.runner(["termux-wifi-connectioninfo"])
        try:
            w = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            w = None
        if isinstance(w, dict):
            unmetered = w.get("supplicant_state") == "COMPLETED" and bool(w.get("ip"))
        else:
            notes.append("termux-wifi-connectioninfo unavailable")
        # Android exposes no idle flag to Termux: a plugged-in phone on Wi-Fi with a low load
        idle = LinuxProvider(runner=self.runner)._idle(notes)
        return Conditions(
            charging, idle, unmetered, battery, _free_mb(self.storage_path), "termux", tuple(notes)
        )


def auto_provider(kind: str = "auto", static: Conditions | None = None) -> StateProvider:
    """``auto``: Termux when its API is installed, else Linux; or ``linux``/``termux``/``static``."""
    if kind == "static":
        return StaticProvider(static or StaticProvider().conditions)
    if kind == "termux" or (kind == "auto" and shutil.which("termux-battery-status")):
        return TermuxProvider()
    if kind in ("auto", "linux"):
        return LinuxProvider()
    raise ValueError(f"unknown device-state provider {kind!r} (auto, linux, termux, static)")


def with_overrides(c: Conditions, **overrides: bool | float) -> Conditions:
    return replace(c, **overrides)  # type: ignore[arg-type]
