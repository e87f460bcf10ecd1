#!/bin/sh
# The client on arm64, checked on an x86_64 Debian host: a Debian bookworm arm64 userland (what
# Raspberry Pi OS 64-bit is, and what proot-distro's Debian gives an Android phone) built with
# debootstrap and run through qemu-user-static; the client installed in it exactly as the README
# says (deploy/install-client.sh); the client's own test suite run there; its suggestions compared
# with the host's for the same bundle;
# then one real round of three emulated arm64 devices against a coordinator on the host over TLS
# (bench/client_bench.py with the arm64 interpreter as the devices').
#
#   sudo sh deploy/arm64-check.sh [WORKDIR]        (default /var/tmp/fedkeys-arm64; not in `make test`)
#
# Needs: root, the host's `make setup` (.venv) and network access to Debian's mirror and to the
# index of torch's CPU build (FEDKEYS_TORCH_INDEX, as for install-client.sh). Steps are skipped
# when already done (the userland, the install), so a second run takes minutes.
#
# The emulated CPU: without a sysfs that describes the CPU, cpuinfo cannot read
# /sys/devices/system/cpu/possible and XNNPACK reports itself unavailable (predict.pte then fails
# to load), and the host's x86 sysfs makes `import torch` crash; the userland gets a small sysfs
# describing two cores of the emulated model. QEMU_CPU picks it: cortex-a76 (Raspberry Pi 5,
# the default) or cortex-a72 (Raspberry Pi 4). Not qemu's default "max": with every extension it
# emulates, the int8 program's suggestions come out wrong (after "how are ": a / i / the instead
# of you / your / they: the int8 kernels chosen when the CPU reports SME; fp32, eager and
# train.pte stay equal) while cortex-a76 computes them as
# the host does (bench/RESULTS.md, "The client on arm64").
set -eu

SRC=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
WORK=${1:-/var/tmp/fedkeys-arm64}
ROOTFS=$WORK/bookworm-arm64
MIRROR=${FEDKEYS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/fedkeys-venv
REPORT=$WORK/report.txt

say() { echo "arm64-check: $*" | tee -a "$REPORT"; }
die() { echo "arm64-check: $*" >&2; exit 2; }
export QEMU_CPU=${QEMU_CPU:-cortex-a76}
case $QEMU_CPU in  # the MIDR_EL1 cpuinfo reads from sysfs
    cortex-a72) MIDR=0x00000000410fd083 ;;
    cortex-a76) MIDR=0x00000000414fd0b1 ;;
    *) die "QEMU_CPU=$QEMU_CPU: use cortex-a76 (Raspberry Pi 5) or cortex-a72 (Raspberry Pi 4)" ;;
esac
timed() {  # timed LABEL CMD...: run, and record how long it took
    label=$1; shift; t0=$(date +%s)
    "$@"
    say "$label: $(( $(date +%s) - t0 )) s"
}

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, binfmt_misc)"
[ "$(uname -m)" = x86_64 ] || die "this check emulates arm64 on an x86_64 host"
[ -x "$SRC/.venv/bin/python" ] || die "run \`make setup\` first (the host runs the coordinator)"
mkdir -p "$WORK"
: >"$REPORT"
say "$(date -u +%FT%TZ) host $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg), emulated CPU $QEMU_CPU"

# 1. debootstrap and qemu-user-static from Debian's packages; the binfmt handler registered
if ! command -v debootstrap >/dev/null || ! [ -x /usr/bin/qemu-aarch64-static ]; then
    timed "apt install debootstrap qemu-user-static" sh -c \
        'apt-get update -q && apt-get install -y -q debootstrap qemu-user-static binfmt-support'
fi
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if ! [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || printf '%s' \
        ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
        >/proc/sys/fs/binfmt_misc/register
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "could not register qemu-aarch64 with binfmt_misc"

# 2. the userland: Debian bookworm arm64 with python3-venv (Raspberry Pi OS 64-bit's base)
if ! [ -x "$ROOTFS/usr/bin/python3" ]; then
    timed "debootstrap bookworm arm64" debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
fi
say "userland: $(chroot "$ROOTFS" /usr/bin/python3 --version) on $(chroot "$ROOTFS" /usr/bin/uname -m)"

# 3. mounts, DNS, the host's CA bundle (a TLS-inspecting proxy's CA, if the host trusts one), the
# CPU's sysfs; the host's /tmp and this checkout (read-only) at the same paths inside, so that the
# benchmarks' files mean the same to the emulated devices
cleanup() {
    for m in "$ROOTFS$SRC" "$ROOTFS/tmp" "$ROOTFS/dev" "$ROOTFS/proc"; do
        if mountpoint -q "$m"; then umount -l "$m"; fi
    done
}
trap cleanup EXIT INT TERM
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"
mountpoint -q "$ROOTFS/tmp" || mount --bind /tmp "$ROOTFS/tmp"
mkdir -p "$ROOTFS$SRC"
mountpoint -q "$ROOTFS$SRC" || { mount --bind "$SRC" "$ROOTFS$SRC" && mount -o remount,bind,ro "$ROOTFS$SRC"; }
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
cpu=$ROOTFS/sys/devices/system/cpu
mkdir -p "$cpu"
for f in possible present online; do echo 0-1 >"$cpu/$f"; done
for c in 0 1; do
    mkdir -p "$cpu/cpu$c/regs/identification"
    echo "$MIDR" >"$cpu/cpu$c/regs/identification/midr_el1"
done

# 4. the client, installed as the README says (the source copied in as a clone would be)
rm -rf "$ROOTFS/opt/fedkeys-src" && mkdir -p "$ROOTFS/opt/fedkeys-src"
git -C "$SRC" ls-files -z | (cd "$SRC" && xargs -0 tar -cf -) | tar -xf - -C "$ROOTFS/opt/fedkeys-src"
in_guest() { chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" "$@"; }
if ! [ -x "$ROOTFS$VENV/bin/fedkeys" ]; then
    timed "install-client.sh (emulated)" in_guest FEDKEYS_VENV="$VENV" \
        FEDKEYS_TORCH_INDEX="${FEDKEYS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
        sh /opt/fedkeys-src/deploy/install-client.sh /opt/fedkeys-src
fi
say "installed: $(du -sh "$ROOTFS$VENV" | cut -f1), $(in_guest $VENV/bin/pip list 2>/dev/null | tail -n +3 | wc -l) packages," \
    "torch $(in_guest $VENV/bin/python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

bundle=$(cd "$SRC" && .venv/bin/python -m tests.servers)
demo=$SRC/artifacts/demo/bundle
[ -f "$demo/manifest.json" ] || (cd "$SRC" && .venv/bin/fedkeys export build --profile demo --student models/demo \
    --out artifacts/demo/bundle --work artifacts/work --no-eval)
share=$(mktemp -d /tmp/fedkeys-arm64-XXXXXX)
cp -r "$bundle" "$share/tiny" && cp -r "$demo" "$share/demo"

# 5. the client's own suite on arm64, as `make unit` runs it on a device's install (pytest
# --client-only: what the install lacks is unimportable); the tests' own dependencies go to a
# folder of their own, not into the client's venv
TESTDEPS=/opt/fedkeys-testdeps
if ! [ -d "$ROOTFS$TESTDEPS/_pytest" ]; then
    timed "the tests' dependencies (emulated)" in_guest $VENV/bin/pip install -q --target "$TESTDEPS" \
        pytest pytest-timeout hypothesis scipy
fi
suite=0
timed "the client's suite (emulated)" in_guest PYTHONPATH="$TESTDEPS" HYPOTHESIS_PROFILE=ci \
    FEDKEYS_TEST_TINY_BUNDLE="$share/tiny" /bin/sh -c \
    "cd /opt/fedkeys-src && $VENV/bin/python -m pytest -q -p no:cacheprovider --client-only" \
    >"$share/suite.txt" 2>&1 || suite=1
tail -n 15 "$share/suite.txt" | tee -a "$REPORT"

# 6. suggestions, fp32 logits and train.pte gradients against the host for the same bundle and
# token ids (bench/arm64_parity.py)
parity=0
for b in tiny demo; do
    (cd "$SRC" && .venv/bin/python bench/arm64_parity.py prepare "$share/$b" \
        && .venv/bin/python bench/arm64_parity.py record "$share/$b" "$share/$b.host.json")
    timed "parity record, $b bundle (emulated)" in_guest $VENV/bin/python "$SRC/bench/arm64_parity.py" \
        record "$share/$b" "$share/$b.arm64.json"
    say "parity, $b bundle:"
    (cd "$SRC" && .venv/bin/python bench/arm64_parity.py compare "$share/$b.host.json" "$share/$b.arm64.json") \
        >>"$REPORT" || parity=1
done

# 7. one real round: three emulated arm64 devices, the coordinator on the host (TLS, SQLite)
wrapper=$share/arm64-python
cat >"$wrapper" <<EOF
#!/bin/sh
exec chroot "$ROOTFS" /usr/bin/env HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" \
    FEDKEYS_ALLOW_CUDA_TORCH="\${FEDKEYS_ALLOW_CUDA_TORCH:-}" /bin/sh -c 'cd / && exec "\$0" "\$@"' "$VENV/bin/python" "\$@"
EOF
chmod +x "$wrapper"
(cd "$SRC" && timed "one round, 3 emulated arm64 devices" .venv/bin/python bench/client_bench.py \
    --client-python "$wrapper" --devices 3 --rounds 1 --suggestions 20 --no-record) | tee -a "$REPORT"
rm -rf "$share"
[ "$suite" = 0 ] || { say "FAILED: the client's suite on arm64 (see above)"; exit 1; }
[ "$parity" = 0 ] || { say "FAILED: arm64 computes other suggestions than the host (see above)"; exit 1; }
say "done: $REPORT"
