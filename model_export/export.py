"""ExecuTorch programs and the model bundle.

- ``train.pte``: joint forward+backward of (tokens, targets, positions, segments) -> loss, with
  the trainable set (``full`` or ``lora``) as parameters and everything else as constants.
  Matrix products, transposes and the heavy element-wise ops are delegated one by one to
  XNNPACK with *non-static* weights, so the optimizer's in-place updates are seen by the next
  step; the rest runs on ExecuTorch's portable kernels.
- ``predict.pte``: methods ``prefill``, ``step`` (KV-cached, ``beam_batch`` rows) and ``score``,
  fully XNNPACK-delegated, int8 weights with dynamic int8 activations by default.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import save_file

from edge_client.native import quiet_python_logs
from edge_client.tokenizer import BOS_ID
from model_export.model import (
    ModelConfig,
    PredictPrefill,
    PredictScore,
    PredictStep,
    TrainStep,
    TransformerLM,
)
from protocol.bundle import (
    MANIFEST_NAME,
    Architecture,
    FileEntry,
    Manifest,
    PredictSpec,
    TrainSpec,
    pack_bundle,
    sha256_file,
)
from protocol.layout import FloatVec, Layout

__all__ = [
    "BundleSpec",
    "build_bundle",
    "export_predict_program",
    "export_train_program",
    "model_from_bundle",
    "trainable_layout",
]

log = logging.getLogger(__name__)

Trainable = Literal["full", "lora"]
Quantization = Literal["int8", "fp32"]


@dataclass(frozen=True)
class BundleSpec:
    """How to package one model: shapes of the programs and what devices train."""

    trainable: Trainable = "full"
    quantization: Quantization = "int8"
    train_batch: int = 8  # rows per training step on a device
    beam_batch: int = 8  # rows per beam-search step


def _quiet() -> Any:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    return ctx


def trainable_layout(lm: TransformerLM, trainable: Trainable) -> Layout:
    params = dict(lm.named_parameters())
    return Layout.from_shapes({n: tuple(params[n].shape) for n in lm.trainable_names(trainable)})


def _train_example(cfg: ModelConfig, batch: int) -> tuple[torch.Tensor, ...]:
    s = cfg.max_seq_len
    tokens = torch.randint(4, cfg.vocab_size, (batch, s))
    return (
        tokens,
        tokens.clone(),
        torch.arange(s).expand(batch, s).contiguous(),
        torch.zeros(batch, s, dtype=torch.long),
    )


def export_train_program(lm: TransformerLM, trainable: Trainable, batch: int) -> bytes:
    """The joint forward+backward program (loss first), XNNPACK per-op with dynamic weights."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import MMConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        AddConfig,
        BMMConfig,
        ExpConfig,
        GeluConfig,
        MulConfig,
        PermuteConfig,
        SoftmaxConfig,
        TanhConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward

    ctx = _quiet()
    try:
        model = TransformerLM(replace(lm.cfg, dropout=0.0))
        model.load_state_dict(lm.state_dict())
        model.set_trainable(trainable)
        ep = torch.export.export(TrainStep(model), _train_example(model.cfg, batch), strict=True)
        ep = _export_forward_backward(ep)
        # One delegate per op: larger XNNPACK partitions would capture pass-through outputs of
        # the joint graph, and weights must stay runtime inputs (not packed constants).
        partitioner = XnnpackPartitioner(
            configs=[
                MMConfig,
                BMMConfig,
                PermuteConfig,
                GeluConfig,
                SoftmaxConfig,
                TanhConfig,
                ExpConfig,
                MulConfig,
                AddConfig,
            ],
            per_op_mode=True,
            force_non_static_weights_for_f32_linear=True,
        )
        prog = to_edge_transform_and_lower(ep, partitioner=[partitioner]).to_executorch()
        return bytes(prog.buffer)
    finally:
        ctx.__exit__(None, None, None)


def _export_train_detached(
    cfg: ModelConfig, state: dict[str, torch.Tensor], trainable: Trainable, batch: int
) -> bytes:
    """:func:`export_train_program` in a child process (the model travels as its state)."""
    lm = TransformerLM(cfg)
    lm.load_state_dict(state)
    return export_train_program(lm, trainable, batch)


# Below this many parameters a child process's start-up (importing torch and ExecuTorch, a few
# seconds) costs more than exporting both programs one after the other.
_PARALLEL_EXPORT_PARAMS = 1_000_000


def _export_programs(lm: TransformerLM, spec: BundleSpec, train: bytes | None = None) -> tuple[bytes, bytes]:
    """(train.pte, predict.pte), reusing ``train`` if given; on two or more cores the two
    exports run side by side.

    Lowering is single-threaded Python, so the train program (about 2/3 of the export time of
    the demo model) is exported in a spawned child while this process exports the predictor.
    """
    params = sum(p.numel() for p in lm.parameters())
    if train is not None or (os.cpu_count() or 1) < 2 or params < _PARALLEL_EXPORT_PARAMS:
        if train is None:
            log.info("exporting train.pte (%s)", spec.trainable)
            train = export_train_program(lm, spec.trainable, spec.train_batch)
        log.info("exporting predict.pte (%s)", spec.quantization)
        return train, export_predict_program(lm, spec.quantization, spec.beam_batch)
    log.info("exporting train.pte (%s) and predict.pte (%s) side by side", spec.trainable, spec.quantization)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=quiet_python_logs
    ) as pool:
        job = pool.submit(_export_train_detached, lm.cfg, state, spec.trainable, spec.train_batch)
        predict = export_predict_program(lm, spec.quantization, spec.beam_batch)
        return job.result(), predict


def _predict_examples(cfg: ModelConfig, beam: int) -> dict[str, tuple[torch.Tensor, ...]]:
    s, length = cfg.max_seq_len, max(2, cfg.max_seq_len // 4)
    tokens = torch.zeros(1, s, dtype=torch.long)
    tokens[0, :length] = torch.randint(4, cfg.vocab_size, (length,))
    tokens[0, 0] = BOS_ID
    cache = torch.zeros(cfg.n_layers, beam, cfg.n_heads, s, cfg.head_dim)
    return {
        "prefill": (tokens, torch.tensor([length])),
        "step": (
            torch.randint(4, cfg.vocab_size, (beam, 1)),
            torch.tensor([length]),
            cache,
            cache.clone(),
        ),
        "score": (tokens, torch.roll(tokens, -1, 1)),
    }


def export_predict_program(lm: TransformerLM, quantization: Quantization, beam: int) -> bytes:
    """``prefill``/``step``/``score`` methods, XNNPACK-delegated; LoRA adapters merged."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ctx = _quiet()
    try:
        model = lm.merged()
        modules = {
            "prefill": PredictPrefill(model),
            "step": PredictStep(model),
            "score": PredictScore(model),
        }
        examples = _predict_examples(model.cfg, beam)
        programs = {}
        for name, module in modules.items():
            args = examples[name]
            ep = torch.export.export(module.eval(), args, strict=True)
            if quantization == "int8":
                ep = _quantize_int8(ep, args)
            programs[name] = ep
        prog = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()]).to_executorch()
        return bytes(prog.buffer)
    finally:
        ctx.__exit__(None, None, None)


def _quantize_int8(
    ep: torch.export.ExportedProgram, args: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """int8 per-channel weights, dynamic int8 activations (XNNPACK's quantizer, PT2E flow)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    )
    # The output projection (tied to the embedding) stays fp32: it runs on one row per call,
    # so int8 would save nothing, and its precision decides which word ranks first.
    quantizer.set_filter_function(
        lambda node: not any("tok_emb" in str(getattr(a, "target", a)) for a in node.args)
    )
    prepared = prepare_pt2e(ep.module(), quantizer)
    prepared(*args)
    return torch.export.export(convert_pt2e(prepared), args, strict=True)


def _file_entry(path: Path) -> FileEntry:
    return FileEntry(file=path.name, sha256=sha256_file(path), size=path.stat().st_size)


def _save_tensors(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> None:
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


def build_bundle(
    out: Path,
    lm: TransformerLM,
    tokenizer_model: bytes,
    spec: BundleSpec,
    *,
    profile: str,
    model_version: int = 0,
    metrics: dict[str, float] | None = None,
    train_program: bytes | None = None,
) -> Manifest:
    """Write a bundle directory (and ``out.tar``): tokenizer, programs, weights, manifest.

    ``train_program`` reuses an already exported ``train.pte`` (it does not depend on weights
    in ``full`` mode, only on shapes), which is how new model versions are published quickly.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    layout = trainable_layout(lm, spec.trainable)
    state = {n: p.detach().numpy() for n, p in lm.named_parameters()}
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    _save_tensors(out / "weights.safetensors", {n: state[n] for n in layout.names})
    base = None
    if spec.trainable == "lora":
        _save_tensors(out / "base.safetensors", {n: a for n, a in state.items() if n not in layout.names})
        base = _file_entry(out / "base.safetensors")
    train_program, predict_program = _export_programs(lm, spec, train_program)
    (out / "train.pte").write_bytes(train_program)
    (out / "predict.pte").write_bytes(predict_program)
    cfg = lm.cfg
    manifest = Manifest(
        model_version=model_version,
        profile=profile,
        architecture=Architecture(
            vocab_size=cfg.vocab_size,
            max_seq_len=cfg.max_seq_len,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_ff=cfg.d_ff,
            tie_embeddings=cfg.tie_embeddings,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            parameters=sum(p.numel() for p in lm.parameters()),
        ),
        tokenizer=_file_entry(out / "tokenizer.model"),
        weights=_file_entry(out / "weights.safetensors"),
        base_weights=base,
        train=TrainSpec(
            program=_file_entry(out / "train.pte"),
            batch_size=spec.train_batch,
            seq_len=cfg.max_seq_len,
            trainable=spec.trainable,
            layout=layout,
        ),
        predict=PredictSpec(
            program=_file_entry(out / "predict.pte"),
            quantization=spec.quantization,
            beam_batch=spec.beam_batch,
            max_seq_len=cfg.max_seq_len,
        ),
        metrics=metrics or {},
    )
    (out / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    pack_bundle(out, out.with_suffix(".tar"))
    return manifest


def model_from_bundle(root: Path, manifest: Manifest, weights: FloatVec | None = None) -> TransformerLM:
    """Rebuild the eager model of a bundle, optionally with another flat trainable vector."""
    from safetensors.numpy import load_file

    arch = manifest.architecture
    cfg = ModelConfig(
        vocab_size=arch.vocab_size,
        max_seq_len=arch.max_seq_len,
        d_model=arch.d_model,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        d_ff=arch.d_ff,
        dropout=0.0,
        tie_embeddings=arch.tie_embeddings,
        lora_rank=arch.lora_rank,
        lora_alpha=arch.lora_alpha,
    )
    lm = TransformerLM(cfg)
    state: dict[str, Any] = {}
    if manifest.base_weights is not None:
        state.update(load_file(str(root / manifest.base_weights.file)))
    layout = manifest.train.layout
    if weights is None:
        state.update(load_file(str(root / manifest.weights.file)))
    else:
        state.update(layout.unflatten(weights))
    lm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return lm.eval()
