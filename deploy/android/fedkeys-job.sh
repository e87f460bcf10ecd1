#!/data/data/com.termux/files/usr/bin/sh
# Run by Android's JobScheduler (through Termux:API; schedule.sh sets it up) only while the phone
# is charging, idle and on an unmetered network: takes part in rounds for at most
# FEDKEYS_MAX_MINUTES inside the proot-distro Debian where the client is installed, then exits
# (the scheduler checks its conditions again at the next start; the client reads charging itself
# at every check-in and stops taking part when the phone is unplugged).
set -eu
CONF=${FEDKEYS_ANDROID_CONF:-$HOME/.config/fedkeys/android.env}
[ -f "$CONF" ] && . "$CONF"
: "${FEDKEYS_URL:?set FEDKEYS_URL in $CONF}"
DISTRO=${FEDKEYS_DISTRO:-debian}
VENV=${FEDKEYS_VENV:-/root/.local/share/fedkeys/venv}
MINUTES=${FEDKEYS_MAX_MINUTES:-30}
mkdir -p "$HOME/.cache"
termux-wake-lock  # keep the CPU running while the job trains; released on exit
trap 'termux-wake-unlock' EXIT
# proot-distro starts the guest with a clean environment: the constraints that Android checked
# are passed on explicitly (edge_client/termux.py), the CA file lives in the guest
proot-distro login "$DISTRO" -- /usr/bin/env FEDKEYS_JOB_CONSTRAINTS=charging,idle,unmetered \
    "$VENV/bin/fedkeys" client run --coordinator "$FEDKEYS_URL" --ca /root/.config/fedkeys/ca.pem \
    --provider termux --device-class phone --max-minutes "$MINUTES" \
    >>"$HOME/.cache/fedkeys-job.log" 2>&1
