"""The Raspberry Pi systemd unit runs a command the real CLI accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from fedkeys.cli import build_parser

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "fedkeys-client.service"


def test_unit_structure_and_command() -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    svc = cp["Service"]
    assert svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "on-failure"
    argv = shlex.split(svc["ExecStart"].replace("${FEDKEYS_URL}", "https://c:8443"))
    assert argv[0].endswith("/fedkeys")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "client" and args.action == "run" and args.coordinator == "https://c:8443"
    assert cp["Install"]["WantedBy"] == "multi-user.target"
