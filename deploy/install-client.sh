#!/bin/sh
# Install the fedkeys device client into a virtual environment: the one procedure for a
# Raspberry Pi (Raspberry Pi OS 64-bit = Debian bookworm arm64), an Android phone (inside
# proot-distro's Debian, deploy/android/README.md) and any Linux box. deploy/arm64-check.sh
# runs exactly this in an emulated arm64 Debian.
#
#   sh deploy/install-client.sh [SOURCE]      SOURCE: a fedkeys checkout (default: this one)
#
# FEDKEYS_VENV        where the venv goes (default ~/.local/share/fedkeys/venv)
# FEDKEYS_TORCH_INDEX the index torch's CPU build comes from (default PyTorch's CPU index;
#                     "pip": pip's configured index, e.g. a mirror that holds the CPU build)
#
# What it installs, and why in this order: torch's CPU build first (pip's default torch on PyPI is
# a CUDA build with gigabytes of nvidia-* wheels, on x86_64 and aarch64 alike); ExecuTorch
# without its dependencies (they are export-time tools: coremltools, pandas, scikit-learn,
# torchao, ...; the runtime needs none); then fedkeys with its `client` extra.
set -eu

SRC=${1:-$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)}
VENV=${FEDKEYS_VENV:-$HOME/.local/share/fedkeys/venv}
INDEX=${FEDKEYS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

[ -f "$SRC/pyproject.toml" ] || { echo "install-client: $SRC is not a fedkeys checkout" >&2; exit 2; }
pin() {  # the exact requirement pyproject.toml declares for a package, e.g. torch==2.13.0
    sed -n "s/.*\"\($1==[^\"]*\)\".*/\1/p" "$SRC/pyproject.toml" | head -n 1
}
TORCH=$(pin torch)
EXECUTORCH=$(pin executorch)
[ -n "$TORCH" ] && [ -n "$EXECUTORCH" ] || { echo "install-client: no torch/executorch pin in $SRC/pyproject.toml" >&2; exit 2; }
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install-client: $PY is older than 3.11 (Debian bookworm's python3 is 3.11)" >&2; exit 2; }
"$PY" -m venv --help >/dev/null 2>&1 || {
    echo "install-client: $PY has no venv module: apt install python3-venv" >&2; exit 2; }

start=$(date +%s)
echo "fedkeys client -> $VENV ($TORCH CPU build, $EXECUTORCH without its dependencies)"
"$PY" -m venv "$VENV"
if [ "$INDEX" = pip ]; then
    set -- "$TORCH"
else
    set -- "$TORCH" --index-url "$INDEX"
fi
"$VENV/bin/pip" install -q "$@" || {
    echo "install-client: could not install $TORCH's CPU build from $INDEX (FEDKEYS_TORCH_INDEX:" \
        "an index or mirror that holds it)" >&2; exit 1; }
"$VENV/bin/pip" install -q --no-deps "$EXECUTORCH"
"$VENV/bin/pip" install -q "$SRC[client]"
"$VENV/bin/fedkeys" client --help >/dev/null
echo "installed in $(( $(date +%s) - start )) s: $(du -sh "$VENV" | cut -f1) in $VENV," \
    "$("$VENV/bin/pip" list 2>/dev/null | tail -n +3 | wc -l) packages"
echo "next: $VENV/bin/fedkeys client import my-messages.jsonl; $VENV/bin/fedkeys client run --help"
