"""``fedkeys client ...``: the device's command line (enrol, run, status, local data, suggest)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from fedkeys.secret_args import add_secret_option, secret_value

__all__ = ["ClientError", "add_parser", "run"]

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A user mistake or a refused request: printed as one line, exit code 2."""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("FEDKEYS_CLIENT_DIR", str(Path(base) / "fedkeys")))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="the device agent and its local data")
    p.add_argument(
        "--state-dir", type=Path, default=_default_state_dir(), help="token, local messages, cached bundles"
    )
    s = p.add_subparsers(dest="action", required=True)

    def connection(q: argparse.ArgumentParser) -> None:
        q.add_argument("--coordinator", default=os.environ.get("FEDKEYS_URL"), help="https://host:8443")
        q.add_argument(
            "--ca", type=Path, default=None, help="CA certificate to pin (the coordinator's dev CA)"
        )
        add_secret_option(
            q,
            "enroll-secret",
            env="FEDKEYS_ENROLLMENT_SECRET",
            what="the device's one-time enrolment code (or a simulated fleet's secret)",
        )
        q.add_argument("--device-class", default="unknown", help="e.g. rpi4, phone (for population filters)")

    e = s.add_parser("enroll", help="enrol this device once (the token is stored 0600)")
    connection(e)
    r = s.add_parser("run", help="check in and take part in rounds until stopped (SIGTERM stops safely)")
    connection(r)
    r.add_argument("--provider", default="auto", choices=["auto", "linux", "termux", "static"])
    r.add_argument("--min-examples", type=int, default=20)
    r.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    r.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this long (a scheduled job: its start conditions are checked again next time)",
    )
    r.add_argument("--threads", type=int, default=1)
    r.add_argument(
        "--keep-program",
        action="store_true",
        help="keep train.pte loaded between rounds (faster rounds; ~45 MB more resident for the demo model)",
    )
    r.add_argument(
        "--no-weight-deltas",
        dest="weight_deltas",
        action="store_false",
        help="download whole weight vectors, not XOR deltas (more bytes down, a few MB less to decode)",
    )
    s.add_parser("status", help="enrolment, device conditions, local data, last rounds")
    a = s.add_parser("add-text", help="store one typed message locally")
    a.add_argument("text", nargs="+")
    i = s.add_parser("import", help="import messages: JSON lines ({'text', 'timestamp'}) or a text file")
    i.add_argument("file", type=Path)
    g = s.add_parser("suggest", help="next words from the newest predict.pte this device has")
    g.add_argument("-k", type=int, default=3)
    g.add_argument("text", nargs="+")


def _agent(args: argparse.Namespace, provider: Any = None) -> Any:
    from edge_client.agent import Agent, AgentConfig
    from edge_client.device_state import auto_provider

    saved = _saved(args.state_dir)
    url = getattr(args, "coordinator", None) or saved.get("coordinator")
    if not url:
        raise ClientError("pass --coordinator https://host:port (or set FEDKEYS_URL)")
    ca = getattr(args, "ca", None)
    if ca is not None and not ca.is_file():
        raise ClientError(f"{ca}: no such CA file")
    cfg = AgentConfig(
        coordinator=url,
        state_dir=args.state_dir,
        ca=ca or (args.state_dir / "ca.pem" if (args.state_dir / "ca.pem").exists() else None),
        enroll_secret=secret_value(args, "enroll-secret", env="FEDKEYS_ENROLLMENT_SECRET"),
        device_class=getattr(args, "device_class", "unknown"),
        min_examples=getattr(args, "min_examples", 20),
        threads=getattr(args, "threads", 1),
        keep_program=getattr(args, "keep_program", False),
        drop_codec_caches=True,  # one device per process: nothing to share between rounds
        weight_deltas=getattr(args, "weight_deltas", True),
    )
    if ca is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        (args.state_dir / "ca.pem").write_bytes(ca.read_bytes())
    return Agent(cfg, provider or auto_provider(getattr(args, "provider", "auto")))


def _saved(state_dir: Path) -> dict[str, Any]:
    try:
        out: dict[str, Any] = json.loads((state_dir / "device.json").read_text())
        return out
    except (OSError, ValueError):
        return {}


def _store(args: argparse.Namespace) -> Any:
    from edge_client.datastore import DataStore

    return DataStore(args.state_dir / "messages.db")


def run(args: argparse.Namespace) -> None:
    from edge_client.agent import NotEnrolled
    from edge_client.datastore import ImportError_
    from edge_client.transport import ApiError, TransportError

    try:
        _run(args)
    except (NotEnrolled, ImportError_) as e:
        raise ClientError(str(e)) from None
    except ApiError as e:
        raise ClientError(f"coordinator refused: {e}") from None
    except TransportError as e:
        raise ClientError(str(e)) from None


def _require_executorch() -> None:
    """No ExecuTorch runtime: refuse, saying how to install it (edge_client/install_check.py)."""
    from edge_client.install_check import executorch_problem

    missing = executorch_problem()
    if missing is not None:
        raise ClientError(missing)


def _check_install() -> None:
    """No ExecuTorch runtime, or a CUDA build of torch: refuse to start, saying how to fix it
    (edge_client/install_check.py)."""
    from edge_client.install_check import allowed_anyway, cuda_build_problem

    _require_executorch()
    import torch

    problem = cuda_build_problem(torch.version.cuda, torch.__version__)
    if problem is None:
        return
    if not allowed_anyway():
        raise ClientError(problem)
    log.warning("%s", problem.splitlines()[0])


def _run(args: argparse.Namespace) -> None:
    out = sys.stdout
    if args.action == "enroll":
        with _agent(args) as agent:
            out.write(f"enrolled as {agent.enroll()}\n")
    elif args.action == "run":
        from edge_client.memory import defer_torch_registrations, tune_allocator

        # A long-running device process: small resident memory matters more than anything torch
        # would need for tracing or compiling (which a device never does).
        tune_allocator()
        defer_torch_registrations()
        _check_install()
        if args.max_minutes is not None and not 0 < args.max_minutes < math.inf:
            raise ClientError("--max-minutes must be a positive number")
        agent = _agent(args)
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        signal.signal(signal.SIGINT, lambda *_: agent.stop())
        limit = math.inf if args.max_minutes is None else 60.0 * args.max_minutes
        with agent:
            agent.run(max_rounds=args.rounds, max_seconds=limit)
    elif args.action == "status":
        store = _store(args)
        saved = _saved(args.state_dir)
        from edge_client.device_state import auto_provider
        from edge_client.records import RoundHistory

        c = auto_provider().read()
        history = RoundHistory(args.state_dir / "history.jsonl").recent(10)
        out.write(
            json.dumps(
                {
                    "enrolled": bool(saved.get("token")),
                    "device_id": saved.get("device_id"),
                    "coordinator": saved.get("coordinator"),
                    "conditions": {
                        "charging": c.charging,
                        "idle": c.idle,
                        "unmetered": c.unmetered,
                        "battery_pct": c.battery_pct,
                        "eligible": c.eligible,
                        "source": c.source,
                        "notes": list(c.notes),
                    },
                    "local_data": store.counts(),
                    "recent_rounds": history,
                },
                indent=2,
            )
            + "\n"
        )
    elif args.action == "add-text":
        n = _store(args).add([" ".join(args.text)])
        out.write(f"stored {n} message\n")
    elif args.action == "import":
        n = _store(args).import_file(args.file)
        out.write(f"stored {n} messages\n")
    elif args.action == "suggest":
        _suggest(args)


def _suggest(args: argparse.Namespace) -> None:
    _require_executorch()
    from edge_client.runtime import Predictor
    from protocol.bundle import load_bundle

    if args.k <= 0:
        raise ClientError("-k must be positive")
    bundles = sorted((args.state_dir / "bundles").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not bundles:
        raise ClientError(
            "no model on this device yet: run `fedkeys client run` until it takes part in a round"
        )
    bundle = load_bundle(bundles[-1].parent)
    programs = sorted((args.state_dir / "programs").glob("*.pte"), key=lambda p: p.stat().st_mtime)
    predictor = Predictor.from_bundle(bundle, programs[-1] if programs else None)
    for s in predictor.suggest(" ".join(args.text), args.k):
        sys.stdout.write(f"{s.word}\t{s.logprob:.3f}\n")
