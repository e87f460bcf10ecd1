"""Quality benchmarks of the model pipeline (issue 2), recorded in bench/RESULTS.md:

1. Distillation pays: the distilled student vs a student of the same size trained on the same
   data with the same budget but no teacher (heldout top-1 and perplexity).
2. Neural student vs the classic trigram baseline, both trained on the public split, and both
   trained on public + federated data (the central upper bound the simulator compares with).

    .venv/bin/python bench/quality.py [--profile demo] [--central-steps 6000]

Students are evaluated through their exported int8 ``predict.pte`` and the device runtime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import _record  # noqa: E402
from edge_client.batching import encode_messages, pack_batches  # noqa: E402
from edge_client.tokenizer import Tokenizer  # noqa: E402
from model_export.console import rich_progress  # noqa: E402
from model_export.data import load_chitchat  # noqa: E402
from model_export.evaluate import EvalResult, fitting  # noqa: E402
from model_export.export import build_bundle  # noqa: E402
from model_export.ngram import TrigramLM  # noqa: E402
from model_export.pipeline import (  # noqa: E402
    _eval_sets,
    build,
    evaluate_bundle,
    evaluate_ngram,
    prepare_texts,
    train_model,
)
from model_export.profiles import get_profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--central-steps", type=int, default=6000, help="budget of the public+federated student")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts/work")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts/quality")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    profile = get_profile(args.profile)
    t_start = time.time()
    rows: list[tuple[str, str, EvalResult]] = []
    with rich_progress() as progress:
        res = build(profile, args.out / "distilled", args.work, progress=progress, evaluate=False)
        split = prepare_texts(load_chitchat())
        tok = Tokenizer(res.bundle.path(res.bundle.manifest.tokenizer))
        seq = profile.student.max_seq_len
        texts, ksr = _eval_sets(split.heldout, profile)
        ppl_texts = fitting(tok, texts, seq)
        public_seqs = encode_messages(tok, split.public_train, seq)
        val = list(pack_batches(encode_messages(tok, split.public_val, seq), 32, seq))
        fp = split.fingerprint()

        def student_row(name: str, data: str, lm: object) -> None:
            out = args.out / name
            build_bundle(
                out,
                lm,
                res.bundle.path(res.bundle.manifest.tokenizer).read_bytes(),  # type: ignore[arg-type]
                profile.bundle,
                profile=profile.name,
            )
            from protocol.bundle import load_bundle

            rows.append(
                (
                    name,
                    data,
                    evaluate_bundle(load_bundle(out), split.heldout, profile, progress, name),
                )
            )

        rows.append(
            (
                "distilled student",
                "public",
                evaluate_bundle(res.bundle, split.heldout, profile, progress, "distilled student"),
            )
        )
        plain = train_model(
            f"{profile.name}-student-nokd",
            args.work,
            profile.student,
            profile.student_train,
            public_seqs,
            val,
            fp,
            progress,
        )
        student_row("student without teacher", "public", plain)
        ng = TrigramLM().fit(split.public_train + split.public_val)
        rows.append(("trigram", "public", evaluate_ngram("trigram", ng, texts, ksr, ppl_texts)))
        central_seqs = public_seqs + encode_messages(tok, split.federated, seq)
        central_cfg = replace(profile.student_train, steps=args.central_steps, eval_every=500)
        central = train_model(
            f"{profile.name}-student-central",
            args.work,
            profile.student,
            central_cfg,
            central_seqs,
            val,
            fp + "+federated",
            progress,
        )
        student_row("student (central)", "public+federated", central)
        ng2 = TrigramLM().fit(split.public_train + split.public_val + split.federated)
        rows.append(("trigram", "public+federated", evaluate_ngram("trigram", ng2, texts, ksr, ppl_texts)))
    meta = {p.stem: json.loads(p.read_text()) for p in args.work.glob(f"{profile.name}-*.json")}
    lines = [
        "## Model quality (issue 2)",
        "",
        f"{date.today()}, {os.cpu_count()} cores ({platform.machine()}), profile `{profile.name}`, "
        f"{len(texts)} heldout messages ({rows[0][2].words} next-word targets) for top-k and perplexity, "
        f"{len(ksr)} for KSR. Students evaluated through int8 `predict.pte` and the device runtime; "
        f"run took {(time.time() - t_start) / 60:.0f} min.",
        "",
        "| model | training data | top-1 | top-3 | KSR | ppl/piece | ppl/word* | val loss | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = {
        "distilled student": f"{profile.name}-student",
        "student without teacher": f"{profile.name}-student-nokd",
        "student (central)": f"{profile.name}-student-central",
    }
    for name, data, r in rows:
        m = meta.get(keys.get(name, ""), {})
        lines.append(
            f"| {name} | {data} | {r.top1:.4f} | {r.top3:.4f} | {r.ksr:.4f} | {r.ppl_token:.1f} | {r.ppl_word:.1f} | "
            f"{m.get('best_val_loss', float('nan')):.3f} | {m.get('seconds', 0) / 60:.1f} min |"
        )
    teacher = meta.get(f"{profile.name}-teacher", {})
    lines += [
        "",
        f"Teacher: val loss {teacher.get('best_val_loss', float('nan')):.3f}, "
        f"{teacher.get('seconds', 0) / 60:.1f} min. *ppl/word: neural models' NLL includes punctuation pieces, "
        "which the word trigram does not predict, so the two columns are not strictly comparable; "
        "ppl/piece compares the students exactly.",
    ]
    body = "\n".join(lines)
    print(body)
    _record("Model quality (issue 2)", body)


if __name__ == "__main__":
    main()
