"""A device runs the CPU build of torch, never a CUDA one.

pip's default torch on PyPI is a CUDA build for both x86_64 and aarch64 (``2.13.0`` with
``torch.version.cuda`` set, plus gigabytes of ``nvidia-*`` wheels): on a Raspberry Pi or a
phone that is a 5 GB install and about 400 MB more resident memory on ``import torch``
(bench/RESULTS.md), for GPUs the device does not have. ``fedkeys client run`` refuses to start
on such a build and prints the command that replaces it; ``FEDKEYS_ALLOW_CUDA_TORCH=1`` lets it
start anyway (a workstation with a GPU taking part as a device).
"""

from __future__ import annotations

import os

__all__ = ["ALLOW_ENV", "CPU_INDEX", "allowed_anyway", "cuda_build_problem", "fix_command"]

ALLOW_ENV = "FEDKEYS_ALLOW_CUDA_TORCH"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def fix_command(version: str) -> str:
    """The pip command that puts the CPU build of this torch release in its place."""
    release = version.split("+", 1)[0]
    return f"pip install --force-reinstall --no-deps torch=={release} --index-url {CPU_INDEX}"


def cuda_build_problem(cuda: str | None, version: str) -> str | None:
    """Why this torch must not run on a device (None: it is a CPU build).

    ``cuda`` and ``version`` are ``torch.version.cuda`` and ``torch.__version__``."""
    if not cuda:
        return None
    return (
        f"torch {version} is a CUDA build (CUDA {cuda}): a device needs the CPU build, "
        f"which is smaller on disk and in memory. Replace it with:\n  {fix_command(version)}\n"
        f"(then `pip uninstall` the nvidia-* packages; or set {ALLOW_ENV}=1 to run anyway)"
    )


def allowed_anyway() -> bool:
    return os.environ.get(ALLOW_ENV, "") not in ("", "0")
