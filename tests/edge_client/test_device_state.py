"""Device-state providers on fixture sysfs/proc trees and recorded command outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_client.device_state import LinuxProvider, StaticProvider, auto_provider

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def supply(root: Path, name: str, **files: str) -> None:
    d = root / "power_supply" / name
    d.mkdir(parents=True)
    for k, v in files.items():
        (d / k).write_text(v + "\n")


def tree(
    tmp: Path, *, iface: str = "wlan0", wireless: bool = True, load: str = "0.10 0.2 0.3 1/100 42"
) -> LinuxProvider:
    (tmp / "power_supply").mkdir(parents=True, exist_ok=True)
    (tmp / "net" / iface).mkdir(parents=True, exist_ok=True)
    if wireless:
        (tmp / "net" / iface / "wireless").mkdir(exist_ok=True)
    (tmp / "route").write_text(
        ROUTE_HEADER + f"{iface}\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
    )
    (tmp / "loadavg").write_text(load + "\n")
    return LinuxProvider(
        power_supply=tmp / "power_supply",
        net_class=tmp / "net",
        route_file=tmp / "route",
        loadavg_file=tmp / "loadavg",
        storage_path=tmp,
        cpu_count=2,
        runner=lambda cmd: None,
    )


def recorded(outputs: dict[str, str | None]):  # type: ignore[no-untyped-def]
    def runner(cmd: Sequence[str]) -> str | None:
        return outputs.get(cmd[0])

    return runner


def test_laptop_on_mains_charging_wifi_idle(tmp_path: Path) -> None:
    p = tree(tmp_path)
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", status="Charging", capacity="81")
    c = p.read()
    assert (c.charging, c.idle, c.unmetered, c.battery_pct) == (True, True, True, 81.0)
    assert c.eligible


def test_battery_discharging_is_not_charging(tmp_path: Path) -> None:
    p = tree(tmp_path)
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity="64")
    c = p.read()
    assert not c.charging and c.battery_pct == 64.0 and not c.eligible


def test_raspberry_pi_without_battery_counts_as_charging(tmp_path: Path) -> None:
    p = tree(tmp_path, iface="eth0", wireless=False)
    c = p.read()  # empty power_supply class: a Pi on mains
    assert c.charging and c.battery_pct == 100.0 and c.unmetered


def test_garbage_values_are_not_eligible(tmp_path: Path) -> None:
    p = tree(tmp_path, load="garbage")
    supply(tmp_path, "BAT0", type="Battery", status="Charging", capacity="1e999x")
    c = p.read()
    assert not c.charging and not c.idle and not c.eligible
    assert any("capacity" in n for n in c.notes)
    assert any("load" in n for n in c.notes)


def test_missing_files_are_not_eligible(tmp_path: Path) -> None:
    p = LinuxProvider(
        power_supply=tmp_path / "nope",
        net_class=tmp_path / "nope",
        route_file=tmp_path / "nope",
        loadavg_file=tmp_path / "nope",
        storage_path=tmp_path,
        runner=lambda cmd: None,
    )
    c = p.read()
    assert not (c.charging or c.idle or c.unmetered)


def test_busy_machine_is_not_idle(tmp_path: Path) -> None:
    assert not tree(tmp_path, load="3.5 2.0 1.0 5/300 9").read().idle


def test_nmcli_metered_flag(tmp_path: Path) -> None:
    p = tree(tmp_path)
    supply(tmp_path, "AC", type="Mains", online="1")
    p.runner = recorded({"nmcli": "GENERAL.METERED:yes (guessed)\n"})
    assert not p.read().unmetered
    p.runner = recorded({"nmcli": "GENERAL.METERED:no\n"})
    assert p.read().unmetered
    p.runner = recorded({"nmcli": "GENERAL.METERED:\x00\xff\n"})
    assert not p.read().unmetered


def test_mobile_data_and_no_route_are_metered(tmp_path: Path) -> None:
    assert not tree(tmp_path, iface="wwan0", wireless=False).read().unmetered
    p = tree(tmp_path / "b")
    (tmp_path / "b" / "route").write_text(ROUTE_HEADER)
    assert not p.read().unmetered


def test_logind_idle_hint_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_SESSION_ID", "3")
    p = tree(tmp_path, load="0.0 0 0 1/1 1")
    p.runner = recorded({"loginctl": "no\n"})
    assert not p.read().idle
    p.runner = recorded({"loginctl": "yes\n"})
    assert p.read().idle


def test_static_and_auto() -> None:
    assert StaticProvider().read().eligible
    assert isinstance(auto_provider("static"), StaticProvider)
    assert isinstance(auto_provider("linux"), LinuxProvider)
    with pytest.raises(ValueError, match="unknown"):
        auto_provider("windows")
