"""What a device's install must hold: the CPU build of torch, and the ExecuTorch runtime.

**The CPU build of torch, never a CUDA one.**
pip's default torch on PyPI is a CUDA build for both x86_64 and aarch64 (``2.13.0`` with
``torch.version.cuda`` set, plus gigabytes of ``nvidia-*`` wheels): on a Raspberry Pi or a
phone that is a 5 GB install and about 400 MB more resident memory on ``import torch``
(bench/RESULTS.md), for GPUs the device does not have. ``fedkeys client run`` refuses to start
on such a build and prints the command that replaces it; ``FEDKEYS_ALLOW_CUDA_TORCH=1`` lets it
start anyway (a workstation with a GPU taking part as a device).

**ExecuTorch, installed without its dependencies.** The ``client`` extra leaves executorch out,
because pip would bring its export-time dependencies along (coremltools, pandas, scikit-learn,
hydra-core, torchao, ...: 415 MB and 43 packages that a device never imports);
deploy/install-client.sh installs it with ``--no-deps``. A client without it says so and how.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

__all__ = [
    "ALLOW_ENV",
    "CPU_INDEX",
    "allowed_anyway",
    "cuda_build_problem",
    "executorch_problem",
    "fix_command",
]

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


def executorch_pin() -> str:
    """The executorch requirement this fedkeys declares (its ``executorch`` extra)."""
    try:
        requires = importlib.metadata.requires("fedkeys") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        m = re.match(r"\s*(executorch\s*==\s*[^;\s]+)", req)
        if m:
            return m.group(1).replace(" ", "")
    return "executorch"


def executorch_problem() -> str | None:
    """Why the ExecuTorch runtime cannot load here (None: it is installed)."""
    if importlib.util.find_spec("executorch") is not None:
        return None
    return (
        f"the ExecuTorch runtime is not installed: pip install --no-deps {executorch_pin()}"
        " (deploy/install-client.sh installs a device's client)"
    )
