"""The Dockerfile and docker-compose.yml are consistent (no Docker engine here to run them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fedkeys.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_health() -> None:
    c = _compose()
    services = c["services"]
    assert {"postgres", "coordinator", "devices"} <= set(services)
    for name in ("postgres", "coordinator"):
        assert "healthcheck" in services[name], name
    coord = services["coordinator"]
    assert coord["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert coord["environment"]["FEDKEYS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in coord["environment"]["FEDKEYS_DATABASE_URL"]
    assert "--insecure" not in coord["command"]  # TLS by default
    assert "8443:8443" in coord["ports"]
    assert services["devices"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    for svc in services.values():
        for vol in svc.get("volumes", []):
            name = vol.split(":")[0]
            assert name in c["volumes"], name


def test_compose_commands_parse_with_the_real_cli() -> None:
    parser = build_parser()
    parsed = 0
    for svc in _compose()["services"].values():
        cmd = svc.get("command")
        if cmd and cmd[0] == "fedkeys":
            parser.parse_args(cmd[1:])  # raises SystemExit on an unknown flag
            parsed += 1
    assert parsed >= 2  # the coordinator's and the devices' commands were checked


def test_dockerfile_installs_cpu_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index("torch==2.13.0")
    assert torch_at < text.index("executorch==1.5.1") < text.index('pip install ".[')
    assert re.search(r"^USER \w+", text, re.M)  # not root
    assert "HEALTHCHECK" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None and "serve" in cmd.group(1)
