#!/usr/bin/env bash
# Boots a VM on a copy-on-write disk served by vhost-user-cow:
#   1. makes a COW overlay over the golden guest image (setup.sh builds the
#      guest: a Debian kernel, a busybox initramfs, an ext4 root image);
#   2. serves it with `vhost-user-cow serve` on a unix socket;
#   3. boots QEMU with a vhost-user-blk-pci disk on that socket; the guest
#      writes a file and some data and prints df;
#   4. shows the COW file before and after (`vhost-user-cow info`), checks
#      it, and merges it into a raw image whose filesystem is checked and
#      read without mounting it.
# VUC_BACKEND=qsd runs the same demo with qemu-storage-daemon and a qcow2
# overlay. VUC_DEMO_MIB sets how much the guest writes (default 32).
set -euo pipefail
PROG=demo
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

MIB="${VUC_DEMO_MIB:-32}"
WORK="$(mktemp -d /tmp/vuc-demo.XXXXXX)"
TAIL_PID=""
cleanup() {
    [ -z "$TAIL_PID" ] || kill "$TAIL_PID" 2>/dev/null || true
    kill_registered
    if [ "${VUC_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*" >&2; }

ensure_guest
backend_init
overlay="$WORK/disk.$OVERLAY_EXT"
sock="$WORK/vub.sock"

step "create a COW overlay over the golden image $GUEST_GOLDEN"
backend_create "$overlay" "$GUEST_GOLDEN"
backend_info "$overlay"

step "serve it ($VUC_BACKEND) on $sock"
backend_start "$sock" "$overlay" 1 "$WORK/backend.log"

step "boot the VM (console below)"
start_qemu "$WORK/console.log" "$sock" demo --append "vmtest.mib=$MIB"
tail -n +1 -f "$WORK/console.log" &
TAIL_PID=$!
rc=0
wait_pid "$QEMU_PID" 300 || rc=$?
sleep 0.3
kill "$TAIL_PID" 2>/dev/null || true
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""
((rc == 0)) || die "QEMU: status $rc (124: no poweroff within 300 s); QEMU said: $(cat "$WORK/console.log.qemu")"
tr -d '\r' <"$WORK/console.log" | grep -x 'VMTEST PASS demo' >/dev/null || die "the guest did not finish its demo"

step "stop the daemon (SIGTERM)"
backend_stop || die "the daemon did not exit cleanly; its log: $(cat "$WORK/backend.log")"

step "the COW file after the guest's writes"
backend_info "$overlay"

step "check it"
backend_check "$overlay"

step "merge it into a raw image and look inside (no mount)"
backend_merge "$overlay" "$WORK/merged.img"
fsck.ext4 -fn "$WORK/merged.img"
printf 'file /data/demo.txt in the merged image: '
debugfs -R "cat /data/demo.txt" "$WORK/merged.img" 2>/dev/null
(cd "$GUEST_DIR" && sha256sum --quiet -c golden.sha256) && echo "golden image unchanged"
