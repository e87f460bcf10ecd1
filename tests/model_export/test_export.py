"""Parity of the ExecuTorch programs with eager torch, on the tiny bundle (slow: builds it once)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.batching import encode_messages, pack_batches
from edge_client.runtime import OptimizerConfig, Predictor, ProgramModel, Trainer
from edge_client.text import WORD_RE
from edge_client.tokenizer import BOS_ID, Tokenizer
from fedkeys.cli import main
from model_export.data import load_chitchat, normalize, split_corpus
from model_export.eager import EagerStepModel
from model_export.export import export_predict_program, export_train_program, model_from_bundle
from model_export.model import TransformerLM
from protocol.bundle import BundleError, load_bundle
from protocol.layout import Layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path):  # type: ignore[no-untyped-def]
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def heldout_texts() -> list[str]:
    heldout = split_corpus(load_chitchat())["heldout"]
    texts = [normalize(m.text) for msgs in heldout.values() for m in msgs[:3]]
    return [t for t in texts if t][:300]


@pytest.fixture(scope="module")
def tokenizer(bundle) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer(bundle.path(bundle.manifest.tokenizer))


def test_predict_fp32_matches_eager(bundle, tokenizer, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    lm = model_from_bundle(bundle.root, bundle.manifest)
    path = tmp_path_factory.mktemp("fp32") / "predict.pte"
    path.write_bytes(export_predict_program(lm, "fp32", 4))
    prog = ProgramModel(path, lm.cfg.max_seq_len, 4)
    eager = EagerStepModel(lm, 4)
    ids = [BOS_ID, *tokenizer.encode("how are you doing today")]
    lp_p, k_p, _ = prog.prefill(ids)
    lp_e, k_e, v_e = eager.prefill(ids)
    np.testing.assert_allclose(lp_p, lp_e, atol=1e-4)
    np.testing.assert_allclose(k_p[:, :, :, : len(ids)], k_e[:, :, :, : len(ids)], atol=1e-4)
    k = np.repeat(k_e, 4, axis=1)
    v = np.repeat(v_e, 4, axis=1)
    toks = np.array([5, 6, 7, 8], dtype=np.int64)
    out_p = prog.step(toks, len(ids), k, v)
    out_e = eager.step(toks, len(ids), k, v)
    for a, b in zip(out_p, out_e, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(prog.score(ids), eager.score(ids), atol=1e-4)


def test_int8_top1_agrees_with_eager(bundle, tokenizer, heldout_texts) -> None:  # type: ignore[no-untyped-def]
    assert bundle.manifest.predict.quantization == "int8"
    lm = model_from_bundle(bundle.root, bundle.manifest)
    spec = bundle.manifest.predict
    prog = ProgramModel(bundle.path(spec.program), spec.max_seq_len, spec.beam_batch)
    eager = EagerStepModel(lm, spec.beam_batch)
    agree = total = 0
    for text in heldout_texts[:150]:
        ids = [BOS_ID, *tokenizer.encode(text)][: spec.max_seq_len]
        for n in range(1, len(ids) + 1):
            agree += int(np.argmax(prog.prefill(ids[:n])[0]) == np.argmax(eager.prefill(ids[:n])[0]))
            total += 1
    assert total > 1000
    assert agree / total >= 0.99, f"int8 top-1 agreement {agree / total:.4f}"


def _batches(tokenizer: Tokenizer, texts: list[str], batch: int, seq: int):  # type: ignore[no-untyped-def]
    return list(pack_batches(encode_messages(tokenizer, texts, seq), batch, seq, drop_last=True))


def test_train_gradients_match_eager(bundle, tokenizer, heldout_texts) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer.from_bundle(bundle)
    spec = bundle.manifest.train
    b = _batches(tokenizer, heldout_texts, spec.batch_size, spec.seq_len)[0]
    loss, grads = trainer.gradients(b)
    lm = model_from_bundle(bundle.root, bundle.manifest)
    ref = lm.loss(*(torch.from_numpy(a) for a in (b.tokens, b.targets, b.positions, b.segments)))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)


def test_weights_round_trip_and_training_moves_them(bundle, tokenizer, heldout_texts) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer.from_bundle(bundle)
    spec = bundle.manifest.train
    w0 = bundle.initial_weights()
    noisy = w0 + np.random.default_rng(0).normal(0, 1e-3, w0.shape).astype(np.float32)
    trainer.set_weights(noisy)
    np.testing.assert_array_equal(trainer.get_weights(), noisy)
    trainer.set_weights(w0)
    b = _batches(tokenizer, heldout_texts, spec.batch_size, spec.seq_len)[0]
    before = trainer.loss(b)
    for opt in (OptimizerConfig(name="sgd", lr=0.5), OptimizerConfig(name="adam", lr=1e-2)):
        trainer.set_weights(w0)
        stats = trainer.train([b] * 8, opt, max_steps=8)
        assert stats.steps == 8
        assert stats.examples == 8 * b.n_targets
        assert trainer.loss(b) < before  # fitting one batch lowers its loss
        assert not np.array_equal(trainer.get_weights(), w0)
    trainer.set_weights(w0)
    stopped = trainer.train([b] * 8, OptimizerConfig(), max_steps=8, should_continue=lambda: False)
    assert stopped.aborted and stopped.steps == 0


def test_lora_program_trains_only_adapters(bundle, tokenizer, heldout_texts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = model_from_bundle(bundle.root, bundle.manifest)
    cfg = replace(base.cfg, lora_rank=2)
    lm = TransformerLM(cfg)
    lm.load_state_dict(base.state_dict(), strict=False)
    layout = Layout.from_shapes({n: tuple(p.shape) for n, p in lm.named_parameters() if ".lora_" in n})
    path = tmp_path / "train.pte"
    path.write_bytes(export_train_program(lm, "lora", 4))
    trainer = Trainer(path, layout, 4, cfg.max_seq_len)
    assert set(trainer.params) == set(layout.names)
    trainer.set_weights(
        layout.flatten({n: p.detach().numpy() for n, p in lm.named_parameters() if n in layout.names})
    )
    b = _batches(tokenizer, heldout_texts, 4, cfg.max_seq_len)[0]
    trainer.train([b] * 4, OptimizerConfig(name="adam", lr=1e-2), max_steps=4)
    trained = layout.unflatten(trainer.get_weights())
    assert any(np.abs(v).max() > 0 for n, v in trained.items() if ".lora_b" in n)
    # the program's loss equals eager with the frozen base and the trained adapters
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n in trained:
                p.copy_(torch.from_numpy(trained[n]))
    ref = lm.eval().loss(*(torch.from_numpy(a) for a in (b.tokens, b.targets, b.positions, b.segments)))
    assert trainer.loss(b) == pytest.approx(ref.item(), rel=1e-4)


def test_suggestions_are_whole_words_and_honour_prefix(bundle) -> None:  # type: ignore[no-untyped-def]
    pred = Predictor.from_bundle(bundle)
    for text in ["", "how are ", "i am going to the ", "what "]:
        out = pred.suggest(text, 3)
        assert len(out) == 3
        assert len({s.word for s in out}) == 3
        for s in out:
            assert WORD_RE.fullmatch(s.word), s.word
        assert [s.logprob for s in out] == sorted((s.logprob for s in out), reverse=True)
    for text, prefix in [("how are yo", "yo"), ("th", "th"), ("i am go", "go")]:
        for s in pred.suggest(text, 3):
            assert s.word.startswith(prefix) and WORD_RE.fullmatch(s.word), (text, s.word)


def test_tampered_or_incomplete_bundle_is_refused(bundle, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    shutil.copytree(bundle.root, bad)
    data = bytearray((bad / "predict.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "predict.pte").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bad)
    assert main(["suggest", "--bundle", str(bad), "hello"]) == 2
    assert "sha256" in capsys.readouterr().err
    (bad / "predict.pte").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bad)
    assert main(["suggest", "--bundle", str(tmp_path / "nowhere"), "hi"]) == 2


def test_side_by_side_export_writes_the_same_programs(bundle, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The train program exported in a spawned child is byte-identical to the serial build's."""
    from model_export import export as export_mod

    lm = model_from_bundle(bundle.root, bundle.manifest)
    spec = export_mod.BundleSpec(
        train_batch=bundle.manifest.train.batch_size, beam_batch=bundle.manifest.predict.beam_batch
    )
    monkeypatch.setattr(export_mod, "_PARALLEL_EXPORT_PARAMS", 0)
    monkeypatch.setattr(export_mod.os, "cpu_count", lambda: 2)
    train, predict = export_mod._export_programs(lm, spec)
    assert train == bundle.path(bundle.manifest.train.program).read_bytes()
    assert predict == bundle.path(bundle.manifest.predict.program).read_bytes()
