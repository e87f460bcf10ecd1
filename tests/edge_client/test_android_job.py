"""The Android job scripts (deploy/android/), run with stand-ins for Termux's commands: the
scheduling call asks Android for exactly the conditions the coordinator's policy wants, and the
job runs a client command the real CLI accepts, inside proot-distro, with those conditions
passed on to the Termux provider."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from edge_client.termux import CONSTRAINTS_ENV, job_constraints
from fedkeys.cli import build_parser

ANDROID = Path(__file__).resolve().parents[2] / "deploy" / "android"
RECORD = '#!/bin/sh\nprintf "%s\\n" "$0 $*" >> "$RECORDS"\n'


def _stub(bin_dir: Path, name: str) -> None:
    path = bin_dir / name
    path.write_text(RECORD)
    path.chmod(0o755)


def _run(script: str, tmp: Path, *args: str, **env: str) -> list[list[str]]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("proot-distro", "termux-wake-lock", "termux-wake-unlock", "termux-api"):
        _stub(bin_dir, name)
    records = tmp / "records"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp),
        "RECORDS": str(records),
        "TERMUX_API_BIN": str(bin_dir / "termux-api"),
        **env,
    }
    subprocess.run(["sh", str(ANDROID / script), *args], env=full_env, check=True, timeout=30)
    return [shlex.split(line) for line in records.read_text().splitlines()]


def test_schedule_asks_for_charging_idle_unmetered(tmp_path: Path) -> None:
    (call,) = _run("schedule.sh", tmp_path)
    assert Path(call[0]).name == "termux-api" and call[1] == "JobScheduler"
    extras = {call[i + 1]: call[i + 2] for i in range(2, len(call) - 2, 3)}
    assert extras["charging"] == extras["idle"] == extras["persisted"] == "true"
    assert extras["network"] == "unmetered" and extras["script"] == str(ANDROID / "fedkeys-job.sh")
    assert int(extras["period_ms"]) >= 900_000  # Android's minimum period
    cancel = _run("schedule.sh", tmp_path, "--cancel")[-1]
    assert "cancel" in cancel and extras["job_id"] in cancel


def test_job_runs_the_client_in_proot_with_the_constraints(tmp_path: Path) -> None:
    conf = tmp_path / "android.env"
    conf.write_text("FEDKEYS_URL=https://coordinator.example:8443\n")
    calls = _run("fedkeys-job.sh", tmp_path, FEDKEYS_ANDROID_CONF=str(conf), FEDKEYS_MAX_MINUTES="20")
    names = [Path(c[0]).name for c in calls]
    assert names == ["termux-wake-lock", "proot-distro", "termux-wake-unlock"]
    login = calls[1]
    assert login[1:3] == ["login", "debian"] and login[3] == "--"
    env_cmd = login[4:]
    assert env_cmd[0] == "/usr/bin/env" and env_cmd[1].startswith(f"{CONSTRAINTS_ENV}=")
    assert job_constraints({CONSTRAINTS_ENV: env_cmd[1].split("=", 1)[1]}) == {
        "charging",
        "idle",
        "unmetered",
    }
    assert env_cmd[2].endswith("/bin/fedkeys")
    args = build_parser().parse_args(env_cmd[3:])
    assert (args.command, args.action, args.provider) == ("client", "run", "termux")
    assert args.coordinator == "https://coordinator.example:8443" and args.max_minutes == 20.0


def test_job_without_a_coordinator_url_says_so(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", str(ANDROID / "fedkeys-job.sh")],
        env={**os.environ, "HOME": str(tmp_path), "FEDKEYS_ANDROID_CONF": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and "FEDKEYS_URL" in out.stderr
