"""The ``fedkeys`` command: one entry point, a sub-command per part.

Imports are lazy so that a device (``fedkeys[client]``) never imports the coordinator's or the
exporter's dependencies. A user's mistake exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_export.evaluate import EvalResult

__all__ = ["main"]


class UsageError(Exception):
    """A mistake in what the user asked for: printed without a traceback, exit code 2."""


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="build and evaluate model bundles")
    s = p.add_subparsers(dest="action", required=True)
    b = s.add_parser("build", help="tokenizer, teacher, distilled student, ExecuTorch bundle, evaluation")
    b.add_argument("--profile", default="demo", help="tiny | demo | full (default: demo)")
    b.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    b.add_argument("--work", type=Path, default=None, help="cache of trained models (default: OUT/../work)")
    b.add_argument("--corpus", default=None, help="chitchat (default), a .jsonl file or a folder of texts")
    b.add_argument("--no-eval", action="store_true", help="skip the evaluation on heldout users")
    b.add_argument(
        "--student",
        type=Path,
        default=None,
        help="export a shipped student (e.g. models/demo) instead of training one (model_export.shipped)",
    )
    b.add_argument(
        "--save-student",
        type=Path,
        default=None,
        help="ship the trained student and tokenizer to this folder",
    )
    e = s.add_parser("evaluate", help="evaluate a bundle's predict.pte on heldout users")
    e.add_argument("--bundle", type=Path, required=True)
    e.add_argument("--corpus", default=None)
    e.add_argument("--messages", type=int, default=None, help="heldout messages to evaluate")


def _add_suggest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("suggest", help="next-word suggestions from a bundle's predict.pte")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("-k", type=int, default=3, help="number of suggestions")
    p.add_argument("text", nargs="+", help="what was typed so far (a trailing space means 'next word')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkeys", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_suggest(sub)
    from coordinator.cli import add_parser as add_coordinator
    from edge_client.cli import add_parser as add_client
    from simulator.cli import add_parser as add_simulate

    add_coordinator(sub)
    add_client(sub)
    add_simulate(sub)
    return parser


def _export_build(args: argparse.Namespace) -> None:
    from model_export.console import console, rich_progress
    from model_export.pipeline import build
    from model_export.profiles import get_profile

    try:
        profile = get_profile(args.profile)
    except ValueError as e:
        raise UsageError(str(e)) from None
    work = args.work or args.out.parent / "work"
    with rich_progress() as progress:
        result = build(
            profile,
            args.out,
            work,
            args.corpus,
            progress,
            evaluate=not args.no_eval,
            student_from=args.student,
            save_student_to=args.save_student,
            command=_build_command(args),
        )
    _print_eval(result.table)
    console.print(f"bundle: {result.bundle.root} (built in {result.seconds:.0f} s)")


def _build_command(args: argparse.Namespace) -> str:
    """The build as a command line (a shipped student's provenance records it)."""
    parts = ["fedkeys export build", f"--profile {args.profile}", f"--out {args.out}"]
    parts += [f"--{k} {v}" for k, v in (("work", args.work), ("corpus", args.corpus)) if v is not None]
    return " ".join(parts + (["--no-eval"] if args.no_eval else []) + [f"--save-student {args.save_student}"])


def _print_eval(rows: Sequence[EvalResult]) -> None:
    from model_export.console import print_table

    if rows:
        print_table(
            "Next-word prediction on heldout users",
            ["model", "top-1", "top-3", "KSR", "ppl/word", "ppl/piece", "words", "ms/suggestion"],
            [
                [
                    r.name,
                    r.top1,
                    r.top3,
                    r.ksr,
                    r.ppl_word,
                    r.ppl_token,
                    r.words,
                    r.ms_per_suggestion,
                ]
                for r in rows
            ],
        )


def _export_evaluate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from model_export.console import rich_progress
    from model_export.data import load_corpus, split_corpus
    from model_export.pipeline import evaluate_bundle
    from model_export.profiles import PROFILES, get_profile
    from protocol.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    profile = PROFILES.get(bundle.manifest.profile) or get_profile("demo")
    if args.messages is not None:
        if args.messages <= 0:
            raise UsageError("--messages must be positive")
        profile = replace(profile, eval_messages=args.messages, ksr_messages=max(1, args.messages // 6))
    heldout = split_corpus(load_corpus(args.corpus))["heldout"]
    if not heldout:
        raise UsageError("the corpus has no heldout users")
    with rich_progress() as progress:
        row = evaluate_bundle(bundle, heldout, profile, progress)
    _print_eval([row])


def _suggest(args: argparse.Namespace) -> None:
    from edge_client.runtime import Predictor
    from model_export.console import console
    from protocol.bundle import load_bundle

    if args.k <= 0:
        raise UsageError("-k must be positive")
    predictor = Predictor.from_bundle(load_bundle(args.bundle))
    for s in predictor.suggest(" ".join(args.text), args.k):
        console.print(f"{s.word}\t{s.logprob:.3f}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from edge_client.native import NATIVE_LOGS_ENV, quiet_python_logs

    if args.verbose:  # children (export, evaluation, simulator workers) show theirs too
        os.environ[NATIVE_LOGS_ENV] = "1"
    elif args.command != "coordinator":  # third-party import chatter of the torch commands
        quiet_python_logs()
    from coordinator.cli import CliError
    from edge_client.cli import ClientError
    from protocol.bundle import BundleError

    handlers = {
        ("export", "build"): _export_build,
        ("export", "evaluate"): _export_evaluate,
        ("suggest", None): _suggest,
    }
    if args.command == "coordinator":
        from coordinator.cli import run as handler
    elif args.command == "client":
        from edge_client.cli import run as handler
    elif args.command == "simulate":
        from simulator.cli import run as handler
    else:
        handler = handlers[(args.command, getattr(args, "action", None))]
    from fedkeys.secret_args import SecretError
    from simulator.cli import SimError

    user_errors: tuple[type[Exception], ...] = (
        UsageError,
        BundleError,
        CliError,
        ClientError,
        SimError,
        SecretError,  # a secret file that cannot be read
    )
    if args.command == "export":
        from model_export.data import CorpusError

        user_errors += (CorpusError,)
    # SIGTERM (a supervisor, `kill`) unwinds like Ctrl-C, so coordinators and simulated
    # fleets started by a command are stopped with it; `client run` installs its own handler.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        handler(args)
    except user_errors as e:
        print(f"fedkeys: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedkeys: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # main() called in-process (tests) leaves the handler as it was
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
