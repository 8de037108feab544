#!/usr/bin/env bash
# Boots the test guest against a running vhost-user-blk daemon, with the
# serial console on this terminal (Ctrl-A X quits QEMU, Ctrl-A C switches
# to the monitor). The disk must hold the guest's root filesystem (a COW
# overlay over the golden image that setup.sh builds).
#
#   scripts/qemu/run-vm.sh --socket SOCK [--mode shell] [--queues N]
#       [--cpus N] [--mem SIZE] [--reconnect SECONDS] [--timeout SECONDS]
#       [--append 'KERNEL ARGS']
#
# --mode picks the guest's /vmtest/MODE.sh (shell: an interactive shell;
# demo, write, verify, ...: the VM tests' guest halves). --timeout kills
# QEMU after that long (default: none, this is interactive).
# Example, with our daemon:
#   G=$(scripts/qemu/setup.sh | sed -n 's/^GUEST_DIR=//p')
#   vhost-user-cow create /tmp/disk.cow --backing "$G/golden.img"
#   vhost-user-cow serve --socket-path /tmp/vub.sock --disk /tmp/disk.cow --format cow &
#   scripts/qemu/run-vm.sh --socket /tmp/vub.sock
set -euo pipefail
PROG=run-vm
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

sock="" mode=shell timeout=0 opts=()
while (($#)); do
    case "$1" in
    --socket) sock="$2" ;;
    --mode) mode="$2" ;;
    --timeout) timeout="$2" ;;
    --queues | --cpus | --mem | --reconnect | --append) opts+=("$1" "$2") ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[ -n "$sock" ] || die "--socket SOCK is required (see --help)"
[ -S "$sock" ] || die "$sock is not a socket: start the daemon first"

ensure_guest
qemu_cmd stdio "$sock" "$mode" "${opts[@]}"
log "booting ($QEMU_DESC); Ctrl-A X quits"
if ((timeout > 0)); then
    exec timeout --foreground -s KILL "$timeout" "${QEMU_CMD[@]}"
fi
exec "${QEMU_CMD[@]}"
