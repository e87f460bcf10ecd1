"""A device refuses a CUDA build of torch, with the command that replaces it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_client.install_check import ALLOW_ENV, CPU_INDEX, cuda_build_problem, fix_command
from fedkeys.cli import main


def test_cpu_build_passes_and_cuda_build_is_named() -> None:
    assert torch.version.cuda is None  # what the Makefile installs here
    assert cuda_build_problem(torch.version.cuda, torch.__version__) is None
    problem = cuda_build_problem("13.0", "2.13.0+cu130")
    assert problem is not None and "CUDA 13.0" in problem and fix_command("2.13.0+cu130") in problem
    assert (
        fix_command("2.13.0+cu130")
        == f"pip install --force-reinstall --no-deps torch==2.13.0 --index-url {CPU_INDEX}"
    )


def test_client_run_refuses_a_cuda_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    argv = [
        "client",
        "--state-dir",
        str(tmp_path),
        "run",
        "--coordinator",
        "https://127.0.0.1:9",
        "--max-minutes",
        "0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "CUDA build" in err
        and "--index-url https://download.pytorch.org/whl/cpu" in err
        and "Traceback" not in err
    )
    monkeypatch.setenv(ALLOW_ENV, "1")  # let through: the next check (--max-minutes 0) speaks
    assert main(argv) == 2
    assert "--max-minutes must be a positive number" in capsys.readouterr().err


def test_a_client_without_executorch_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from edge_client import install_check

    assert install_check.executorch_problem() is None  # installed here
    assert install_check.executorch_pin().startswith("executorch==")  # from fedkeys' metadata
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a)
    )
    for argv in (["run", "--coordinator", "https://127.0.0.1:9"], ["suggest", "how are "]):
        assert main(["client", "--state-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert "pip install --no-deps executorch==" in err and "Traceback" not in err
