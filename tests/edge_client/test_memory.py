"""The device process's memory: allocator settings, page release, torch's deferred
registrations, and the trainer's weight I/O that never holds a second copy of the weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.memory import peak_rss_mb, release_pages, rss_mb, trim, tune_allocator
from protocol.bundle import load_bundle
from protocol.layout import LayoutError

ROOT = Path(__file__).resolve().parents[2]


def test_allocator_settings_and_rss_readings() -> None:
    assert tune_allocator() is (sys.platform == "linux")  # glibc: applied
    trim()
    assert math.isfinite(rss_mb()) and peak_rss_mb() >= rss_mb() > 0


def test_release_pages_drops_a_memory_map_from_the_resident_set(tmp_path: Path) -> None:
    f = tmp_path / "v.f32"
    np.ones(4 << 20, dtype=np.float32).tofile(f)  # 16 MB
    mapped = np.memmap(f, dtype=np.float32, mode="r")
    before = rss_mb()
    assert float(mapped[::1024].sum()) == 4096  # touches every page
    assert rss_mb() - before > 12
    release_pages(mapped[10:20])  # any view of the map releases all of it
    assert rss_mb() - before < 4
    assert float(mapped.sum()) == 4 << 20  # still readable: pages come back from the cache
    release_pages(np.ones(3))  # an ordinary array: nothing to do


@pytest.mark.slow
def test_trainer_reads_weights_from_a_map_or_a_file_and_writes_them_to_a_file(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    from edge_client.runtime import Trainer

    bundle = load_bundle(tiny_bundle_dir)
    w = bundle.initial_weights() + np.float32(0.01)
    f = tmp_path / "w.f32"
    w.tofile(f)
    trainer = Trainer.from_bundle(bundle)
    trainer.set_weights(np.memmap(f, dtype=np.float32, mode="r"))
    np.testing.assert_array_equal(trainer.get_weights(), w)
    trainer.save_weights(tmp_path / "out.f32")
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.f32", dtype="<f4"), w)
    bad = w.copy()
    bad[-1] = np.nan
    with pytest.raises(LayoutError, match="NaN"):
        trainer.set_weights(bad)
    with pytest.raises(LayoutError, match="layout needs"):
        trainer.set_weights(w[:-1])
    # from the file itself (a device's cached weights): read into the parameters, never mapped
    w2 = w + np.float32(0.5)
    w2.tofile(f)
    trainer.set_weights(f)
    np.testing.assert_array_equal(trainer.get_weights(), w2)
    bad.tofile(tmp_path / "bad.f32")
    with pytest.raises(LayoutError, match="NaN"):
        trainer.set_weights(tmp_path / "bad.f32")
    np.testing.assert_array_equal(trainer.get_weights(), w2)  # refused before anything was copied
    w[:-1].tofile(tmp_path / "short.f32")
    with pytest.raises(LayoutError, match="layout needs"):
        trainer.set_weights(tmp_path / "short.f32")
    trainer.close()
    assert trainer.params == {}


_PROBE = """
import json, sys
from pathlib import Path
from edge_client.memory import defer_torch_registrations, rss_mb
applied = defer_torch_registrations()
import torch
after_import = rss_mb()
import numpy as np
from edge_client.batching import encode_messages, pack_batches
from protocol.bundle import load_bundle
from edge_client.runtime import OptimizerConfig, Predictor, Trainer
from edge_client.tokenizer import Tokenizer
b = load_bundle(Path(sys.argv[1]))
t = Trainer.from_bundle(b)
t.set_weights(b.initial_weights())
seqs = encode_messages(Tokenizer(b.path(b.manifest.tokenizer)), ["hello there", "how are you"], t.seq_len)
batches = [*pack_batches(seqs, t.batch_size, t.seq_len), *pack_batches(seqs, t.batch_size, t.seq_len)]
stats = t.train(batches, OptimizerConfig(), max_steps=2)
words = [s.word for s in Predictor.from_bundle(b).suggest("how are ", 3)]
lazy = type(sys.modules["torch._meta_registrations"]).__name__ == "_LazyModule"
out = {"applied": applied, "rss": after_import, "steps": stats.steps, "words": words, "lazy": lazy}
print(json.dumps(out))
"""


def _probe(bundle: Path, full: bool) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDKEYS_FULL_TORCH": "1" if full else "0"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundle)], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_deferred_torch_registrations_save_memory_and_the_device_still_trains_and_predicts(
    tiny_bundle_dir: Path,
) -> None:
    lean = _probe(tiny_bundle_dir, full=False)
    full = _probe(tiny_bundle_dir, full=True)
    assert lean["applied"] is True and full["applied"] is False
    assert lean["lazy"] is True and full["lazy"] is False  # a round never needs the meta kernels
    assert lean["steps"] == full["steps"] == 2
    assert lean["words"] == full["words"] and len(lean["words"]) == 3  # type: ignore[arg-type]
    assert float(full["rss"]) - float(lean["rss"]) > 8  # type: ignore[arg-type]  # ~18 MB


def test_dropping_the_codec_caches_forgets_the_rounds_randomness() -> None:
    from edge_client.participation import drop_codec_caches
    from protocol.codec import CodecParams, kept_indices, rotation_signs

    p = CodecParams(clip_norm=1.0, keep_fraction=0.25, bits=8, max_clients=3, seed=7, weight_cap=1)
    signs, kept = rotation_signs(p, 5000), kept_indices(p, 5000)
    assert rotation_signs(p, 5000) is signs  # cached: an encoder reuses them within a round
    drop_codec_caches()
    assert rotation_signs(p, 5000) is not signs
    np.testing.assert_array_equal(rotation_signs(p, 5000), signs)  # same round, same values
    np.testing.assert_array_equal(kept_indices(p, 5000), kept)
