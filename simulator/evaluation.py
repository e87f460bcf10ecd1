"""Heldout evaluation of a run's model versions: :class:`VersionEvaluator` scores a version's
weights on messages of people outside the fleet (:func:`heldout_sample`), with the same beam
search the devices run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["VersionEvaluator", "heldout_sample"]


def heldout_sample(n: int, seed: int) -> list[str]:
    """``n`` messages of the corpus's heldout users (none of them is in the simulated fleet)."""
    from model_export.data import load_chitchat, split_corpus
    from model_export.evaluate import eval_messages

    return eval_messages(split_corpus(load_chitchat())["heldout"], n, seed=seed)


class VersionEvaluator:
    """Heldout accuracy of a model version: the bundle's architecture with the version's
    weights, the same beam search devices run (eager fp32 per round; the final version is also
    measured through its int8 ``predict.pte``)."""

    def __init__(self, bundle_dir: Path, texts: list[str]) -> None:
        from edge_client.tokenizer import Tokenizer
        from protocol.bundle import load_bundle

        self.bundle = load_bundle(bundle_dir)
        self.tok = Tokenizer(self.bundle.path(self.bundle.manifest.tokenizer))
        self.texts = texts

    def eager(self, weights: npt.NDArray[np.float32]) -> dict[str, float]:
        import torch

        from edge_client.predictor import BeamSearch
        from model_export.eager import EagerStepModel
        from model_export.evaluate import EvalResult, count_nll, count_suggestions, fitting
        from model_export.export import model_from_bundle

        torch.set_num_threads(1)
        lm = model_from_bundle(self.bundle.root, self.bundle.manifest, weights)
        m = EagerStepModel(lm, self.bundle.manifest.predict.beam_batch)
        search = BeamSearch(m, self.tok)
        counts = count_suggestions(lambda t, k: [s.word for s in search.suggest(t, k)], self.texts, [])
        counts = counts + count_nll(m.score, self.tok, fitting(self.tok, self.texts, m.max_seq_len))
        r = EvalResult.from_counts("eager", counts)
        return {"top1": r.top1, "top3": r.top3, "ppl_piece": r.ppl_token, "words": r.words}

    def program(self, weights: npt.NDArray[np.float32], workdir: Path) -> dict[str, float]:
        from model_export.export import export_predict_program, model_from_bundle
        from model_export.pipeline import ProgramSpec, evaluate_program

        m = self.bundle.manifest
        lm = model_from_bundle(self.bundle.root, m, weights)
        path = workdir / "final-predict.pte"
        path.write_bytes(export_predict_program(lm, m.predict.quantization, m.predict.beam_batch))
        spec = ProgramSpec(path, self.bundle.path(m.tokenizer), m.predict.max_seq_len, m.predict.beam_batch)
        r = evaluate_program("final", spec, self.texts, [], workers=1)
        return {
            "top1": r.top1,
            "top3": r.top3,
            "ppl_piece": r.ppl_token,
            "ms_per_suggestion": r.ms_per_suggestion,
        }
