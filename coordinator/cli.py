"""``fedkeys coordinator ...``: certificates, serving, migrations, and the admin API client
(tasks, enrolment codes, device revocation). The admin token comes from
``--admin-token-file`` or ``$FEDKEYS_ADMIN_TOKEN``, not from a flag's value."""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkeys.secret_args import add_secret_option, secret_value

if TYPE_CHECKING:
    import httpx

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)


class CliError(Exception):
    """A user mistake or a refused admin request: message printed, exit code 2."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("coordinator", help="run and administer the coordinator service")
    s = p.add_subparsers(dest="action", required=True)

    c = s.add_parser("certs", help="make a development CA and a server certificate")
    c.add_argument("--out", type=Path, default=Path("fedkeys-data/tls"))
    c.add_argument("--host", action="append", default=None, help="server name or IP (repeatable)")

    v = s.add_parser("serve", help="run the service (uvicorn, TLS by default)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8443)
    v.add_argument("--workers", type=int, default=1)
    v.add_argument(
        "--tls-dir", type=Path, default=Path("fedkeys-data/tls"), help="holds server.pem/server.key"
    )
    v.add_argument("--insecure", action="store_true", help="plain HTTP (only behind a TLS-terminating proxy)")
    v.add_argument("--database-url", default=None, help="overrides FEDKEYS_DATABASE_URL")
    v.add_argument("--data-dir", type=Path, default=None, help="overrides FEDKEYS_DATA_DIR")

    s.add_parser("migrate", help="apply database migrations (also done at start-up)")

    t = s.add_parser("task", help="admin API: tasks, rounds, versions")
    _admin_connection(t)
    ts = t.add_subparsers(dest="task_action", required=True)
    create = ts.add_parser("create", help="create a task")
    create.add_argument("name")
    create.add_argument("--config", type=Path, default=None, help="JSON task configuration")
    create.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. clients_per_round=20 or codec.bits=4",
    )
    update = ts.add_parser("update", help="replace a task's configuration")
    update.add_argument("name")
    update.add_argument("--config", type=Path, default=None)
    update.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for name in ("start", "pause", "show", "rounds", "versions"):
        ts.add_parser(name).add_argument("name")
    ts.add_parser("list")
    rb = ts.add_parser("rollback", help="make an earlier version current (as a new version)")
    rb.add_argument("name")
    rb.add_argument("version", type=int)
    up = ts.add_parser("upload-bundle", help="upload a bundle tarball as the task's model")
    up.add_argument("name")
    up.add_argument("tarball", type=Path)
    fr = ts.add_parser("fail-round", help="end an open round now (model unchanged; the next round opens)")
    fr.add_argument("name")
    fr.add_argument("round_id", type=int)
    fr.add_argument("--reason", default="stuck", help="recorded as the round's failure reason")

    e = s.add_parser("enrollment", help="admin API: one-time enrolment codes for devices")
    _admin_connection(e)
    es = e.add_subparsers(dest="enrollment_action", required=True)
    m = es.add_parser("mint", help="mint one-time codes (shown once: keep them safe)")
    m.add_argument("--count", type=int, default=1, help="how many codes (at most 1000 per call)")
    m.add_argument(
        "--expires-in", type=_duration, default=None, metavar="DURATION", help="e.g. 3600, 90m, 12h, 7d"
    )
    m.add_argument("--device-class", default=None, help="the class of the devices these codes enrol")
    m.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the codes, one per line, to this new file (mode 0600) instead of printing them",
    )
    lst = es.add_parser("list", help="codes with their state (never the codes themselves)")
    lst.add_argument("--status", choices=["active", "used", "expired", "revoked"], default=None)
    lst.add_argument("--limit", type=int, default=100)
    es.add_parser("revoke", help="revoke an unused code").add_argument("code_id", type=int)

    d = s.add_parser("device", help="admin API: devices")
    _admin_connection(d)
    ds = d.add_subparsers(dest="device_action", required=True)
    ds.add_parser("revoke", help="revoke a device: its token stops working at once").add_argument("device_id")
    for group in (ts, es, ds):
        for command in group.choices.values():
            _admin_connection(command, leaf=True)


def _admin_connection(q: argparse.ArgumentParser, *, leaf: bool = False) -> None:
    """How to reach the admin API. Given to the command group (``task --ca X create ...``) and,
    without defaults of their own, to each of its commands (``task create ... --ca X``)."""
    default: Any = argparse.SUPPRESS if leaf else None
    q.add_argument(
        "--url",
        default=argparse.SUPPRESS if leaf else os.environ.get("FEDKEYS_URL", "https://127.0.0.1:8443"),
    )
    q.add_argument("--ca", type=Path, default=default, help="CA certificate to trust (the dev CA)")
    add_secret_option(
        q, "admin-token", env="FEDKEYS_ADMIN_TOKEN", what="the admin API token", default=default
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """Seconds from ``3600``, ``90m``, ``12h`` or ``7d``."""
    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:])
    number = raw[:-1] if unit is not None else raw
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90m, 12h, 7d)")
    return int(number) * (unit or 1)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _config(path: Path | None, sets: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CliError(f"{path}: {e}") from None
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set needs KEY=VALUE, got {item!r}")
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CliError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return cfg


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    if args.database_url:
        from sqlalchemy.engine import make_url

        if make_url(args.database_url).password:
            log.warning("--database-url shows its password in the process list: use $FEDKEYS_DATABASE_URL")
        os.environ["FEDKEYS_DATABASE_URL"] = args.database_url
    if args.data_dir:
        os.environ["FEDKEYS_DATA_DIR"] = str(args.data_dir)
    ssl: dict[str, Any] = {}
    if not args.insecure:
        cert, key = args.tls_dir / "server.pem", args.tls_dir / "server.key"
        if not (cert.exists() and key.exists()):
            raise CliError(
                f"no certificate in {args.tls_dir}: run `fedkeys coordinator certs` (or pass --insecure)"
            )
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    from coordinator.config import Settings

    settings = Settings()
    if not settings.admin_token.get_secret_value():
        raise CliError("set FEDKEYS_ADMIN_TOKEN (devices enrol with codes it mints)")
    uvicorn.run(
        "coordinator.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        timeout_keep_alive=settings.keep_alive_seconds,
        **ssl,
    )


def _admin(args: argparse.Namespace) -> None:
    """``task``, ``enrollment`` and ``device``: one admin API call, its JSON answer printed."""
    import httpx

    token = secret_value(args, "admin-token", env="FEDKEYS_ADMIN_TOKEN")
    if not token:
        raise CliError("set FEDKEYS_ADMIN_TOKEN or pass --admin-token-file")
    verify: Any = ssl.create_default_context(cafile=str(args.ca)) if args.ca else True
    call = {"task": _task_call, "enrollment": _enrollment_call, "device": _device_call}[args.action]
    with httpx.Client(
        base_url=args.url, verify=verify, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as client:
        try:
            r = call(args, client)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach {args.url}: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise CliError(f"{r.status_code}: {detail}")
    answer = r.json()
    if args.action == "enrollment" and args.enrollment_action == "mint" and args.out is not None:
        _save_codes(args.out, answer)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")


def _task_call(args: argparse.Namespace, client: httpx.Client) -> httpx.Response:
    a = args.task_action
    if a == "create":
        return client.post(
            "/v1/admin/tasks",
            json={"name": args.name, "config": _config(args.config, args.set)},
        )
    if a == "update":
        current = client.get(f"/v1/admin/tasks/{args.name}")
        if current.status_code != 200:
            return current
        cfg = _config(args.config, args.set, current.json()["config"])
        return client.put(f"/v1/admin/tasks/{args.name}", json={"config": cfg})
    if a in ("start", "pause"):
        return client.post(f"/v1/admin/tasks/{args.name}/{a}")
    if a == "show":
        return client.get(f"/v1/admin/tasks/{args.name}")
    if a == "list":
        return client.get("/v1/admin/tasks")
    if a in ("rounds", "versions"):
        return client.get(f"/v1/admin/tasks/{args.name}/{a}")
    if a == "rollback":
        return client.post(f"/v1/admin/tasks/{args.name}/rollback", json={"version": args.version})
    if a == "fail-round":
        return client.post(
            f"/v1/admin/tasks/{args.name}/rounds/{args.round_id}/fail", json={"reason": args.reason}
        )
    if a == "upload-bundle":
        if not args.tarball.is_file():
            raise CliError(f"{args.tarball}: no such file")
        return client.post(
            f"/v1/admin/tasks/{args.name}/bundle",
            content=args.tarball.read_bytes(),
            headers={"Content-Type": "application/x-tar"},
        )
    raise CliError(a)  # pragma: no cover - argparse restricts the choices


def _enrollment_call(args: argparse.Namespace, client: httpx.Client) -> httpx.Response:
    a = args.enrollment_action
    if a == "mint":
        if args.out is not None and args.out.exists():
            raise CliError(f"{args.out} exists: the codes go to a new file only")
        body = {"count": args.count, "expires_in_seconds": args.expires_in, "device_class": args.device_class}
        return client.post("/v1/admin/enrollment-codes", json=body)
    if a == "list":
        params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
        return client.get("/v1/admin/enrollment-codes", params=params)
    if a == "revoke":
        return client.delete(f"/v1/admin/enrollment-codes/{args.code_id}")
    raise CliError(a)  # pragma: no cover - argparse restricts the choices


def _device_call(args: argparse.Namespace, client: httpx.Client) -> httpx.Response:
    if args.device_action == "revoke":
        return client.post(f"/v1/admin/devices/{args.device_id}/revoke")
    raise CliError(args.device_action)  # pragma: no cover - argparse restricts the choices


def _save_codes(path: Path, answer: dict[str, Any]) -> None:
    """Minted codes to a new owner-only file, one per line; only their ids stay in ``answer``."""
    codes = answer["codes"]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}; the minted codes are lost: revoke them") from None
    with os.fdopen(fd, "w") as f:
        f.writelines(c["code"] + "\n" for c in codes)
    for c in codes:
        del c["code"]
    answer["written_to"] = str(path)


def run(args: argparse.Namespace) -> None:
    """Dispatch ``fedkeys coordinator <action>``; raises CliError for user mistakes."""
    if args.action == "certs":
        from coordinator.security import make_dev_certs

        paths = make_dev_certs(args.out, args.host or ["localhost", "127.0.0.1"])
        sys.stdout.write(f"CA (give to devices): {paths.ca_cert}\nserver certificate: {paths.server_cert}\n")
    elif args.action == "serve":
        _serve(args)
    elif args.action == "migrate":
        from coordinator.config import Settings
        from coordinator.db.migrate import upgrade
        from coordinator.db.session import make_engine

        upgrade(make_engine(Settings().database_url))
        sys.stdout.write("database is at the latest schema\n")
    elif args.action in ("task", "enrollment", "device"):
        _admin(args)
