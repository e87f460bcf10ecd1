"""``fedkeys simulate``: a device fleet against a real coordinator, with a report."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedkeys.secret_args import add_secret_option, secret_value

__all__ = ["SimError", "add_parser", "run", "verdict"]

ROOT = Path(__file__).resolve().parents[1]


class SimError(Exception):
    """A user mistake (bad arguments, unreachable coordinator): one line, exit code 2."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="simulate a device fleet against a real coordinator")
    p.add_argument("--devices", type=int, default=None, help="fleet size (300)")
    p.add_argument(
        "--per-round", type=int, default=None, help="reports that close a round (K; 30, --population 100)"
    )
    p.add_argument("--rounds", type=int, default=None, help="15 (--population 12)")
    p.add_argument("--quick", action="store_true", help="a first look: 30 devices, 6 per round, 8 rounds")
    p.add_argument(
        "--population",
        action="store_true",
        help="every participant of the corpus's federated split is one device (ignores --devices)",
    )
    p.add_argument(
        "--corpus",
        default=None,
        metavar="FILE.jsonl|DIR",
        help="simulate this corpus's participants (as `fedkeys export build --corpus` reads it; chitchat)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="pretrained vs FL float32 vs FL compressed+secure vs central vs trigram",
    )
    p.add_argument(
        "--no-float32",
        action="store_true",
        help="with --compare: leave out the float32 federated run (and the secure row's gap to it)",
    )
    p.add_argument(
        "--bundle", type=Path, default=ROOT / "artifacts/demo/bundle", help="built if missing (demo profile)"
    )
    p.add_argument(
        "--privacy", choices=["off", "central", "distributed"], default=None, help="differential privacy mode"
    )
    p.add_argument("--target-epsilon", type=float, default=None, help="budget; delta = 1/devices^1.1")
    p.add_argument("--noise-multiplier", type=float, default=None)
    p.add_argument("--adaptive-clip", action="store_true", help="quantile-based adaptive clipping")
    p.add_argument(
        "--privacy-sweep",
        default=None,
        metavar="EPSILONS",
        help="accuracy against epsilon, e.g. 1,3,8,inf (mode from --privacy, default distributed)",
    )
    p.add_argument(
        "--strategy", choices=["random", "least-recent", "oort"], default=None, help="client selection"
    )
    p.add_argument(
        "--selection-compare",
        default=None,
        metavar="STRATEGIES",
        help="time to accuracy per selection strategy, e.g. random,least-recent,oort",
    )
    p.add_argument(
        "--speed-spread", type=float, default=None, help="sigma of log device speed (0.5; 1.0 = 5x tail)"
    )
    p.add_argument("--target-top1", type=float, default=None, help="accuracy target of --selection-compare")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts/sim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-secagg", action="store_true")
    p.add_argument("--no-compress", action="store_true", help="plain float32 updates (implies --no-secagg)")
    p.add_argument("--keep-fraction", type=float, default=None)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument(
        "--weight-cap",
        type=int,
        default=None,
        help="example count at which a device's weight saturates (16; --population 128)",
    )
    p.add_argument("--local-steps", type=int, default=None, help="cap on a round's local steps")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="passes over a round's messages (2; 0: until the step cap)",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="server optimizer's learning rate (3e-3, --population 1e-2)",
    )
    p.add_argument(
        "--server-schedule",
        choices=["constant", "cosine"],
        default=None,
        help="the server step over the run's rounds (cosine: from --server-lr down to a tenth)",
    )
    p.add_argument("--client-lr", type=float, default=None, help="devices' learning rate (0.1)")
    p.add_argument("--max-examples", type=int, default=None, help="messages a device draws per round (400)")
    p.add_argument(
        "--min-examples", type=int, default=None, help="messages a device needs before it volunteers (20)"
    )
    p.add_argument(
        "--dropout", type=float, default=None, help="probability a selected device drops (default 0.08)"
    )
    p.add_argument("--day-seconds", type=float, default=None, help="real seconds per simulated day")
    p.add_argument("--start-hour", type=float, default=None, help="simulated time of day at the start (23)")
    p.add_argument("--eval-every", type=int, default=None, help="heldout evaluation every N versions (5)")
    p.add_argument(
        "--eval-messages",
        type=int,
        default=None,
        help="heldout messages of each evaluation over rounds (300)",
    )
    p.add_argument(
        "--final-messages",
        type=int,
        default=None,
        help="heldout messages that score the pretrained and the last version at the end (2000)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="worker processes (default: max(cores, devices / 128))"
    )
    p.add_argument("--ray", action="store_true", help="run the fleet as tasks on a local Ray")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (ray://host:10001)")
    p.add_argument("--noop-training", action="store_true", help="skip local training (overhead benchmark)")
    p.add_argument(
        "--native-logs",
        action="store_true",
        help="show the ExecuTorch runtime's native log lines and torch's warnings (else kept in OUT/logs)",
    )
    p.add_argument(
        "--central-tokens",
        type=int,
        default=None,
        help="central fine-tune's training tokens (--compare; default: as many as the federated run's)",
    )
    p.add_argument("--coordinator", default=None, help="use this coordinator instead of starting one")
    p.add_argument("--ca", type=Path, default=None)
    for name, env, what in (
        ("admin-token", "FEDKEYS_ADMIN_TOKEN", "the --coordinator's admin token"),
        ("enroll-secret", "FEDKEYS_ENROLLMENT_SECRET", "the --coordinator's fleet enrolment secret"),
    ):
        add_secret_option(p, name, env=env, what=what, legacy_flag=False)
    p.add_argument("--forever", action="store_true", help="only run the fleet (tasks are made by the admin)")


def _config(args: argparse.Namespace) -> Any:
    from simulator.config import SimConfig, population, quick

    cfg = SimConfig(seed=args.seed, workers=args.workers)
    if args.devices is not None:
        cfg = replace(cfg, devices=args.devices)
    if args.quick:
        cfg = quick(cfg)
    if args.population:  # devices: the corpus's federated participants (_fleet)
        cfg = population(cfg, per_round=args.per_round, rounds=args.rounds)
    else:
        for attr in ("per_round", "rounds"):
            if getattr(args, attr) is not None:
                cfg = replace(cfg, **{attr: getattr(args, attr)})
    if args.corpus is not None:
        cfg = replace(cfg, corpus=str(args.corpus))
    if args.no_compress:
        cfg = replace(cfg.with_codec(compress=False), secagg=False, name="fl-float32")
    elif args.no_secagg:
        cfg = replace(cfg, secagg=False, name="fl-compressed")
    from pydantic import ValidationError

    for flag in ("keep_fraction", "bits", "weight_cap"):
        if getattr(args, flag) is not None:
            try:
                cfg = cfg.with_codec(**{flag: getattr(args, flag)})
            except ValidationError as e:
                raise SimError(f"--{flag.replace('_', '-')}: {e.errors()[0]['msg']}") from None
    for attr in (
        "local_steps",
        "local_epochs",
        "max_examples",
        "min_examples",
        "dropout",
        "day_seconds",
        "start_hour",
        "eval_every",
        "eval_messages",
        "final_messages",
        "server_lr",
        "server_schedule",
        "client_lr",
    ):
        if getattr(args, attr) is not None:
            cfg = replace(cfg, **{attr: getattr(args, attr)})
    for attr in ("local_steps", "max_examples", "min_examples"):
        if getattr(args, attr) is not None and getattr(args, attr) < 1:
            raise SimError(f"--{attr.replace('_', '-')} must be at least 1")
    if args.local_epochs is not None:
        if args.local_epochs < 0:
            raise SimError("--local-epochs must be at least 0 (0: as many passes as the step cap allows)")
        cfg = replace(cfg, local_epochs=args.local_epochs or None)
    for attr in ("server_lr", "client_lr"):
        if getattr(args, attr) is not None and not 0 < getattr(args, attr) <= 10:
            raise SimError(f"--{attr.replace('_', '-')} must be in (0, 10]")
    if args.privacy_sweep is not None:
        cfg = replace(cfg, privacy=args.privacy or "distributed", adaptive_clip=args.adaptive_clip)
        if cfg.privacy == "off":
            raise SimError("--privacy-sweep needs --privacy central or distributed")
        if args.compare:
            raise SimError("--privacy-sweep and --compare are separate runs: pick one")
    elif args.privacy not in (None, "off"):
        if args.target_epsilon is None and args.noise_multiplier is None:
            raise SimError("--privacy needs --target-epsilon or --noise-multiplier")
        cfg = replace(
            cfg.with_codec(weight_cap=1),
            privacy=args.privacy,
            target_epsilon=args.target_epsilon,
            noise_multiplier=args.noise_multiplier,
            adaptive_clip=args.adaptive_clip,
            name=f"fl-{args.privacy}-dp",
        )
    if args.no_float32 and not args.compare:
        raise SimError("--no-float32 leaves a row out of --compare: use it with --compare")
    if args.speed_spread is not None:
        if not 0 <= args.speed_spread <= 3:
            raise SimError("--speed-spread must be in [0, 3]")
        cfg = replace(cfg, speed_sigma=args.speed_spread)
    if args.strategy is not None:
        cfg = replace(cfg, selection=args.strategy)
    if args.selection_compare is not None and (args.compare or args.privacy_sweep is not None):
        raise SimError("--selection-compare runs on its own: drop --compare / --privacy-sweep")
    if args.target_top1 is not None and not 0 < args.target_top1 < 1:
        raise SimError("--target-top1 is a fraction in (0, 1), e.g. 0.171")
    if args.noop_training:
        cfg = replace(cfg, noop_training=True, name="noop")
    if args.ray or args.ray_address:
        cfg = replace(cfg, ray_address=args.ray_address or "local")
    if args.start_hour is not None and not 0 <= args.start_hour < 24:
        raise SimError("--start-hour is a time of day in [0, 24)")
    if cfg.per_round > cfg.devices and not args.population:
        raise SimError("--per-round cannot exceed --devices")
    if cfg.devices < 2 or cfg.rounds < 1:
        raise SimError("need at least 2 devices and 1 round")
    if cfg.eval_every < 1 or cfg.eval_messages < 1 or cfg.final_messages < 1:
        raise SimError("--eval-every, --eval-messages and --final-messages must be positive")
    # what the coordinator would refuse (e.g. a weight cap whose sums overflow the ring), in
    # every task the run creates
    try:
        for task in _task_runs(cfg, args):
            task.task_config()
    except ValidationError as e:
        raise SimError(f"the task's settings: {e.errors()[0]['msg']}") from None
    return cfg


def _task_runs(cfg: Any, args: argparse.Namespace) -> list[Any]:
    """The configurations of the tasks the run creates: a privacy sweep's are its runs (weights
    capped at 1, one epsilon each), not its base configuration, which has no epsilon."""
    if args.privacy_sweep is None:
        return [cfg]
    return [cfg.privacy_run(e) for e in _epsilons(args.privacy_sweep)]


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SimError(
            f"--privacy-sweep takes numbers separated by commas (inf allowed), got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise SimError("--privacy-sweep needs positive epsilons")
    return values


def _strategies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ("random", "least-recent", "oort")]
    if not names or bad:
        raise SimError(
            f"--selection-compare takes random, least-recent, oort (comma-separated), not {text!r}"
        )
    return names


def _fleet(cfg: Any, bundle: Path) -> tuple[Any, dict[str, list[str]]]:
    """The run's participants from ``cfg.corpus`` (checked: readable, with federated and heldout
    participants), and ``cfg`` with the population's size for ``--population``. Before the
    bundle is built: a bad corpus costs nothing."""
    from model_export.data import CorpusError
    from simulator.evaluation import draw_heldout
    from simulator.fleet import FleetError, fleet_users, make_specs

    name = cfg.corpus or "chitchat"
    try:
        users = fleet_users(cfg.corpus)
        draw_heldout(1, cfg.seed, cfg.corpus)
    except UnicodeDecodeError as e:
        raise SimError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SimError(f"{name}: cannot be read ({e.strerror or e})") from None
    except (CorpusError, FleetError) as e:
        raise SimError(str(e)) from None
    except ValueError as e:  # draw_heldout: no heldout participant with a message
        raise SimError(f"{name}: {e}") from None
    if cfg.corpus is not None and not (bundle / "manifest.json").exists():
        raise SimError(
            f"no bundle at {bundle}: build one for this corpus first "
            f"(fedkeys export build --corpus {cfg.corpus} --out {bundle})"
        )
    if cfg.population:
        cfg = replace(cfg, devices=len(users))
        if cfg.per_round > cfg.devices:
            raise SimError(f"--per-round {cfg.per_round} exceeds the {cfg.devices} participants of {name}")
        if cfg.devices < 2:
            raise SimError(f"{name}: a fleet needs at least 2 federated participants, it has {cfg.devices}")
    else:
        try:
            make_specs(users, cfg.devices, cfg.seed)
        except FleetError as e:
            raise SimError(f"{name}: {e}") from None
    return cfg, users


def _ready_devices(cfg: Any, users: dict[str, list[str]] | None) -> list[int]:
    """Indices of the devices with enough messages to volunteer (``availability_note``)."""
    if users is None or not cfg.population:  # make_specs draws people with 25 messages or more
        return list(range(cfg.devices))
    from simulator.fleet import population_specs

    return [s.index for s in population_specs(users, cfg.seed) if len(s.texts) >= cfg.min_examples]


def _check_tokenizer(bundle: Path, users: dict[str, list[str]]) -> None:
    from simulator.fleet import FleetError, check_tokenizer

    try:
        check_tokenizer(bundle, users)
    except FleetError as e:
        raise SimError(str(e)) from None


def _console_logs(show: bool) -> None:
    """The ExecuTorch runtime's native lines and torch's warnings: kept off the console (the
    fleet's worker processes write them to OUT/logs), or shown with ``--native-logs``
    (``FEDKEYS_NATIVE_LOGS=1``, inherited by the workers)."""
    import logging

    import torch  # noqa: F401 - its import sets its loggers' levels: set ours after it

    from edge_client.native import NATIVE_LOGS_ENV

    if show:
        os.environ[NATIVE_LOGS_ENV] = "1"
    for noisy in ("torch", "torchao", "executorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING if show else logging.ERROR)


def _bundle(path: Path) -> Path:
    if (path / "manifest.json").exists():
        return path
    from model_export.console import console, rich_progress
    from model_export.pipeline import build
    from model_export.profiles import get_profile

    console.print(f"no bundle at {path}: building the demo profile (cached afterwards)")
    with rich_progress() as progress:
        build(get_profile("demo"), path, path.parent.parent / "work", progress=progress)
    return path


def _dense_ratio(bundle: Path, upload: float | None) -> float:
    """How many times smaller a device's upload was than a dense float32 update."""
    from protocol.bundle import load_bundle

    dense = 4 * load_bundle(bundle).manifest.train.layout.size
    return dense / upload if upload else float("nan")


def _printer() -> Any:
    from model_export.console import console

    def show(ev: dict[str, Any]) -> None:
        if ev["event"] == "round":
            dropped = sum(ev.get("dropped", {}).values())
            h = ev["sim_hour"]
            console.print(
                f"round {ev['round']:>3} {ev['outcome']:<9} selected {ev['selected']:>3} "
                f"reported {ev['reported']:>3} dropped {dropped:>2}  {ev['wall_seconds']:>6.1f} s  "
                f"sim {int(h):02d}:{int(h % 1 * 60):02d}"
                + (
                    f"  -> v{ev['new_version']}"
                    if ev.get("new_version")
                    else f"  ({ev.get('failure') or ''})"
                )
            )
        elif ev["event"] == "eval":
            ppl = f"  perplexity/piece {ev['ppl_piece']:.1f}" if ev.get("ppl_piece") else ""
            top = f"top-1 {100 * ev['top1']:.2f}%  top-3 {100 * ev['top3']:.2f}%"
            console.print(f"  heldout v{ev['version']}: {top}{ppl}")
        elif ev["event"] == "central":
            console.print(
                f"central upper bound: fine-tuning the student on the fleet's messages ({ev['steps']})"
            )

    return show


def verdict(evals: dict[int, dict[str, Any]], seed: int = 0) -> str | None:
    """What a run's heldout evaluations say, in one sentence: the last evaluated version's top-1
    against the pretrained student's (version 0) with its paired 95% interval over the heldout
    messages, and whether that separates a lift from the noise of the sample (None before any
    version was evaluated)."""
    from model_export.evaluate import MessageHits
    from model_export.stats import paired_bootstrap

    last = max(evals)
    a, b = evals[last].get("per_message"), evals[0].get("per_message")
    if last == 0 or not (isinstance(a, MessageHits) and isinstance(b, MessageHits)):
        return None
    i = paired_bootstrap(a.top1, b.top1, a.words, seed=seed)
    ppl = [evals[v].get("ppl_piece") for v in (0, last)]
    change = (
        f"top-1 {100 * i.estimate:+.2f} points [95% CI {100 * i.low:+.2f}, {100 * i.high:+.2f}] "
        f"after {last} versions on {len(a)} heldout messages"
        + (f", perplexity/piece {ppl[0]:.1f} -> {ppl[1]:.1f}" if all(ppl) else "")
    )
    if i.low > 0:
        return f"federated training improved the pretrained student: {change}"
    if i.high < 0:
        return f"federated training made the pretrained student worse: {change}"
    return (
        f"no lift beyond the noise yet: {change}; the interval spans zero (more rounds, more "
        "devices per round or --population move the model further; --final-messages narrows the interval)"
    )


def final_evals(
    res: Any, bundle: Path, sample: Any, pretrained: dict[str, Any] | None = None
) -> dict[int, dict[str, Any]]:
    """The pretrained student (version 0) and the run's last version scored on the whole final
    ``sample`` (a :class:`simulator.evaluation.HeldoutSample`); the run's own evaluations (its
    curve) are reused when they were on the same messages, and ``pretrained`` (the student
    scored on ``sample`` while the run went on) when given."""
    from simulator.evaluation import VersionEvaluator

    last = max(res.evals)
    if res.evals[0].get("sample") == sample.fingerprint or res.final_weights is None:
        return {0: res.evals[0], last: res.evals[last]}
    evaluator = VersionEvaluator(bundle, sample.texts)
    return {0: pretrained or evaluator.pretrained(), last: evaluator.eager(res.final_weights)}


def run(args: argparse.Namespace) -> None:
    from coordinator.launch import CoordinatorHandle
    from model_export.console import console, print_table
    from simulator.report import write_report
    from simulator.run import local_coordinator, run_simulation

    cfg = _config(args)
    users: dict[str, list[str]] | None = None
    if cfg.corpus is not None or cfg.population:
        cfg, users = _fleet(cfg, args.bundle)
    _console_logs(args.native_logs)
    if args.forever:
        _fleet_only(args, cfg)
        return
    # Every argument is checked before the (possibly long) bundle build: a typo costs nothing.
    strategies = _strategies(args.selection_compare) if args.selection_compare is not None else []
    epsilons = _epsilons(args.privacy_sweep) if args.privacy_sweep is not None else []
    tasks = _task_runs(cfg, args)
    external = _external_coordinator(args)
    bundle = _bundle(args.bundle)
    if users is not None:
        _check_tokenizer(bundle, users)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    show = _printer()
    t0 = time.time()
    from simulator.fleet import availability_note

    if cfg.population:
        console.print(
            f"population: {cfg.devices} devices, every federated participant of {cfg.corpus or 'chitchat'}"
        )
    note = availability_note(tasks[0], _ready_devices(cfg, users))
    if note is not None:
        console.print(f"[yellow]note:[/yellow] {note}")

    def go(coord: CoordinatorHandle) -> None:
        privacy_rows = None
        said: str | None = None
        final_sample: dict[str, Any] = {}
        time_plot = False
        if args.selection_compare is not None:
            from simulator.compare import selection_compare

            runs, rows, baselines = selection_compare(
                cfg, bundle, out, coord, strategies, args.target_top1, show
            )
            time_plot = True
        elif args.privacy_sweep is not None:
            from simulator.compare import privacy_sweep

            runs, rows, baselines = privacy_sweep(cfg, bundle, out, coord, epsilons, show)
            privacy_rows = rows
        elif args.compare:
            from simulator.compare import compare

            runs, rows, baselines = compare(
                cfg, bundle, out, coord, show, args.central_tokens, float32=not args.no_float32
            )
        else:
            from simulator.compare import subsample_top1, trigram_rows
            from simulator.evaluation import Background, VersionEvaluator, draw_heldout

            sample = draw_heldout(cfg.final_messages, cfg.seed, cfg.corpus)
            curve_idx = sample.head_indices(min(cfg.eval_messages, len(sample.texts)))
            curve = [sample.texts[i] for i in curve_idx]
            # what does not depend on the run is scored beside it, on the CPU its devices leave
            # (the pretrained student only when the curve's messages are not the whole sample)
            pre = (
                Background(lambda: VersionEvaluator(bundle, sample.texts).pretrained(), "score pretrained")
                if len(curve) < len(sample.texts)
                else None
            )
            tri = Background(lambda: trigram_rows(cfg, list(sample.texts)), "trigram baselines")
            res = run_simulation(cfg, bundle, out, coord, heldout=curve, progress=show)
            runs = [res]
            s = res.summary()
            console.print(f"scoring the last version on {len(sample.texts):,} heldout messages")
            ends = final_evals(res, bundle, sample, pre.result() if pre is not None else None)
            start, end = ends[0], ends[max(ends)]
            trigrams = tri.result()
            rows = [
                {"configuration": "pretrained student (no FL)", "top1": start["top1"], "top3": start["top3"]},
                {
                    "configuration": cfg.name,
                    "top1": end["top1"],
                    "top3": end["top3"],
                    # the device's int8 program against the float weights, on the curve's messages
                    f"int8 - float top1 ({len(curve):,} msgs)": (
                        s["final_int8_top1"] - s["top1_final"]
                        if s["final_int8_top1"] is not None and s["top1_final"] is not None
                        else ""
                    ),
                    "upload kB/device": (s["upload_bytes_per_device"] or 0) / 1e3,
                    "upload vs dense fp32": _dense_ratio(bundle, s["upload_bytes_per_device"]),
                    **({"epsilon": s["epsilon"], "delta": s["delta"]} if s["epsilon"] is not None else {}),
                    "rounds": s["rounds_committed"],
                    "round s (median)": s["round_seconds_median"],
                },
                *({"configuration": k, "top1": v["top1"], "top3": v["top3"]} for k, v in trigrams.items()),
            ]
            baselines = {
                "pretrained": res.evals[0]["top1"],
                **{k: subsample_top1(v["per_message"], curve_idx) for k, v in trigrams.items()},
            }
            said = verdict(ends, cfg.seed)
            final_sample = {"messages": len(sample.texts), "fingerprint": sample.fingerprint}
        cols = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{k: r.get(k, "") for k in cols} for r in rows]
        print_table("Simulation summary", cols, [[r[c] for c in cols] for r in rows])
        path = write_report(
            runs,
            out,
            summary_rows=rows,
            baselines=baselines,
            title=f"fedkeys simulation: {cfg.devices} devices, {cfg.per_round} per round",
            privacy_rows=privacy_rows,
            time_plot=time_plot,
        )
        (out / "summary.json").write_text(
            json.dumps(
                {"rows": rows, "final_sample": final_sample, "minutes": (time.time() - t0) / 60},
                indent=2,
                default=str,
            )
        )
        if said is not None:
            console.print(said)
        console.print(f"report: {path}  ({(time.time() - t0) / 60:.1f} min)")
        if (out / "logs").is_dir():
            console.print(f"device and runtime logs: {out / 'logs'}")

    if external is not None:
        go(external)
    else:
        with local_coordinator(out / "coordinator") as coord:
            go(coord)


def _external_coordinator(args: argparse.Namespace) -> Any:
    """The coordinator given by ``--coordinator`` (checked up front), or None to start one."""
    if not args.coordinator:
        return None
    from coordinator.launch import CoordinatorHandle

    if args.ca is None:
        raise SimError("--coordinator needs --ca (the CA that signed its certificate)")
    admin = secret_value(args, "admin-token", env="FEDKEYS_ADMIN_TOKEN")
    secret = secret_value(args, "enroll-secret", env="FEDKEYS_ENROLLMENT_SECRET")
    if not admin or not secret:
        raise SimError(
            "--coordinator needs its admin token and fleet secret: --admin-token-file and "
            "--enroll-secret-file, or FEDKEYS_ADMIN_TOKEN and FEDKEYS_ENROLLMENT_SECRET"
        )
    return CoordinatorHandle(args.coordinator, args.ca, admin, secret)


def _fleet_only(args: argparse.Namespace, cfg: Any) -> None:
    """Devices only, against an existing coordinator, until killed (docker-compose's devices)."""
    from simulator.fleet import FleetSpec, fleet_users, make_specs, population_specs, run_worker

    secret = secret_value(args, "enroll-secret", env="FEDKEYS_ENROLLMENT_SECRET")
    if not args.coordinator or not args.ca or not secret:
        raise SimError(
            "--forever needs --coordinator, --ca and the fleet secret (--enroll-secret-file or "
            "FEDKEYS_ENROLLMENT_SECRET)"
        )
    users = fleet_users(cfg.corpus)
    seed = cfg.seed + os.getpid() % 10_000
    specs = population_specs(users, seed) if cfg.population else make_specs(users, cfg.devices, seed)
    fleet = FleetSpec(
        coordinator=args.coordinator,
        ca=str(args.ca),
        enroll_secret=secret,
        seed=cfg.seed,
        day_seconds=cfg.day_seconds,
        start_hour=cfg.start_hour,
        t0=time.time(),
        dropout=cfg.dropout,
        round_seconds=20.0,
        stop_after=10 * 365 * 86400,
        state_root=str(args.out / "fleet"),
        noop_training=cfg.noop_training,
        min_examples=cfg.min_examples,
    )
    run_worker(specs, fleet)
