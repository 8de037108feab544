#!/usr/bin/env bash
# libvirt, for real: a libvirt daemon from Debian's packages boots the test
# guest from examples/libvirt/vhost-user-cow-guest.xml, its root disk a
# <disk type='vhostuser'> served by vhost-user-cow over a fresh COW overlay
# of the golden image. Passes when the guest reports "VMTEST PASS demo" on
# its serial console (a file) and powers off, libvirt sees the domain shut
# off, the daemon exits 0 on SIGTERM and the overlay checks clean and holds
# the guest's writes.
#
# These machines have no systemd as PID 1, so nothing is started through
# units: virtlogd and libvirtd run here in the foreground as an ordinary
# user (nobody), in session mode (qemu:///session), with a private
# configuration under the work directory ($XDG_CONFIG_HOME/libvirt: QEMU
# runs as that user, no security driver, logs through virtlogd) and
# private runtime directories. The daemon runs as root with its socket
# mode 0666 in a directory QEMU can reach. Every wait has a timeout; the
# daemons, QEMU and the domain are stopped on exit.
#
# Installs libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-daemon-log
# and libvirt-clients when missing (from bookworm-backports on Debian 12:
# libvirt 11.x, matching QEMU 10 better than bookworm's 9.0).
# Environment: VUC_BIN, VUC_CACHE_DIR, VUC_KEEP=1 (see lib.sh),
# VUC_VM_TIMEOUT_SCALE (multiplies the boot timeout).
set -euo pipefail
PROG=libvirt-test
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

SCALE="${VUC_VM_TIMEOUT_SCALE:-1}"
KEEP="${VUC_KEEP:-0}"
XML="$VUC_SRC_DIR/examples/libvirt/vhost-user-cow-guest.xml"
DOMAIN=vuc-libvirt-test
LIBVIRT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-log libvirt-clients)
USER_NAME=nobody

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# Each package from bookworm-backports where apt knows that suite.
ensure_libvirt() {
    local missing=() p
    for p in "${LIBVIRT_PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    "${sudo[@]}" apt-get update -qq >&2
    local want=() suite=""
    # Not `grep -q`: under pipefail, apt-cache killed by SIGPIPE when grep
    # stops reading early would make the test false.
    if apt-cache policy libvirt-daemon | grep bookworm-backports >/dev/null; then
        suite=/bookworm-backports
        # Their libvirt libraries come from the same suite.
        missing+=(libvirt0 libvirt-common libvirt-daemon-common)
    fi
    for p in "${missing[@]}"; do want+=("$p$suite"); done
    local sim
    sim="$(DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -s install --no-install-recommends "${want[@]}")" ||
        die "apt-get -s install ${want[*]} failed: $sim"
    if printf '%s\n' "$sim" | grep '^Remv' >/dev/null; then
        printf '%s\n' "$sim" | grep '^Remv' >&2
        die "installing libvirt would remove the packages above; refusing"
    fi
    log "installing ${want[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${want[@]}" >&2
}

WORK="$(mktemp -d /tmp/vuc-libvirt.XXXXXX)"
HOME_DIR="$WORK/home"
OUT="$WORK/out"
FAILED=1
LIBVIRTD_PID="" VIRTLOGD_PID=""

# The prefix that runs a command as the libvirt user, with its session
# directories in $HOME_DIR (setpriv and env exec it: a background job's
# $! is the command's own pid).
AS_USER=(setpriv --reuid="$USER_NAME" --regid="$(id -g "$USER_NAME")" --clear-groups
    env HOME="$HOME_DIR" XDG_RUNTIME_DIR="$HOME_DIR/run" XDG_CONFIG_HOME="$HOME_DIR/config"
    XDG_CACHE_HOME="$HOME_DIR/cache" XDG_DATA_HOME="$HOME_DIR/data")
as_user() { "${AS_USER[@]}" "$@"; }

virsh_() { as_user timeout 60 virsh -q -c qemu:///session "$@"; }

show_logs() {
    local f
    for f in "$OUT/console.log" "$OUT/daemon.log" "$OUT/libvirtd.log" "$HOME_DIR/cache/libvirt/qemu/log/$DOMAIN.log"; do
        if [ -s "$f" ]; then
            log "---- $f, last 40 lines:"
            tail -n 40 "$f" | sed 's/^/    | /' >&2
        fi
    done
}

cleanup() {
    if [ -n "$LIBVIRTD_PID" ] && kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
        virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
        virsh_ undefine "$DOMAIN" >/dev/null 2>&1 || true
    fi
    local pid
    for pid in "$LIBVIRTD_PID" "$VIRTLOGD_PID"; do
        if [ -n "$pid" ]; then
            stop_pid "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null || echo "pid $pid")" 10 || true
        fi
    done
    kill_registered
    if ((FAILED)); then
        show_logs
    fi
    if [ "$KEEP" = 1 ] || ((FAILED)); then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The private libvirt setup: directories, configuration, the two daemons.
start_libvirt() {
    mkdir -p "$HOME_DIR/run" "$HOME_DIR/config/libvirt" "$HOME_DIR/cache" "$HOME_DIR/data"
    chmod 700 "$HOME_DIR/run"
    cat >"$HOME_DIR/config/libvirt/libvirtd.conf" <<EOF
log_outputs = "3:file:$OUT/libvirtd.log"
EOF
    # In session mode QEMU runs as the daemon's user; no security driver
    # relabels files; QEMU's stdout/stderr go through virtlogd.
    cat >"$HOME_DIR/config/libvirt/qemu.conf" <<EOF
security_driver = "none"
stdio_handler = "logd"
EOF
    cp "$HOME_DIR/config/libvirt/libvirtd.conf" "$HOME_DIR/config/libvirt/virtlogd.conf"
    chown -R "$USER_NAME:" "$HOME_DIR" "$OUT"

    "${AS_USER[@]}" virtlogd </dev/null >>"$OUT/virtlogd.out" 2>&1 &
    VIRTLOGD_PID=$!
    wait_for_file "$HOME_DIR/run/libvirt/virtlogd-sock" 30 "$VIRTLOGD_PID" ||
        die "virtlogd did not create its socket"
    "${AS_USER[@]}" libvirtd </dev/null >>"$OUT/libvirtd.out" 2>&1 &
    LIBVIRTD_PID=$!
    wait_for_file "$HOME_DIR/run/libvirt/libvirt-sock" 60 "$LIBVIRTD_PID" ||
        die "libvirtd did not create its socket"
    log "virtlogd pid $VIRTLOGD_PID, libvirtd pid $LIBVIRTD_PID (session mode as $USER_NAME): $(virsh_ version | tr '\n' ' ')"
}

main() {
    command -v setpriv >/dev/null || die "setpriv not found (package util-linux)"
    ensure_guest
    VUC_BACKEND=ours backend_init
    ensure_libvirt
    chmod 711 "$WORK"
    mkdir -p "$HOME_DIR" "$OUT" "$WORK/guest"
    # The guest's kernel and initramfs where QEMU (as $USER_NAME) can read them.
    cp "$GUEST_KERNEL" "$GUEST_INITRD" "$WORK/guest/"
    chmod 755 "$WORK/guest"
    chmod 644 "$WORK/guest/"*

    local overlay="$WORK/disk.cow" sock="$WORK/vub.sock"
    "$VUC_BIN" create "$overlay" --backing "$GUEST_GOLDEN"
    "$VUC_BIN" serve --socket-path "$sock" --disk "$overlay" --format cow --num-queues 1 \
        --socket-mode 666 </dev/null >>"$OUT/daemon.log" 2>&1 &
    local daemon_pid=$!
    register_pid "$daemon_pid"
    wait_for_file "$sock" 20 "$daemon_pid" || die "vhost-user-cow did not create $sock"

    start_libvirt
    sed -e "s|@NAME@|$DOMAIN|g" -e "s|@KERNEL@|$WORK/guest/vmlinux|g" \
        -e "s|@INITRD@|$WORK/guest/initramfs.cpio.gz|g" -e "s|@SOCKET@|$sock|g" \
        -e "s|@CONSOLE@|$OUT/console.log|g" "$XML" >"$OUT/domain.xml"
    if grep -q '@[A-Z]*@' "$OUT/domain.xml"; then
        die "placeholders left in $OUT/domain.xml: $(grep -o '@[A-Z]*@' "$OUT/domain.xml" | sort -u | tr '\n' ' ')"
    fi
    chown "$USER_NAME:" "$OUT/domain.xml"
    # What libvirt makes of the XML: a vhost-user-blk device on the
    # socket, guest RAM in a shared memfd.
    local argv
    argv="$(virsh_ domxml-to-native qemu-argv "$OUT/domain.xml")" || die "domxml-to-native failed"
    printf '%s\n' "$argv" >"$OUT/qemu-argv"
    for want in 'vhost-user-blk-pci' "path=$sock" '"qom-type":"memory-backend-memfd"' '"share":true'; do
        grep -qF -- "$want" "$OUT/qemu-argv" || die "the QEMU command line has no $want: $argv"
    done

    local t0
    t0="$(now)"
    virsh_ define "$OUT/domain.xml" >/dev/null || die "virsh define failed"
    virsh_ start "$DOMAIN" >/dev/null || die "virsh start failed"
    log "domain $DOMAIN started (TCG), console $OUT/console.log"
    local rc=0 timeout=$((120 * SCALE))
    wait_for_line "$OUT/console.log" '^VMTEST DONE' "$timeout" "$LIBVIRTD_PID" || rc=$?
    ((rc == 0)) || die "no 'VMTEST DONE' on the guest console within ${timeout}s (status $rc)"
    tr -d '\r' <"$OUT/console.log" | grep -x 'VMTEST PASS demo' >/dev/null || die "the guest did not report 'VMTEST PASS demo'"
    if tr -d '\r' <"$OUT/console.log" | grep '^VMTEST FAIL' >/dev/null; then
        die "the guest reported: $(tr -d '\r' <"$OUT/console.log" | grep '^VMTEST FAIL' | head -3)"
    fi
    log "guest: PASS demo after $(elapsed "$t0")s"
    # The guest powered off: libvirt destroys the domain (on_poweroff).
    local state="" deadline=$(($(date +%s) + 30))
    while (($(date +%s) < deadline)); do
        state="$(virsh_ domstate "$DOMAIN" 2>/dev/null || true)"
        [ "$state" = "shut off" ] && break
        sleep 0.5
    done
    [ "$state" = "shut off" ] || die "domain state '$state' 30 s after the guest powered off"
    virsh_ undefine "$DOMAIN" >/dev/null || die "virsh undefine failed"
    log "domain shut off and undefined"

    stop_pid "$daemon_pid" vhost-user-cow 15 || die "vhost-user-cow did not exit 0 on SIGTERM"
    "$VUC_BIN" check "$overlay" >&2 || die "check $overlay failed"
    local allocated
    allocated="$("$VUC_BIN" info --json "$overlay" | sed -n 's/.*"allocated_bytes": *\([0-9]*\).*/\1/p')"
    ((allocated > 8 << 20)) || die "the overlay holds only ${allocated:-?} bytes (the guest wrote 8 MiB)"
    log "PASS: libvirt booted the guest on vhost-user-cow ($allocated bytes written to the overlay)"
    FAILED=0
}

main "$@"
