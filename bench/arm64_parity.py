"""Do the device's programs compute the same thing on another machine? (deploy/arm64-check.sh)

``record BUNDLE OUT.json`` runs on each machine with nothing but the client installed: for fixed
prompts it records the next-piece log-probabilities of the bundle's ``predict.pte`` (int8), of
the fp32 prediction program (``BUNDLE/predict-fp32.pte``, exported on the host by ``prepare``),
and of the eager model (torch, the bundle's weights), the top-3 suggestions, and one training
step of ``train.pte`` (loss, gradient norm) on a fixed batch. ``compare HOST.json OTHER.json``
prints, per program, top-1 agreement and the largest log-probability difference, and exits 1
when the int8 program's top-1 agrees on fewer than 95% of the prompts or the fp32 program's
log-probabilities differ by more than 1e-3 (float rounding between two CPUs' kernels is far
smaller; the x86 parity tests hold fp32 to 1e-4 of eager).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = [
    "how are ",
    "see you tomor",
    "what are you doing ",
    "i am going to ",
    "thank you so ",
    "do you want to ",
    "i don't know ",
    "let me know if ",
    "are you coming to the ",
    "good morning how ",
    "i love ",
    "what time is ",
    "can you send me ",
    "that sounds ",
    "have a good ",
    "i will be there ",
    "where are ",
    "it was so ",
    "did you see the ",
    "happy birthday ",
]


def _top(lp: np.ndarray, k: int = 10) -> dict[str, list[float]]:
    order = np.argsort(-lp)[:k]
    return {"ids": [int(i) for i in order], "logprobs": [float(lp[i]) for i in order]}


def record(bundle_dir: Path, out: Path) -> None:
    import torch

    from edge_client.batching import encode_messages, pack_batches
    from edge_client.runtime import OptimizerConfig, Predictor, ProgramModel, Trainer
    from edge_client.text import normalize
    from edge_client.tokenizer import BOS_ID, Tokenizer
    from model_export.eager import EagerStepModel
    from model_export.export import model_from_bundle
    from protocol.bundle import load_bundle

    torch.manual_seed(0)
    bundle = load_bundle(bundle_dir)
    tok = Tokenizer(bundle.path(bundle.manifest.tokenizer))
    lm = model_from_bundle(bundle.root, bundle.manifest)
    spec_p = bundle.manifest.predict
    seq, beam = spec_p.max_seq_len, spec_p.beam_batch
    models: dict[str, Any] = {"eager": EagerStepModel(lm, beam)}
    models["int8"] = ProgramModel(bundle.path(spec_p.program), seq, beam)
    fp32 = bundle_dir / "predict-fp32.pte"
    if fp32.exists():
        models["fp32"] = ProgramModel(fp32, seq, beam)
    rec: dict[str, Any] = {
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "prompts": PROMPTS,
    }
    for name, model in models.items():
        rows = []
        for p in PROMPTS:
            ids = [BOS_ID, *tok.encode(p.rstrip())]
            lp, _, _ = model.prefill(ids)
            rows.append(_top(np.asarray(lp, dtype=np.float64).reshape(-1, lp.shape[-1])[-1]))
        rec[name] = rows
    predictor = Predictor.from_bundle(bundle)
    rec["suggestions"] = [[s.word for s in predictor.suggest(p, 3)] for p in PROMPTS]
    spec = bundle.manifest.train
    texts = [normalize(p + "you later today") for p in PROMPTS]
    seqs = encode_messages(tok, texts, spec.seq_len)
    batch = next(iter(pack_batches(seqs, spec.batch_size, spec.seq_len)))
    trainer = Trainer.from_bundle(bundle)
    loss, grads = trainer.gradients(batch)
    rec["train"] = {
        "loss": float(loss),
        "grad_norm": float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))),
    }
    stats = trainer.train(iter([batch] * 3), OptimizerConfig(name="sgd", lr=0.1), max_steps=3)
    rec["train"]["loss_after_3_steps"] = float(trainer.loss(batch))
    rec["train"]["steps"] = stats.steps
    out.write_text(json.dumps(rec, indent=1))


def prepare(bundle_dir: Path) -> None:
    """Export the fp32 prediction program next to the bundle's int8 one (host only)."""
    from model_export.export import export_predict_program, model_from_bundle
    from protocol.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    lm = model_from_bundle(bundle.root, bundle.manifest)
    beam = bundle.manifest.predict.beam_batch
    (bundle_dir / "predict-fp32.pte").write_bytes(export_predict_program(lm, "fp32", beam))


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    print(f"{a['machine']} vs {b['machine']}, {len(PROMPTS)} prompts")
    print("| program | top-1 agreement | top-1 ids differ at | max abs log-prob difference (top-1) |")
    print("|---|---|---|---|")
    failed = False
    for name in ("eager", "fp32", "int8"):
        if name not in a or name not in b:
            continue
        same = [x["ids"][0] == y["ids"][0] for x, y in zip(a[name], b[name], strict=True)]
        diff = max(abs(x["logprobs"][0] - y["logprobs"][0]) for x, y in zip(a[name], b[name], strict=True))
        where = [p.strip() for p, s in zip(PROMPTS, same, strict=True) if not s]
        print(f"| {name} | {sum(same)}/{len(same)} | {', '.join(where[:4]) or '-'} | {diff:.2e} |")
        if name == "int8" and sum(same) < 0.95 * len(same):
            failed = True
        if name in ("fp32", "eager") and diff > 1e-3:
            failed = True
    sug = sum(x == y for x, y in zip(a["suggestions"], b["suggestions"], strict=True))
    print(
        f"suggestions identical on {sug}/{len(PROMPTS)} prompts; e.g. '{PROMPTS[0]}': {a['suggestions'][0]} vs {b['suggestions'][0]}"
    )
    ta, tb = a["train"], b["train"]
    print(
        f"train.pte: loss {ta['loss']:.6f} vs {tb['loss']:.6f}, gradient norm {ta['grad_norm']:.6f} vs "
        f"{tb['grad_norm']:.6f}, loss after 3 SGD steps {ta['loss_after_3_steps']:.6f} vs {tb['loss_after_3_steps']:.6f}"
    )
    if abs(ta["loss"] - tb["loss"]) > 1e-3 * max(1.0, abs(ta["loss"])):
        failed = True
    print("parity: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("bundle", type=Path)
    r.add_argument("out", type=Path)
    p = sub.add_parser("prepare")
    p.add_argument("bundle", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.bundle, args.out)
    elif args.cmd == "prepare":
        prepare(args.bundle)
    else:
        raise SystemExit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
