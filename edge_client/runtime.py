"""The on-device runtime: ExecuTorch training (``train.pte``) and prediction (``predict.pte``).

What the device runs is exactly what ``model_export`` evaluates: both go through this module.
Every call into ExecuTorch goes through :func:`edge_client.native.native_call` (one thread at a
time per process, the runtime's log kept off stderr unless ``FEDKEYS_NATIVE_LOGS=1``): several
threads of one process (the simulator's devices, the tests' agents) could deadlock in the
runtime otherwise; :mod:`edge_client.native` says how.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from edge_client.batching import IGNORE_INDEX, Batch
from edge_client.memory import release_pages
from edge_client.native import native_call, native_section
from edge_client.predictor import BeamSearch, FloatArray, Suggestion
from edge_client.tokenizer import Tokenizer
from protocol.bundle import Bundle
from protocol.layout import FloatVec, Layout, LayoutError

__all__ = ["OptimizerConfig", "Predictor", "ProgramModel", "TrainStats", "Trainer", "set_threads"]

log = logging.getLogger(__name__)


def _bindings() -> Any:
    """ExecuTorch's C++ bindings, imported directly.

    ``executorch.runtime`` and ``executorch.extension.training`` import the exporter
    (``executorch.exir``, torchao): about 150 MB of resident memory a device does not need. The
    bindings themselves only need libtorch loaded first (``import torch`` above).
    """
    return importlib.import_module("executorch.extension.pybindings._C")


class _Threads:
    """The thread count set in this process (both pools are per process)."""

    lock = threading.Lock()
    count: int | None = None


def set_threads(n: int) -> None:
    """Threads for ExecuTorch's XNNPACK threadpool and torch's own ops (1 = one core).

    Both are per process: the pools are rebuilt only when the count changes, by one thread at a
    time (the reset is "unsafe" while the pool runs work, and its first call sets the pool up).
    """
    n = max(1, n)
    with _Threads.lock:
        if _Threads.count == n:
            return
        native_call(_bindings()._unsafe_reset_threadpool, n)
        torch.set_num_threads(n)
        _Threads.count = n


class ProgramModel:
    """``predict.pte`` as a :class:`~edge_client.predictor.StepModel`."""

    def __init__(self, program: Path, max_seq_len: int, beam_batch: int) -> None:
        c = _bindings()
        self._program = native_call(
            c._load_program,
            str(program),
            enable_etdump=False,
            debug_buffer_size=0,
            program_verification=c.Verification.InternalConsistency,
            data_path=None,
        )
        self._prefill = native_call(self._program.load_method, "prefill")
        self._step = native_call(self._program.load_method, "step")
        self._score = native_call(self._program.load_method, "score")
        self.max_seq_len = max_seq_len
        self.beam_batch = beam_batch

    def prefill(self, ids: list[int]) -> tuple[FloatArray, FloatArray, FloatArray]:
        tokens = torch.zeros(1, self.max_seq_len, dtype=torch.long)
        tokens[0, : len(ids)] = torch.tensor(ids)
        logp, k, v = native_call(self._prefill, [tokens, torch.tensor([len(ids)])])
        return logp[0].numpy(), k.numpy(), v.numpy()  # outputs are copies owned by us

    def step(
        self, tokens: npt.NDArray[np.int64], pos: int, k: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        out = native_call(
            self._step,
            [
                torch.from_numpy(tokens).view(-1, 1),
                torch.tensor([pos]),
                torch.from_numpy(k),  # views of the search's contiguous cache buffers
                torch.from_numpy(v),
            ],
        )
        return out[0].numpy(), out[1].numpy(), out[2].numpy()

    def score(self, ids: list[int]) -> FloatArray:
        """Log-prob of each next piece: ids[1:] given their prefixes (len <= S + 1)."""
        s = self.max_seq_len
        tokens = torch.zeros(1, s, dtype=torch.long)
        targets = torch.zeros(1, s, dtype=torch.long)
        n = min(len(ids) - 1, s)
        tokens[0, :n] = torch.tensor(ids[:n])
        targets[0, :n] = torch.tensor(ids[1 : n + 1])
        (logp,) = native_call(self._score, [tokens, targets])
        return np.asarray(logp[0, :n].numpy(), dtype=np.float32)


class Predictor:
    """Next-word suggestions of one bundle (tokenizer + ``predict.pte``)."""

    def __init__(self, model: ProgramModel, tokenizer: Tokenizer, max_pieces: int = 4) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.search = BeamSearch(model, tokenizer, max_pieces=max_pieces)

    @classmethod
    def from_bundle(cls, bundle: Bundle, program: Path | None = None) -> Predictor:
        """``program`` overrides the bundle's own ``predict.pte`` (a newer model version)."""
        spec = bundle.manifest.predict
        model = ProgramModel(program or bundle.path(spec.program), spec.max_seq_len, spec.beam_batch)
        return cls(model, Tokenizer(bundle.path(bundle.manifest.tokenizer)))

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        return self.search.suggest(text, k)


@dataclass(frozen=True)
class OptimizerConfig:
    """Device-side optimizer, applied in place to the program's live parameter tensors."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class TrainStats:
    steps: int
    examples: int  # target tokens trained on
    mean_loss: float
    first_loss: float
    last_loss: float
    seconds: float
    aborted: bool = False


class Trainer:
    """``train.pte`` with its parameters exposed as one flat float32 vector (the layout).

    The ExecuTorch training module returns its parameters as tensors that alias the runtime's
    memory; they exist only after the first ``forward_backward``, so the constructor runs one
    step on an all-padding batch (zero loss weight) to materialise them.
    """

    def __init__(self, program: Path, layout: Layout, batch_size: int, seq_len: int) -> None:
        # From the file (memory-mapped by ExecuTorch), not from a Python bytes copy of it.
        self._module = native_call(_bindings()._load_for_executorch, str(program))
        self.layout = layout
        self.batch_size, self.seq_len = batch_size, seq_len
        run = self._module.run_method
        self._grad_start = native_call(run, "__et_training_gradients_index_forward", ())[0]
        self._param_start = native_call(run, "__et_training_parameters_index_forward", ())[0]
        fqns = native_call(run, "__et_training_fqn_forward", ())
        self._names = [n.removeprefix("lm.") for n in fqns]
        if sorted(self._names) != sorted(layout.names):
            raise ValueError("train.pte parameters do not match the bundle layout")
        pad = Batch(
            tokens=np.zeros((batch_size, seq_len), dtype=np.int64),
            targets=np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64),
            positions=np.zeros((batch_size, seq_len), dtype=np.int64),
            segments=np.zeros((batch_size, seq_len), dtype=np.int64),
        )
        outs = self._run(pad)
        self.params: dict[str, torch.Tensor] = dict(zip(self._names, outs[self._param_start :], strict=True))

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Trainer:
        spec = bundle.manifest.train
        return cls(bundle.path(spec.program), spec.layout, spec.batch_size, spec.seq_len)

    def _run(self, b: Batch) -> list[torch.Tensor]:
        if b.tokens.shape != (self.batch_size, self.seq_len):
            raise ValueError(f"batch shape {b.tokens.shape} != program's {(self.batch_size, self.seq_len)}")
        args = [torch.from_numpy(a) for a in (b.tokens, b.targets, b.positions, b.segments)]
        out: list[torch.Tensor] = native_call(self._module.run_method, "forward", args, clone_outputs=False)
        return out

    def set_weights(self, vec: npt.ArrayLike | Path) -> None:
        """Copy a flat vector into the live parameters, one tensor at a time.

        A file (the device's cached global weights, raw little-endian float32) is read into
        the parameters with plain reads, never mapped: a mapping of a file the kernel caches in
        large folios pages in 2 MB at a time, whatever is touched. A memory-mapped vector is
        read a megabyte at a time and its pages are dropped again as it goes. A vector with NaN
        or Inf is refused before anything is copied.
        """
        if isinstance(vec, Path):
            self._set_weights_from_file(vec)
            return
        v = np.asarray(vec)
        if v.ndim != 1 or v.shape[0] != self.layout.size:
            raise LayoutError(f"vector has shape {v.shape}, layout needs ({self.layout.size},)")
        step = 1 << 18  # elements per pass
        for i in range(0, v.shape[0], step):
            if not np.isfinite(v[i : i + step]).all():
                raise LayoutError("weights contain NaN or Inf")
            release_pages(v)
        for e in self.layout.entries:
            dst = self.params[e.name].numpy().reshape(-1)  # a view of the runtime's memory
            for i in range(0, e.numel, step):
                src = v[e.offset + i : e.offset + min(i + step, e.numel)]
                np.copyto(dst[i : i + src.shape[0]], src, casting="same_kind")
                release_pages(v)

    def _set_weights_from_file(self, path: Path, step: int = 1 << 18) -> None:
        size = path.stat().st_size
        if size != 4 * self.layout.size:
            raise LayoutError(f"{path.name} holds {size} bytes, layout needs {4 * self.layout.size}")
        buf = np.empty(step, dtype="<f4")
        with path.open("rb", buffering=0) as f:
            for i in range(0, self.layout.size, step):  # first pass: refuse NaN/Inf
                part = buf[: min(step, self.layout.size - i)]
                if f.readinto(part.view(np.uint8).data) != part.nbytes:
                    raise LayoutError(f"{path.name} changed while it was read")
                if not np.isfinite(part).all():
                    raise LayoutError("weights contain NaN or Inf")
            for e in self.layout.entries:  # then straight into the runtime's memory
                f.seek(4 * e.offset)
                dst = self.params[e.name].numpy().reshape(-1)
                if dst.dtype != np.float32 or not dst.flags.c_contiguous:
                    raise LayoutError(f"parameter {e.name} is not a contiguous float32 tensor")
                for i in range(0, e.numel, step):
                    part = dst[i : min(i + step, e.numel)]
                    if f.readinto(part.view(np.uint8).data) != part.nbytes:
                        raise LayoutError(f"{path.name} changed while it was read")

    def save_weights(self, path: Path) -> None:
        """Write the live parameters to ``path`` as one flat float32 vector in layout order."""
        with path.open("wb") as f:
            for e in self.layout.entries:
                self.params[e.name].detach().numpy().astype("<f4", copy=False).tofile(f)

    def get_weights(self) -> FloatVec:
        """The live parameters as a new flat vector."""
        return self.layout.flatten({n: t.detach().numpy() for n, t in self.params.items()})

    def close(self) -> None:
        """Free the program and its planned memory (parameters, gradients, activations).

        The parameter tensors alias that memory: nothing may use them afterwards.
        """
        self.params = {}
        with native_section():  # the program is freed here, by the runtime
            self._module = None

    def loss(self, b: Batch) -> float:
        """Loss of one batch (this also computes gradients; parameters do not change)."""
        return float(self._run(b)[0].item())

    def gradients(self, b: Batch) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss and gradient (copies) of one batch, without changing the parameters."""
        out = self._run(b)
        grads = out[self._grad_start : self._param_start]
        return float(out[0].item()), {n: g.clone() for n, g in zip(self._names, grads, strict=True)}

    def train(
        self,
        batches: Iterable[Batch],
        opt: OptimizerConfig,
        *,
        max_steps: int,
        max_seconds: float = math.inf,
        should_continue: Any = None,
    ) -> TrainStats:
        """Run up to ``max_steps`` optimizer steps within ``max_seconds``.

        ``should_continue()`` is asked before each step (device still eligible?); when it says
        no, training stops and the stats say ``aborted``.
        """
        m: dict[str, torch.Tensor] = {}  # SGD momentum buffers, or Adam's first moments
        vv: dict[str, torch.Tensor] = {}  # Adam's second moments
        losses: list[float] = []
        examples, steps, aborted = 0, 0, False
        t0 = time.perf_counter()
        for b in batches:
            if steps >= max_steps or time.perf_counter() - t0 >= max_seconds:
                break
            if should_continue is not None and not should_continue():
                aborted = True
                break
            out = self._run(b)
            losses.append(float(out[0].item()))
            grads = dict(zip(self._names, out[self._grad_start : self._param_start], strict=True))
            # the gradients alias the program's memory: used before the next run overwrites them
            if opt.name == "sgd":
                self._sgd(grads, m, opt)
            else:
                self._adam(grads, m, vv, steps + 1, opt)
            steps += 1
            examples += b.n_targets
        secs = time.perf_counter() - t0
        if not losses:
            return TrainStats(0, 0, math.nan, math.nan, math.nan, secs, aborted)
        return TrainStats(steps, examples, float(np.mean(losses)), losses[0], losses[-1], secs, aborted)

    @torch.no_grad()
    def _sgd(
        self, grads: dict[str, torch.Tensor], buf: dict[str, torch.Tensor], opt: OptimizerConfig
    ) -> None:
        """SGD with optional momentum and weight decay, in place on the live parameters."""
        for name, p in self.params.items():
            g = grads[name]
            if opt.weight_decay:
                g = g.add(p, alpha=opt.weight_decay)
            if opt.momentum:
                b = buf.get(name)
                if b is None:
                    b = buf[name] = g.clone()
                else:
                    b.mul_(opt.momentum).add_(g)
                g = b
            p.add_(g, alpha=-opt.lr)

    @torch.no_grad()
    def _adam(
        self,
        grads: dict[str, torch.Tensor],
        m: dict[str, torch.Tensor],
        v: dict[str, torch.Tensor],
        t: int,
        opt: OptimizerConfig,
    ) -> None:
        b1, b2 = opt.betas
        c1, c2 = 1 - b1**t, 1 - b2**t
        for name, p in self.params.items():
            g = grads[name]
            if name not in m:
                m[name], v[name] = torch.zeros_like(p), torch.zeros_like(p)
            if opt.weight_decay:
                p.mul_(1 - opt.lr * opt.weight_decay)
            m[name].mul_(b1).add_(g, alpha=1 - b1)
            v[name].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m[name] / c1, (v[name] / c2).sqrt_().add_(opt.eps), value=-opt.lr)
