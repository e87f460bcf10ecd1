"""``fedkeys coordinator ...``: certificates, serving, migrations, and the admin API client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


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
    t.add_argument("--url", default=os.environ.get("FEDKEYS_URL", "https://127.0.0.1:8443"))
    t.add_argument("--ca", type=Path, default=None, help="CA certificate to trust (the dev CA)")
    t.add_argument("--admin-token", default=None, help="default: $FEDKEYS_ADMIN_TOKEN")
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
    if not settings.enrollment_secret.get_secret_value() or not settings.admin_token.get_secret_value():
        raise CliError("set FEDKEYS_ENROLLMENT_SECRET and FEDKEYS_ADMIN_TOKEN")
    uvicorn.run(
        "coordinator.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        **ssl,
    )


def _admin(args: argparse.Namespace) -> None:
    import httpx

    token = args.admin_token or os.environ.get("FEDKEYS_ADMIN_TOKEN", "")
    if not token:
        raise CliError("pass --admin-token or set FEDKEYS_ADMIN_TOKEN")
    verify: Any = str(args.ca) if args.ca else True
    a = args.task_action
    with httpx.Client(
        base_url=args.url, verify=verify, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as client:
        try:
            if a == "create":
                r = client.post(
                    "/v1/admin/tasks",
                    json={"name": args.name, "config": _config(args.config, args.set)},
                )
            elif a == "update":
                current = client.get(f"/v1/admin/tasks/{args.name}")
                if current.status_code != 200:
                    r = current
                else:
                    cfg = _config(args.config, args.set, current.json()["config"])
                    r = client.put(f"/v1/admin/tasks/{args.name}", json={"config": cfg})
            elif a in ("start", "pause"):
                r = client.post(f"/v1/admin/tasks/{args.name}/{a}")
            elif a == "show":
                r = client.get(f"/v1/admin/tasks/{args.name}")
            elif a == "list":
                r = client.get("/v1/admin/tasks")
            elif a in ("rounds", "versions"):
                r = client.get(f"/v1/admin/tasks/{args.name}/{a}")
            elif a == "rollback":
                r = client.post(f"/v1/admin/tasks/{args.name}/rollback", json={"version": args.version})
            elif a == "upload-bundle":
                if not args.tarball.is_file():
                    raise CliError(f"{args.tarball}: no such file")
                r = client.post(
                    f"/v1/admin/tasks/{args.name}/bundle",
                    content=args.tarball.read_bytes(),
                    headers={"Content-Type": "application/x-tar"},
                )
            else:  # pragma: no cover - argparse restricts the choices
                raise CliError(a)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach {args.url}: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise CliError(f"{r.status_code}: {detail}")
    sys.stdout.write(json.dumps(r.json(), indent=2) + "\n")


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
    elif args.action == "task":
        _admin(args)
