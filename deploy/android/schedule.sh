#!/data/data/com.termux/files/usr/bin/sh
# Ask Android to start fedkeys-job.sh at most once an hour, and only while the phone is charging,
# idle (screen off, not in use) and on an unmetered network; the job survives reboots.
#   sh schedule.sh            schedule (again: replaces job 4201)
#   sh schedule.sh --cancel   stop scheduling it
# The `termux-job-scheduler` command has no option for the idle constraint, which the Termux:API
# app accepts (its JobSchedulerAPI reads an "idle" extra): the call below is the one that command
# makes, with that extra added.
set -eu
JOB_ID=4201
API=${TERMUX_API_BIN:-/data/data/com.termux/files/usr/libexec/termux-api}
SCRIPT=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)/fedkeys-job.sh
if [ "${1:-}" = --cancel ]; then
    exec "$API" JobScheduler --ez cancel true --ei job_id "$JOB_ID"
fi
chmod 0700 "$SCRIPT"
mkdir -p "$HOME/.cache"
exec "$API" JobScheduler --es script "$SCRIPT" --ei job_id "$JOB_ID" --ei period_ms 3600000 \
    --es network unmetered --ez charging true --ez idle true --ez battery_not_low true \
    --ez persisted true
