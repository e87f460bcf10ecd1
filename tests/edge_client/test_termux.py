"""The Termux provider on the outputs Termux:API writes (shapes from termux/termux-api's
BatteryStatusAPI.java and WifiAPI.java: field names, enum strings, fields left out, an IPv6 and
an IPv4 ``ip`` key in one object), in Termux and in a proot-distro guest, and with the metered
and idle signals that Termux:API does not have taken from the job scheduler's constraints."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client import termux
from edge_client.device_state import TermuxProvider, auto_provider

# BatteryStatusAPI.java (2024-): every field the API writes when the battery service reports it
BATTERY_CHARGING = """{
  "present": true,
  "technology": "Li-poly",
  "health": "GOOD",
  "plugged": "PLUGGED_AC",
  "status": "CHARGING",
  "temperature": 29.4,
  "voltage": 4312,
  "current": 1480000,
  "current_average": 1391000,
  "percentage": 64,
  "level": 64,
  "scale": 100,
  "charge_counter": 2711000,
  "energy": null,
  "cycle": 212
}"""
# a phone holding its battery at a charge limit: plugged, NOT_CHARGING; no percentage property
BATTERY_HELD = (
    '{"present": true, "health": "GOOD", "plugged": "PLUGGED_USB", "status": "NOT_CHARGING",'
    ' "temperature": 31.0, "voltage": 4180, "level": 160, "scale": 200}'
)
BATTERY_UNPLUGGED = (
    '{"health": "GOOD", "plugged": "UNPLUGGED", "status": "DISCHARGING", "temperature": 27.0,'
    ' "current": -310000, "percentage": 91}'
)
# an older Termux:API (0.4x): fewer fields, same names
BATTERY_OLD = '{"health": "GOOD", "percentage": 100, "plugged": "PLUGGED_WIRELESS", "status": "FULL", "temperature": 30.5, "current": 0}'  # noqa: E501
# WifiAPI.java: one "ip" per address of the active network (IPv6 then IPv4 here)
WIFI_CONNECTED = """{
  "ip": "fe80::1c2d:3eff:fe4f:5a6b",
  "ip": "192.168.1.23",
  "bssid": "a4:2b:b0:11:22:33",
  "frequency_mhz": 5180,
  "link_speed_mbps": 433,
  "mac_address": "02:00:00:00:00:00",
  "network_id": 3,
  "rssi": -54,
  "ssid": "home",
  "ssid_hidden": false,
  "supplicant_state": "COMPLETED"
}"""
# Wi-Fi off, on mobile data: the "ip" is the mobile network's
WIFI_OFF_ON_MOBILE = (
    '{"ip": "10.64.12.9", "bssid": "02:00:00:00:00:00", "frequency_mhz": -1, "link_speed_mbps": -1,'
    ' "mac_address": "02:00:00:00:00:00", "network_id": -1, "rssi": -127, "ssid": "<unknown ssid>",'
    ' "ssid_hidden": false, "supplicant_state": "DISCONNECTED"}'
)
WIFI_ERROR = '{"API_ERROR": "No current connection"}'
SCHEDULED = frozenset({"charging", "idle", "unmetered"})


def recorded(outputs: dict[str, str | None], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    def runner(cmd: Sequence[str]) -> str | None:
        if calls is not None:
            calls.append(cmd[0])
        return outputs.get(Path(cmd[0]).name)

    return runner


def provider(
    tmp: Path, battery: str | None, wifi: str | None, constraints: frozenset[str] = SCHEDULED
) -> TermuxProvider:
    return TermuxProvider(
        storage_path=tmp,
        runner=recorded({"termux-battery-status": battery, "termux-wifi-connectioninfo": wifi}),
        constraints=constraints,
        termux_bin=tmp / "no-termux",
    )


def test_parse_battery_shapes() -> None:
    assert termux.parse_battery(BATTERY_CHARGING) == termux.Battery(True, 64.0)
    assert termux.parse_battery(BATTERY_HELD) == termux.Battery(True, 80.0)  # level / scale
    assert termux.parse_battery(BATTERY_UNPLUGGED) == termux.Battery(False, 91.0)
    assert termux.parse_battery(BATTERY_OLD) == termux.Battery(True, 100.0)
    plugged_but_draining = BATTERY_CHARGING.replace('"CHARGING"', '"DISCHARGING"')
    assert termux.parse_battery(plugged_but_draining) == termux.Battery(False, 64.0)
    for bad in (None, "", "not json", "[1, 2]", WIFI_ERROR, '{"percentage": 50}', '{"plugged": 1}'):
        assert termux.parse_battery(bad) is None
    assert termux.parse_battery('{"plugged": "PLUGGED_AC", "status": "CHARGING", "percentage": 400}') == (
        termux.Battery(True, None)
    )


def test_parse_wifi_shapes() -> None:
    assert termux.parse_wifi(WIFI_CONNECTED) == termux.Wifi(True)
    assert termux.parse_wifi(WIFI_OFF_ON_MOBILE) == termux.Wifi(False)  # an ip, but not Wi-Fi's
    for bad in (None, "{", WIFI_ERROR, "{}", "3"):
        assert termux.parse_wifi(bad) is None


@given(st.text(max_size=200))
def test_parsers_take_any_output(raw: str) -> None:
    termux.parse_battery(raw)
    termux.parse_wifi(raw)


def test_scheduled_job_on_wifi_and_power(tmp_path: Path) -> None:
    c = provider(tmp_path, BATTERY_CHARGING, WIFI_CONNECTED).read()
    assert (c.charging, c.idle, c.unmetered, c.battery_pct, c.source) == (True, True, True, 64.0, "termux")
    assert c.eligible and not c.notes


def test_metered_and_idle_are_not_guessed(tmp_path: Path) -> None:
    """Outside a scheduled job Wi-Fi may be a phone's hotspot and the user may be typing: both
    count as false, and the notes say why."""
    c = provider(tmp_path, BATTERY_CHARGING, WIFI_CONNECTED, frozenset()).read()
    assert c.charging and not c.unmetered and not c.idle and not c.eligible
    assert any("metered unknown" in n for n in c.notes) and any("idle unknown" in n for n in c.notes)
    # the job's constraints held when it started; what can be read is still read
    c = provider(tmp_path, BATTERY_UNPLUGGED, WIFI_OFF_ON_MOBILE).read()
    assert not c.charging and not c.unmetered and not c.eligible


def test_missing_api_is_not_eligible(tmp_path: Path) -> None:
    c = provider(tmp_path, None, WIFI_ERROR).read()
    assert not (c.charging or c.unmetered or c.eligible) and c.battery_pct == 0.0
    assert any("termux-battery-status unavailable" in n for n in c.notes)


def test_job_constraints_from_the_environment() -> None:
    env = {termux.CONSTRAINTS_ENV: " Charging, idle,unmetered ,bogus"}
    assert termux.job_constraints(env) == SCHEDULED
    assert termux.job_constraints({}) == frozenset()


def _fake_command(path: Path, output: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_proot_guest_finds_termux_api_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a proot-distro guest (PATH without Termux's bin, as with --isolated or a service's
    environment) the commands are run from Termux's prefix, for real, through run_command."""
    termux_bin = tmp_path / "data/data/com.termux/files/usr/bin"
    _fake_command(termux_bin / "termux-battery-status", BATTERY_CHARGING)
    _fake_command(termux_bin / "termux-wifi-connectioninfo", WIFI_CONNECTED)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert termux.command_path("termux-battery-status", termux_bin) == str(
        termux_bin / "termux-battery-status"
    )
    assert termux.command_path("termux-battery-status", tmp_path / "nowhere") is None
    c = TermuxProvider(storage_path=tmp_path, constraints=SCHEDULED, termux_bin=termux_bin).read()
    assert c.eligible and c.battery_pct == 64.0
    # on PATH (Termux itself, or proot-distro's default PATH, which ends with Termux's bin)
    monkeypatch.setenv("PATH", f"/usr/bin:/bin{os.pathsep}{termux_bin}")
    assert termux.command_path("termux-wifi-connectioninfo", tmp_path / "nowhere") == str(
        termux_bin / "termux-wifi-connectioninfo"
    )
    assert isinstance(auto_provider("auto"), TermuxProvider)
