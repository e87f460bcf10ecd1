"""deploy/install-client.sh, the one install procedure of a device, makes a client that takes
part in a real round: a fresh venv with torch's CPU build, executorch without its dependencies
and fedkeys' ``client`` extra (no pandas, scikit-learn, coremltools, torchao, hydra, ...), whose
``fedkeys client`` processes enrol, train with ExecuTorch and upload against a coordinator over
TLS (bench/client_bench.py's round, the devices running the installed interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORT_ONLY = ("pandas", "scikit-learn", "coremltools", "torchao", "hydra-core", "scipy", "ray", "fastapi")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_documented_client_install_runs_a_round(
    tmp_path: Path, tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    env = {**os.environ, "FEDKEYS_VENV": str(venv), "FEDKEYS_TORCH_INDEX": "pip", "PYTHON": sys.executable}
    out = subprocess.run(
        ["sh", str(ROOT / "deploy/install-client.sh"), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "installed in" in out.stdout
    listed = subprocess.run(
        [str(venv / "bin/pip"), "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    names = {line.split("==", 1)[0] for line in listed.splitlines()}
    assert {"torch", "executorch", "fedkeys", "sentencepiece", "httpx"} <= names
    assert not names & set(EXPORT_ONLY), names & set(EXPORT_ONLY)
    torch_info = subprocess.run(
        [str(venv / "bin/python"), "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert torch_info.stdout.strip() == "None"  # the CPU build

    from bench import client_bench

    monkeypatch.setattr(client_bench, "FEDKEYS", [str(venv / "bin/python"), "-m", "fedkeys.cli"])
    results = client_bench.one_round(tiny_bundle_dir, 3, tmp_path / "round")
    assert [r["round_outcome"] for r in results] == ["committed"] * 3
    assert all(r["completed"] and r["training"].get("steps", 0) >= 1 for r in results)


def test_install_script_refuses_what_is_not_a_checkout(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", str(ROOT / "deploy/install-client.sh"), str(tmp_path)],
        env={**os.environ, "FEDKEYS_VENV": str(tmp_path / "v")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "not a fedkeys checkout" in out.stderr and not (tmp_path / "v").exists()
