"""Model-pipeline benchmarks (issue 2): suggestion latency, training step time and memory,
bundle sizes, build times. Prints a table and writes a section of bench/RESULTS.md.

    .venv/bin/python bench/model_bench.py [--bundle artifacts/demo/bundle]

Latency is measured on one core (process pinned to CPU 0, ExecuTorch threadpool of 1); the
training step compares train.pte with the same step in eager torch, both single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pin_one_core() -> None:
    os.sched_setaffinity(0, {0})
    from edge_client.runtime import set_threads

    set_threads(1)


def _contexts(n: int) -> list[str]:
    import numpy as np

    from edge_client.text import WORD_RE
    from model_export.data import load_chitchat, normalize, split_corpus

    heldout = split_corpus(load_chitchat())["heldout"]
    texts = [t for msgs in heldout.values() for m in msgs if (t := normalize(m.text))]
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        t = texts[int(rng.integers(len(texts)))]
        starts = [m.start() for m in WORD_RE.finditer(t)]
        cut = starts[int(rng.integers(len(starts)))] if starts else 0
        # half the queries end mid-word (completion), half after a space (next word)
        if rng.random() < 0.5 and cut < len(t):
            cut += int(rng.integers(1, 3))
        out.append(t[:cut])
    return out


def latency(bundle_dir: Path, queries: int) -> dict[str, float]:
    _pin_one_core()
    from edge_client.runtime import Predictor
    from protocol.bundle import load_bundle

    pred = Predictor.from_bundle(load_bundle(bundle_dir))
    ctx = _contexts(queries + 50)
    for c in ctx[:50]:
        pred.suggest(c, 3)
    times = []
    for c in ctx[50:]:
        t0 = time.perf_counter()
        pred.suggest(c, 3)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * len(times)) - 1],
        "mean_ms": statistics.fmean(times),
        "queries": len(times),
    }


def _batch(bundle_dir: Path):  # type: ignore[no-untyped-def]
    from edge_client.batching import encode_messages, pack_batches
    from edge_client.tokenizer import Tokenizer
    from model_export.data import load_chitchat, normalize, split_corpus
    from protocol.bundle import load_bundle

    b = load_bundle(bundle_dir)
    tok = Tokenizer(b.path(b.manifest.tokenizer))
    fed = split_corpus(load_chitchat())["federated"]
    texts = [normalize(m.text) for msgs in list(fed.values())[:40] for m in msgs]
    spec = b.manifest.train
    seqs = encode_messages(tok, texts, spec.seq_len)
    return b, list(pack_batches(seqs, spec.batch_size, spec.seq_len, drop_last=True))


def train_step(bundle_dir: Path, steps: int) -> dict[str, float]:
    """train.pte vs eager torch (forward, backward, SGD), one thread each, same batches."""
    _pin_one_core()
    import torch

    from edge_client.runtime import OptimizerConfig, Trainer
    from model_export.export import model_from_bundle

    b, batches = _batch(bundle_dir)
    batches = (batches * (steps // max(len(batches), 1) + 2))[: steps + 3]
    trainer = Trainer.from_bundle(b)
    trainer.train(batches[:3], OptimizerConfig(lr=0.01), max_steps=3)
    t0 = time.perf_counter()
    stats = trainer.train(batches[3:], OptimizerConfig(lr=0.01), max_steps=steps)
    et = (time.perf_counter() - t0) / stats.steps
    lm = model_from_bundle(b.root, b.manifest).train()
    opt = torch.optim.SGD(lm.parameters(), lr=0.01)

    def eager_step(bt) -> None:  # type: ignore[no-untyped-def]
        loss = lm.loss(*(torch.from_numpy(a) for a in (bt.tokens, bt.targets, bt.positions, bt.segments)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for bt in batches[:3]:
        eager_step(bt)
    t0 = time.perf_counter()
    for bt in batches[3 : 3 + steps]:
        eager_step(bt)
    eager = (time.perf_counter() - t0) / steps
    tokens = b.manifest.train.batch_size * b.manifest.train.seq_len
    return {
        "et_ms": et * 1000,
        "eager_ms": eager * 1000,
        "ratio": et / eager,
        "tokens_per_step": tokens,
    }


def portable_step(bundle_dir: Path, steps: int) -> dict[str, float]:
    """The same training step exported without XNNPACK (ExecuTorch portable kernels only)."""
    _pin_one_core()
    import warnings

    import torch
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    from edge_client.runtime import OptimizerConfig, Trainer
    from model_export.export import _train_example, model_from_bundle
    from model_export.model import TrainStep

    b, batches = _batch(bundle_dir)
    lm = model_from_bundle(b.root, b.manifest)
    spec = b.manifest.train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(TrainStep(lm), _train_example(lm.cfg, spec.batch_size), strict=True)
        buf = to_edge(_export_forward_backward(ep)).to_executorch().buffer
    path = Path("/tmp/fedkeys-portable-train.pte")
    path.write_bytes(buf)
    trainer = Trainer(path, spec.layout, spec.batch_size, spec.seq_len)
    batches = (batches * (steps // max(len(batches), 1) + 2))[: steps + 2]
    trainer.train(batches[:2], OptimizerConfig(lr=0.01), max_steps=2)
    t0 = time.perf_counter()
    stats = trainer.train(batches[2:], OptimizerConfig(lr=0.01), max_steps=steps)
    return {"portable_ms": (time.perf_counter() - t0) / stats.steps * 1000}


def peak_rss(bundle_dir: Path, steps: int) -> dict[str, float]:
    """A fresh process that does what a device does in a round: load the bundle, set the
    weights, tokenize its own messages and train ``steps`` steps. The messages come from a
    small file (a device's store), not the whole corpus."""
    import numpy as np

    from edge_client.batching import encode_messages, pack_batches
    from edge_client.runtime import OptimizerConfig, Trainer
    from edge_client.tokenizer import Tokenizer
    from protocol.bundle import load_bundle

    texts = Path(os.environ["FEDKEYS_BENCH_TEXTS"]).read_text().splitlines()
    b = load_bundle(bundle_dir)
    spec = b.manifest.train
    tok = Tokenizer(b.path(b.manifest.tokenizer))
    batches = list(
        pack_batches(
            encode_messages(tok, texts, spec.seq_len), spec.batch_size, spec.seq_len, np.random.default_rng(0)
        )
    )
    trainer = Trainer.from_bundle(b)
    weights = np.fromfile(os.environ["FEDKEYS_BENCH_WEIGHTS"], dtype="<f4")  # a round's download
    trainer.set_weights(weights)
    trainer.train(batches * 5, OptimizerConfig(lr=0.01), max_steps=steps)
    delta = trainer.get_weights()
    delta -= weights
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def predict_rss(bundle_dir: Path, queries: int) -> dict[str, float]:
    """A fresh process that only suggests (the keyboard's side)."""
    from edge_client.runtime import Predictor
    from protocol.bundle import load_bundle

    pred = Predictor.from_bundle(load_bundle(bundle_dir))
    for t in ["how are ", "i am going to the ", "what do you th"] * max(1, queries // 3):
        pred.suggest(t, 3)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(fn: str, bundle: Path, arg: int, env: dict[str, str] | None = None) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", fn, "--bundle", str(bundle), "--arg", str(arg)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _record(section: str, body: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = f"## {section}"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body.rstrip() + "\n" + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=ROOT / "artifacts/demo/bundle")
    ap.add_argument("--child", default=None)
    ap.add_argument("--arg", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    fns = {
        "latency": latency,
        "train_step": train_step,
        "portable_step": portable_step,
        "predict_rss": predict_rss,
        "peak_rss": peak_rss,
    }
    if args.child:
        print(json.dumps(fns[args.child](args.bundle, args.arg)))
        return
    if not (args.bundle / "manifest.json").exists():
        sys.exit(f"no bundle at {args.bundle}: run `make demo` (or fedkeys export build) first")
    lat = _child("latency", args.bundle, 500)
    step = _child("train_step", args.bundle, 30)
    port = _child("portable_step", args.bundle, 10)
    from model_export.data import load_chitchat, normalize, split_corpus

    fed = split_corpus(load_chitchat())["federated"]
    user = max(fed, key=lambda u: len(fed[u]) if len(fed[u]) < 1000 else 0)
    texts_file = Path("/tmp/fedkeys-bench-device-texts.txt")
    texts_file.write_text("\n".join(normalize(m.text) for m in fed[user][-400:]))
    from protocol.bundle import load_bundle

    weights_file = Path("/tmp/fedkeys-bench-weights.f32")
    load_bundle(args.bundle).initial_weights().tofile(weights_file)
    rss = _child(
        "peak_rss",
        args.bundle,
        20,
        {"FEDKEYS_BENCH_TEXTS": str(texts_file), "FEDKEYS_BENCH_WEIGHTS": str(weights_file)},
    )
    prss = _child("predict_rss", args.bundle, 30)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    sizes = {p.name: p.stat().st_size for p in sorted(args.bundle.iterdir()) if p.is_file()}
    tar = args.bundle.with_suffix(".tar")
    build = args.bundle.parent / f"{args.bundle.name}.build.json"
    stages = json.loads(build.read_text())["stages"] if build.exists() else {}
    arch = manifest["architecture"]
    lines = [
        "## Model pipeline (issue 2)",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(AMD EPYC, KVM), bundle `{args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle}` "
        f"(profile {manifest['profile']}, {arch['parameters']:,} parameters, d={arch['d_model']}, "
        f"L={arch['n_layers']}, vocab {arch['vocab_size']}, predict {manifest['predict']['quantization']}).",
        "",
        "| metric | value | goal |",
        "|---|---|---|",
        f"| suggestion latency, top-3 words, 1 core, p50 | {lat['p50_ms']:.2f} ms | <= 10 ms |",
        f"| suggestion latency, top-3 words, 1 core, p95 | {lat['p95_ms']:.2f} ms | <= 20 ms |",
        f"| train.pte step ({step['tokens_per_step']:.0f} token slots), 1 thread | {step['et_ms']:.1f} ms | |",
        f"| eager torch, same step, 1 thread | {step['eager_ms']:.1f} ms | |",
        f"| train.pte / eager | {step['ratio']:.2f}x | <= 2x |",
        f"| train.pte with portable kernels only (no XNNPACK) | {port['portable_ms']:.1f} ms "
        f"({port['portable_ms'] / step['eager_ms']:.2f}x eager) | |",
        f"| peak RSS: load bundle, tokenize 400 local messages, train 20 steps | {rss['peak_rss_mb']:.0f} MB "
        "| <= 300 MB |",
        f"| peak RSS: load bundle, 30 suggestions | {prss['peak_rss_mb']:.0f} MB | |",
    ]
    lines += [f"| bundle file `{k}` | {v / 1e6:.2f} MB | |" for k, v in sizes.items()]
    if tar.exists():
        lines.append(f"| bundle tarball | {tar.stat().st_size / 1e6:.2f} MB | |")
    lines += [
        f"| build stage `{k}` (last build; cached stages ~0) | {v:.0f} s | |" for k, v in stages.items()
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        _record("Model pipeline (issue 2)", body)


if __name__ == "__main__":
    main()
