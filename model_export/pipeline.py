"""The server-side model pipeline: corpus -> tokenizer -> teacher -> distilled student ->
ExecuTorch bundle -> evaluation on heldout users. Every stage is cached in a work directory
and long stages checkpoint, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from edge_client.batching import Batch, IntArray, encode_messages, pack_batches
from edge_client.native import quiet_python_logs
from edge_client.predictor import BeamSearch
from edge_client.runtime import ProgramModel, set_threads
from edge_client.tokenizer import Tokenizer
from model_export.data import Corpus, CorpusError, load_corpus, normalize, split_corpus
from model_export.evaluate import (
    Counts,
    EvalResult,
    count_nll,
    count_suggestions,
    eval_messages,
    fitting,
    ngram_perplexity,
)
from model_export.export import build_bundle, export_predict_program
from model_export.model import ModelConfig, TransformerLM
from model_export.ngram import TrigramLM
from model_export.profiles import Profile
from model_export.shipped import load_student, save_student
from model_export.tokenizer import train_tokenizer
from model_export.train import TrainConfig, train_lm
from protocol.bundle import Bundle, BundleError, load_bundle

__all__ = [
    "BuildResult",
    "ProgramSpec",
    "Progress",
    "SplitTexts",
    "build",
    "evaluate_bundle",
    "evaluate_ngram",
    "evaluate_program",
    "prepare_texts",
    "train_model",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


# Makes a per-task progress callback ``fn(done, total, status)`` from (task name, total).
Progress = Callable[[str, int], ProgressFn]


def no_progress(name: str, total: int) -> ProgressFn:
    return lambda done, total_, status: None


@dataclass(frozen=True)
class SplitTexts:
    """Normalised messages per role. Public users are split again into train and validation."""

    public_train: list[str]
    public_val: list[str]
    federated: list[str]
    heldout: Corpus

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.public_train:
            h.update(t.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


def prepare_texts(corpus: Corpus) -> SplitTexts:
    parts = split_corpus(corpus)
    public = parts["public"]
    val_users = {u for u in public if hashlib.sha256(f"val:{u}".encode()).digest()[0] % 10 == 0}
    if not val_users and len(public) > 1:
        val_users = {sorted(public)[0]}

    def texts(users: Sequence[str], c: Corpus) -> list[str]:
        return [t for u in users for m in c[u] if (t := normalize(m.text))]

    train_users = sorted(u for u in public if u not in val_users)
    return SplitTexts(
        public_train=texts(train_users, public),
        public_val=texts(sorted(val_users), public),
        federated=texts(sorted(parts["federated"]), parts["federated"]),
        heldout=parts["heldout"],
    )


def _cached_model(path: Path, fingerprint: str) -> TransformerLM | None:
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        return None
    info = json.loads(meta.read_text())
    if info.get("fingerprint") != fingerprint:
        return None
    lm = TransformerLM(ModelConfig(**info["config"]))
    lm.load_state_dict(torch.load(path, weights_only=True))
    return lm.eval()


def train_fingerprint(model_cfg: ModelConfig, train_cfg: TrainConfig, data_fp: str, distilled: bool) -> str:
    """What a trained model depends on: its shapes, its training settings and data, and whether
    it was distilled from a teacher (the work directory's cache key)."""
    return hashlib.sha256(
        json.dumps([asdict(model_cfg), asdict(train_cfg), data_fp, distilled], sort_keys=True).encode()
    ).hexdigest()[:16]


def train_model(
    name: str,
    work: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_seqs: Sequence[IntArray],
    val_batches: Sequence[Batch],
    data_fp: str,
    progress: Progress,
    teacher: TransformerLM | None = None,
) -> TransformerLM:
    """Train (or load from the work directory) one model; resumable through its checkpoint."""
    fp = train_fingerprint(model_cfg, train_cfg, data_fp, teacher is not None)
    path = work / f"{name}.pt"
    cached = _cached_model(path, fp)
    if cached is not None:
        log.info("%s: using cached %s", name, path)
        return cached
    res = train_lm(
        model_cfg,
        train_cfg,
        train_seqs,
        val_batches,
        teacher=teacher,
        checkpoint=work / f"{name}.ckpt",
        progress=progress(f"train {name}", train_cfg.steps),
    )
    torch.save(res.model.state_dict(), path)
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "fingerprint": fp,
                "config": asdict(model_cfg),
                "best_val_loss": res.best_val_loss,
                "seconds": res.seconds,
                "tokens_per_second": res.tokens_per_second,
            }
        )
    )
    log.info("%s: val loss %.3f in %.0f s", name, res.best_val_loss, res.seconds)
    return res.model


@dataclass
class BuildResult:
    bundle: Bundle
    table: list[EvalResult]
    seconds: float
    stages: dict[str, float]  # wall seconds per stage (cached stages take ~0)


def _eval_sets(heldout: Corpus, profile: Profile) -> tuple[list[str], list[str]]:
    texts = eval_messages(heldout, profile.eval_messages, seed=0)
    ksr = eval_messages(heldout, profile.ksr_messages, seed=1)
    return texts, ksr


@dataclass(frozen=True)
class ProgramSpec:
    """How a worker process opens a ``predict.pte`` (picklable)."""

    program: Path
    tokenizer: Path
    max_seq_len: int
    beam_batch: int


def _eval_program_chunk(
    spec: ProgramSpec, texts: Sequence[str], ksr: Sequence[str], ppl: Sequence[str], threads: int
) -> Counts:
    """Evaluate one share of the messages in this process (a pool worker or the caller)."""
    if threads:
        set_threads(threads)
    model = ProgramModel(spec.program, spec.max_seq_len, spec.beam_batch)
    tok = Tokenizer(spec.tokenizer)
    search = BeamSearch(model, tok)

    def suggest(text: str, k: int) -> list[str]:
        return [s.word for s in search.suggest(text, k)]

    return count_suggestions(suggest, texts, ksr) + count_nll(model.score, tok, ppl)


def evaluate_program(
    name: str,
    spec: ProgramSpec,
    texts: Sequence[str],
    ksr_texts: Sequence[str],
    progress: Progress = no_progress,
    workers: int | None = None,
) -> EvalResult:
    """Evaluate a ``predict.pte`` through the device runtime, the messages split over
    ``workers`` processes (default: one per core; each runs single-threaded, like a phone
    core). Suggestion latency is measured inside the workers."""
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    ppl = fitting(Tokenizer(spec.tokenizer), texts, spec.max_seq_len)
    report = progress(f"evaluate {name}", workers)
    if workers == 1:
        counts = _eval_program_chunk(spec, texts, ksr_texts, ppl, 0)
        report(1, 1, "")
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=quiet_python_logs
        ) as pool:
            futures = [
                pool.submit(
                    _eval_program_chunk,
                    spec,
                    texts[i::workers],
                    ksr_texts[i::workers],
                    ppl[i::workers],
                    1,
                )
                for i in range(workers)
            ]
            counts = Counts()
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                counts = counts + fut.result()
                report(done, workers, "")
    return EvalResult.from_counts(name, counts)


def evaluate_ngram(
    name: str,
    lm: TrigramLM,
    texts: Sequence[str],
    ksr_texts: Sequence[str],
    ppl_texts: Sequence[str],
) -> EvalResult:
    counts = count_suggestions(lm.suggest, texts, ksr_texts)
    ppl = ngram_perplexity(lm.message_logprob, ppl_texts)
    r = EvalResult.from_counts(name, counts, per_piece=False)
    r.ppl_word = ppl
    return r


def evaluate_bundle(
    bundle: Bundle,
    heldout: Corpus,
    profile: Profile,
    progress: Progress = no_progress,
    name: str = "student",
    workers: int | None = None,
) -> EvalResult:
    """Evaluate what devices run: the bundle's ``predict.pte`` through the device runtime."""
    texts, ksr = _eval_sets(heldout, profile)
    m = bundle.manifest
    spec = ProgramSpec(
        bundle.path(m.predict.program),
        bundle.path(m.tokenizer),
        m.predict.max_seq_len,
        m.predict.beam_batch,
    )
    return evaluate_program(name, spec, texts, ksr, progress, workers)


def build(
    profile: Profile,
    out: Path,
    work: Path,
    corpus_source: str | Path | None = None,
    progress: Progress = no_progress,
    evaluate: bool = True,
    *,
    student_from: Path | None = None,
    save_student_to: Path | None = None,
    command: str = "fedkeys export build",
) -> BuildResult:
    """Build the bundle of ``profile`` into ``out`` and evaluate it (cached in ``work``).

    ``student_from``: a shipped student (``model_export.shipped``) instead of the tokenizer,
    teacher and student stages (the evaluation then has no teacher row);
    ``save_student_to``: ship the student this build trained there, with its provenance
    (``command``: how the build was asked for, recorded in it)."""
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    clock = [t0]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        stages[stage] = round(now - clock[0], 2)
        clock[0] = now

    work.mkdir(parents=True, exist_ok=True)
    split = prepare_texts(load_corpus(corpus_source))
    lap("data")
    if not split.public_train:
        raise CorpusError("the corpus has no users in the public split; it is too small to build a model")
    data_fp = split.fingerprint()
    if student_from is not None:
        student, tokenizer_model, prov = load_student(
            student_from, profile=profile.name, student_cfg=profile.student, data_fingerprint=data_fp
        )
        log.info("%s: shipped student of commit %s (%s)", student_from, prov.commit, prov.created)
        teacher: TransformerLM | None = None
        lap("shipped student")
    else:
        tokenizer_model, teacher, student = _train_student(profile, work, split, data_fp, progress, lap)
    vocab_size = Tokenizer(tokenizer_model).vocab_size
    if vocab_size != profile.vocab_size:
        log.warning("tokenizer has %d pieces (profile asks for %d)", vocab_size, profile.vocab_size)
    profile = _fit_vocabulary(profile, vocab_size)
    if save_student_to is not None:
        if teacher is None:
            raise CorpusError("--save-student ships a student this build trains: not with --student")
        meta = json.loads((work / f"{profile.name}-student.json").read_text())
        save_student(
            save_student_to,
            student,
            tokenizer_model,
            profile=profile.name,
            command=command,
            data_fingerprint=data_fp,
            train_fingerprint=meta["fingerprint"],
            best_val_loss=meta.get("best_val_loss"),
        )
    report = progress("export programs", 1)
    build_json = out.parent / f"{out.name}.build.json"
    export_key = _export_key(student, tokenizer_model, profile)
    if _exported(out, build_json, export_key):
        log.info("%s: programs already exported from this student", out)
    else:
        build_bundle(out, student, tokenizer_model, profile.bundle, profile=profile.name)
    report(1, 1, "done")
    lap("export")
    bundle = load_bundle(out)
    table: list[EvalResult] = []
    if evaluate:
        table = evaluate_all(bundle, teacher, split, profile, progress, work)
        metrics = {
            f"{r.name}.{k}": float(v)
            for r in table
            for k, v in r.as_dict().items()
            if isinstance(v, float | int) and math.isfinite(v)
        }
        (out / "eval.json").write_text(json.dumps([r.as_dict() for r in table], indent=2))
        m = bundle.manifest.model_copy(update={"metrics": metrics})
        (out / "manifest.json").write_text(m.model_dump_json(indent=2))
        bundle = load_bundle(out)
        lap("evaluate")
    build_json.write_text(json.dumps({"profile": profile.name, "stages": stages, "export_key": export_key}))
    return BuildResult(bundle, table, time.perf_counter() - t0, stages)


def _fit_vocabulary(profile: Profile, vocab_size: int) -> Profile:
    """A small corpus cannot fill the vocabulary (SentencePiece stops early, a soft limit):
    the models take the tokenizer's size."""
    if vocab_size == profile.vocab_size:
        return profile
    return replace(
        profile,
        teacher=replace(profile.teacher, vocab_size=vocab_size),
        student=replace(profile.student, vocab_size=vocab_size),
    )


def _train_student(
    profile: Profile,
    work: Path,
    split: SplitTexts,
    data_fp: str,
    progress: Progress,
    lap: Callable[[str], None],
) -> tuple[bytes, TransformerLM, TransformerLM]:
    """The tokenizer, teacher and distilled student of ``profile`` (each cached in ``work``)."""
    tok_path = work / f"tokenizer-{profile.vocab_size}-{data_fp}.model"
    if not tok_path.exists():
        tok_path.write_bytes(train_tokenizer(split.public_train, profile.vocab_size))
    tokenizer_model = tok_path.read_bytes()
    tok = Tokenizer(tokenizer_model)
    profile = _fit_vocabulary(profile, tok.vocab_size)
    lap("tokenizer")
    seq = profile.student.max_seq_len
    train_seqs = encode_messages(tok, split.public_train, seq)
    val_batches = list(
        pack_batches(
            encode_messages(tok, split.public_val or split.public_train[:200], seq),
            profile.student_train.batch_size,
            seq,
        )
    )
    teacher = train_model(
        f"{profile.name}-teacher",
        work,
        profile.teacher,
        profile.teacher_train,
        train_seqs,
        val_batches,
        data_fp,
        progress,
    )
    lap("teacher")
    student = train_model(
        f"{profile.name}-student",
        work,
        profile.student,
        profile.student_train,
        train_seqs,
        val_batches,
        data_fp,
        progress,
        teacher=teacher,
    )
    lap("student")
    return tokenizer_model, teacher, student


def evaluate_all(
    bundle: Bundle,
    teacher: TransformerLM | None,
    split: SplitTexts,
    profile: Profile,
    progress: Progress,
    work: Path,
) -> list[EvalResult]:
    """The student (its int8 ``predict.pte``), the teacher (an fp32 program: it never ships;
    no row for a shipped student, whose teacher is not at hand) and the trigram trained on the
    same public data, on the same heldout messages."""
    texts, ksr = _eval_sets(split.heldout, profile)
    rows = [evaluate_bundle(bundle, split.heldout, profile, progress)]
    tokenizer = bundle.path(bundle.manifest.tokenizer)
    if teacher is not None:
        beam = profile.bundle.beam_batch
        teacher_pte = work / f"{profile.name}-teacher-{_state_hash(teacher)}.pte"
        if not teacher_pte.exists():
            teacher_pte.write_bytes(export_predict_program(teacher, "fp32", beam))
        spec = ProgramSpec(teacher_pte, tokenizer, teacher.cfg.max_seq_len, beam)
        rows.append(evaluate_program("teacher", spec, texts, ksr, progress))
    ngram = TrigramLM().fit(split.public_train + split.public_val)
    ppl_texts = fitting(Tokenizer(tokenizer), texts, profile.student.max_seq_len)
    rows.append(evaluate_ngram("trigram", ngram, texts, ksr, ppl_texts))
    return rows


def _export_key(student: TransformerLM, tokenizer_model: bytes, profile: Profile) -> str:
    """What the exported programs depend on: the student's weights, the tokenizer, the bundle
    spec (and the exporter's code, through the package version)."""
    from importlib.metadata import version

    parts = [
        _state_hash(student),
        hashlib.sha256(tokenizer_model).hexdigest(),
        json.dumps(asdict(profile.bundle), sort_keys=True),
        profile.name,
        version("fedkeys"),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _exported(out: Path, build_json: Path, key: str) -> bool:
    """Whether ``out`` holds a complete bundle exported under ``key`` (a rebuild of the same
    student skips the export: minutes of tracing and lowering)."""
    try:
        if json.loads(build_json.read_text()).get("export_key") != key:
            return False
        load_bundle(out)
    except (OSError, ValueError, KeyError, AttributeError, BundleError):
        return False
    return True


def _state_hash(lm: TransformerLM) -> str:
    h = hashlib.sha256()
    for name, t in lm.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()[:16]
