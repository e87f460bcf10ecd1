"""Is this device charging, idle and on an unmetered network right now?

Providers behind one interface, chosen automatically (``auto_provider``) unless configured:

- :class:`LinuxProvider`: ``/sys/class/power_supply`` (mains/USB ``online``, battery ``status``
  and ``capacity``; a board without a battery, like a Raspberry Pi on mains, counts as
  charging), the default route's interface from ``/proc/net/route`` (wireless or wired) and,
  where NetworkManager runs, its metered flag (``nmcli``); idle from logind's ``IdleHint`` or,
  failing that, a low load average.
- :class:`TermuxProvider`: ``termux-battery-status`` and ``termux-wifi-connectioninfo`` (JSON)
  from the termux-api package on Android, in Termux or a proot-distro guest; metered and idle,
  which Termux:API cannot tell, from the JobScheduler constraints that started the process.
- :class:`StaticProvider`: fixed values (configuration, simulations, tests).

Anything missing or unreadable counts as "not eligible", never as an error: a garbage value in
sysfs must not make a phone train on battery.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from edge_client import termux

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
    """An Android phone through Termux:API (edge_client/termux.py says what it can tell).

    Charging comes from ``termux-battery-status`` at every read. Wi-Fi from
    ``termux-wifi-connectioninfo``, but whether it is metered, and whether the phone is idle,
    no Termux:API command reports: they count as true only when Android's JobScheduler
    enforced them when it started this process (``constraints``, from the job script), and as
    false otherwise, each with a note saying so."""

    storage_path: Path = field(default_factory=Path.home)
    runner: Runner = run_command
    constraints: frozenset[str] = field(default_factory=termux.job_constraints)
    termux_bin: Path = termux.TERMUX_BIN

    def _call(self, name: str) -> str | None:
        path = termux.command_path(name, self.termux_bin) or name
        return self.runner([path])

    def read(self) -> Conditions:
        notes: list[str] = []
        battery = termux.parse_battery(self._call("termux-battery-status"))
        if battery is None:
            notes.append("termux-battery-status unavailable (is the Termux:API app installed?)")
        elif battery.percent is None:
            notes.append("termux-battery-status: no charge level")
        wifi = termux.parse_wifi(self._call("termux-wifi-connectioninfo"))
        if wifi is None:
            notes.append("termux-wifi-connectioninfo unavailable")
        unmetered = wifi is not None and wifi.associated and "unmetered" in self.constraints
        if wifi is not None and wifi.associated and not unmetered:
            notes.append("Wi-Fi, metered unknown (Termux:API has no metered flag; run as the scheduled job)")
        idle = "idle" in self.constraints
        if not idle:
            notes.append("idle unknown (Termux:API reports none; run as the scheduled job)")
        return Conditions(
            battery is not None and battery.plugged,
            idle,
            unmetered,
            (battery.percent or 0.0) if battery is not None else 0.0,
            _free_mb(self.storage_path),
            "termux",
            tuple(notes),
        )


def auto_provider(kind: str = "auto", static: Conditions | None = None) -> StateProvider:
    """``auto``: Termux when its API is installed, else Linux; or ``linux``/``termux``/``static``."""
    if kind == "static":
        return StaticProvider(static or StaticProvider().conditions)
    if kind == "termux" or (kind == "auto" and termux.command_path("termux-battery-status")):
        return TermuxProvider()
    if kind in ("auto", "linux"):
        return LinuxProvider()
    raise ValueError(f"unknown device-state provider {kind!r} (auto, linux, termux, static)")


def with_overrides(c: Conditions, **overrides: bool | float) -> Conditions:
    return replace(c, **overrides)  # type: ignore[arg-type]
