"""Secret handling: private keys owner-only from the start, no password in docker-compose,
secrets on the command line from files or the environment, and the admin CLI for enrolment
codes and device revocation against a real coordinator."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from coordinator.security import make_dev_certs
from fedkeys.cli import main
from fedkeys.secret_args import SecretError, add_secret_option, secret_value
from tests.servers import Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask")
def test_private_keys_are_owner_only_from_their_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = make_dev_certs(tmp_path / "tls", ["127.0.0.1"])
    assert _mode(paths.ca_key) == _mode(paths.server_key) == 0o600
    assert "PRIVATE KEY" in paths.server_key.read_text()
    # an existing world-readable key file is replaced, not written into
    paths.server_key.chmod(0o644)
    make_dev_certs(tmp_path / "tls", ["127.0.0.1"])
    assert _mode(paths.server_key) == 0o600

    # The key is never on disk under a wider mode: were the process killed between writing a
    # key and restricting it (chmod failing here), no key file would be readable by others.
    def killed(self: Path, mode: int, **kw: object) -> None:
        raise OSError("killed before chmod")

    monkeypatch.setattr(Path, "chmod", killed)
    with contextlib.suppress(OSError):  # how it went when keys were chmod-ed after being written
        make_dev_certs(tmp_path / "tls2", ["127.0.0.1"])
    keys = list((tmp_path / "tls2").glob("*.key"))
    assert keys and all(_mode(k) == 0o600 for k in keys), {k.name: oct(_mode(k)) for k in keys}
    assert not list((tmp_path / "tls2").glob(".*"))  # no temporary files left


def test_compose_takes_the_database_password_from_the_environment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    url = services["coordinator"]["environment"]["FEDKEYS_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://fedkeys:${POSTGRES_PASSWORD:?")
    assert "fedkeys:fedkeys@" not in text


# -- secrets on the command line ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_secret_option(p, "admin-token", env="X_TOKEN", what="a token")
    return p


def test_secret_from_file_env_or_a_warned_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("X_TOKEN", raising=False)
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    f.chmod(0o600)
    p = _parser()
    with caplog.at_level(logging.WARNING):
        assert (
            secret_value(p.parse_args(["--admin-token-file", str(f)]), "admin-token", env="X_TOKEN")
            == "s3cret"
        )
        assert not caplog.records
        assert secret_value(p.parse_args([]), "admin-token", env="X_TOKEN") is None
        monkeypatch.setenv("X_TOKEN", "from-env")
        assert secret_value(p.parse_args([]), "admin-token", env="X_TOKEN") == "from-env"
        assert not caplog.records
        assert secret_value(p.parse_args(["--admin-token", "v"]), "admin-token", env="X_TOKEN") == "v"
        assert "process list" in caplog.text
        caplog.clear()
        f.chmod(0o644)
        secret_value(p.parse_args(["--admin-token-file", str(f)]), "admin-token", env="X_TOKEN")
        assert "chmod 600" in caplog.text
    for content, error in (("", "empty"), ("a\nb\n", "one line")):
        f.write_text(content)
        with pytest.raises(SecretError, match=error):
            secret_value(p.parse_args(["--admin-token-file", str(f)]), "admin-token", env="X_TOKEN")
    with pytest.raises(SecretError, match="No such file"):
        secret_value(
            p.parse_args(["--admin-token-file", str(tmp_path / "nope")]), "admin-token", env="X_TOKEN"
        )
    with pytest.raises(SecretError, match="not both"):
        secret_value(
            p.parse_args(["--admin-token-file", str(f), "--admin-token", "v"]), "admin-token", env="X_TOKEN"
        )


@pytest.mark.slow
def test_admin_cli_mints_codes_a_device_enrols_with_one_and_is_revoked(
    sqlite_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = sqlite_server
    monkeypatch.delenv("FEDKEYS_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("FEDKEYS_ENROLLMENT_SECRET", raising=False)
    token_file = tmp_path / "admin-token"
    token_file.write_text(server.admin_token + "\n")
    token_file.chmod(0o600)
    conn = ["--url", server.url, "--ca", str(server.ca), "--admin-token-file", str(token_file)]
    codes = tmp_path / "codes.txt"

    assert (
        main(
            [
                "coordinator",
                "enrollment",
                *conn,
                "mint",
                "--count",
                "2",
                "--expires-in",
                "1d",
                "--out",
                str(codes),
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    lines = codes.read_text().split()
    assert len(lines) == 2 and _mode(codes) == 0o600
    assert all("code" not in c for c in shown["codes"]) and not any(
        line in json.dumps(shown) for line in lines
    )
    assert main(["coordinator", "enrollment", *conn, "mint", "--out", str(codes)]) == 2  # never overwrites

    code_file = tmp_path / "code"
    code_file.write_text(lines[0])
    code_file.chmod(0o600)
    state = tmp_path / "device"
    client = [
        "client",
        "--state-dir",
        str(state),
        "enroll",
        "--coordinator",
        server.url,
        "--ca",
        str(server.ca),
    ]
    assert main([*client, "--enroll-secret-file", str(code_file)]) == 0
    device_id = json.loads((state / "device.json").read_text())["device_id"]
    assert device_id in capsys.readouterr().out

    monkeypatch.setenv("FEDKEYS_ADMIN_TOKEN", server.admin_token)  # the environment works too
    env_conn = ["--url", server.url, "--ca", str(server.ca)]
    assert main(["coordinator", "enrollment", *env_conn, "list", "--status", "used"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["device_id"] for c in listed] == [device_id]
    # connection options after the command work as well
    assert main(["coordinator", "device", "revoke", device_id, *env_conn]) == 0
    assert json.loads(capsys.readouterr().out)["device_id"] == device_id
    assert main(["coordinator", "enrollment", "revoke", str(listed[0]["id"] + 1), *env_conn]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "revoked"
    # a refused token, a used code: one line each, exit code 2
    assert (
        main(["coordinator", "enrollment", "list", *env_conn[:4], "--admin-token-file", str(code_file)]) == 2
    )
    assert "401" in capsys.readouterr().err
    assert main([*client, "--enroll-secret-file", str(code_file)]) == 0  # already enrolled: nothing to do
    again = [
        "client",
        "--state-dir",
        str(tmp_path / "d2"),
        "enroll",
        "--coordinator",
        server.url,
        "--ca",
        str(server.ca),
    ]
    assert main([*again, "--enroll-secret-file", str(code_file)]) == 2
    assert "coordinator refused" in capsys.readouterr().err
    assert main([*again, "--enroll-secret-file", str(tmp_path / "missing")]) == 2
