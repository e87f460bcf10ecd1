"""Bundle files: loading, hash checks, tarball round trip, and the weights read without the
safetensors package (checked against the files that package writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from protocol.bundle import (
    MANIFEST_NAME,
    BundleError,
    FileEntry,
    Manifest,
    extract_bundle,
    load_bundle,
    pack_bundle,
    sha256_file,
)
from protocol.layout import Layout

SHAPES = {"emb": (7, 3), "scale": (), "empty": (0, 4), "out": (5,)}


def _entry(path: Path) -> dict[str, object]:
    return FileEntry(file=path.name, sha256=sha256_file(path), size=path.stat().st_size).model_dump()


def _bundle_dir(root: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A bundle directory whose programs and tokenizer are placeholders (only hashed here)."""
    root.mkdir()
    for name in ("tokenizer.model", "train.pte", "predict.pte"):
        (root / name).write_bytes(name.encode())
    save_file(tensors, str(root / "weights.safetensors"), metadata={"format": "np"})
    layout = Layout.from_shapes(SHAPES)
    manifest = Manifest.model_validate(
        {
            "model_version": 3,
            "profile": "test",
            "architecture": {
                "vocab_size": 7,
                "max_seq_len": 4,
                "d_model": 3,
                "n_layers": 1,
                "n_heads": 1,
                "d_ff": 4,
                "tie_embeddings": True,
                "lora_rank": 0,
                "lora_alpha": 1.0,
                "parameters": layout.size,
            },
            "tokenizer": _entry(root / "tokenizer.model"),
            "weights": _entry(root / "weights.safetensors"),
            "train": {
                "program": _entry(root / "train.pte"),
                "batch_size": 1,
                "seq_len": 4,
                "trainable": "full",
                "layout": layout.model_dump(),
            },
            "predict": {
                "program": _entry(root / "predict.pte"),
                "quantization": "fp32",
                "beam_batch": 1,
                "max_seq_len": 4,
            },
        }
    )
    (root / MANIFEST_NAME).write_text(manifest.model_dump_json(), encoding="utf-8")
    return root


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def test_initial_weights_equal_what_safetensors_reads(tmp_path: Path) -> None:
    root = _bundle_dir(tmp_path / "b", _tensors())
    bundle = load_bundle(root)
    layout = bundle.manifest.train.layout
    want = layout.flatten(load_file(str(root / "weights.safetensors")))
    got = bundle.initial_weights()
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, want)


def test_pack_extract_round_trip_and_tampering(tmp_path: Path) -> None:
    root = _bundle_dir(tmp_path / "b", _tensors(1))
    tarball = pack_bundle(root, tmp_path / "b.tar")
    copy = extract_bundle(tarball, tmp_path / "copy")
    assert copy.manifest == load_bundle(root).manifest
    np.testing.assert_array_equal(copy.initial_weights(), load_bundle(root).initial_weights())
    (copy.root / "train.pte").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"size|sha256"):
        load_bundle(copy.root)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("float16", "not .* float32"),
        ("range", "not .* float32"),
        ("header_size", "header size"),
        ("header_json", "unreadable safetensors header"),
    ],
)
def test_unreadable_weights_are_a_bundle_error(tmp_path: Path, damage: str, reason: str) -> None:
    tensors = _tensors(2)
    if damage == "float16":
        tensors["out"] = tensors["out"].astype(np.float16)
    root = _bundle_dir(tmp_path / "b", tensors)
    path = root / "weights.safetensors"
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    if damage == "range":
        header = json.loads(raw[8 : 8 + size])
        begin, end = header["emb"]["data_offsets"]
        header["emb"]["data_offsets"] = [begin, end - 4]
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= size
        raw[8 : 8 + size] = text.ljust(size)
    elif damage == "header_size":
        raw[:8] = (1 << 40).to_bytes(8, "little")
    elif damage == "header_json":
        raw[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=reason):
        load_bundle(root, verify=False).initial_weights()
