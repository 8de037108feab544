# shellcheck shell=bash
# Common helpers for the QEMU scripts (sourced, not run).
#
# Environment:
#   VUC_BACKEND    ours (default): the vhost-user-cow daemon over a COW file;
#                  qsd: qemu-storage-daemon over a qcow2 overlay (stand-in).
#   VUC_BIN        the vhost-user-cow binary (default: cargo build --release).
#   VUC_ACCEL      auto (default), kvm, tcg, or probe (auto, but run the KVM
#                  probe boot even where kvm_pvm is detected).
#   VUC_CACHE_DIR  downloads and built guests
#                  (default ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-cow).
#   VUC_QEMU       the QEMU binary (default qemu-system-x86_64).

VUC_QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VUC_SRC_DIR="$(cd "$VUC_QEMU_DIR/../.." && pwd)"
VUC_BACKEND="${VUC_BACKEND:-ours}"
VUC_ACCEL="${VUC_ACCEL:-auto}"
VUC_CACHE_DIR="${VUC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-cow}"
VUC_QEMU="${VUC_QEMU:-qemu-system-x86_64}"
# Set by backend_init: the file name extension of overlays (cow or qcow2).
export OVERLAY_EXT=""
PROG="${PROG:-$(basename "$0" .sh)}"

log() { printf '%s %s: %s\n' "$(date +%T)" "$PROG" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# Seconds since the epoch, with a fraction, for timings.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------
# Processes. Everything started in the background is registered here and
# killed (by pid) on exit.

VUC_PIDS=()
register_pid() { VUC_PIDS+=("$1"); }

kill_registered() {
    local pid
    for pid in "${VUC_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    VUC_PIDS=()
}

# wait_pid PID TIMEOUT_SECONDS: wait for a child to exit; prints nothing,
# returns its exit status, or 124 on timeout (the process is left running).
wait_pid() {
    local pid="$1" timeout="$2" deadline rc
    deadline=$(($(date +%s) + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if (($(date +%s) >= deadline)); then
            return 124
        fi
        sleep 0.2
    done
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# stop_pid PID NAME TIMEOUT: SIGTERM, then SIGKILL after TIMEOUT seconds.
# Returns the process's exit status (137/143 if killed by a signal).
stop_pid() {
    local pid="$1" name="$2" timeout="${3:-10}" rc=0
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid "$pid" "$timeout" || rc=$?
    if [ "$rc" -eq 124 ]; then
        log "$name (pid $pid) ignored SIGTERM for ${timeout}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 124
    fi
    return "$rc"
}

# wait_for_file PATH TIMEOUT PID: until PATH exists (a socket, say); fails
# early if PID dies.
wait_for_file() {
    local path="$1" timeout="$2" pid="${3:-}" deadline
    deadline=$(($(date +%s) + timeout))
    until [ -e "$path" ]; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        (($(date +%s) < deadline)) || return 124
        sleep 0.1
    done
}

# wait_for_line FILE EXTENDED_REGEX TIMEOUT PID: until a line of FILE
# matches; fails early (1) if PID dies first, 124 on timeout.
wait_for_line() {
    local file="$1" re="$2" timeout="$3" pid="${4:-}" deadline
    deadline=$(($(date +%s) + timeout))
    until grep -qE -- "$re" "$file" 2>/dev/null; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            grep -qE -- "$re" "$file" 2>/dev/null && return 0
            return 1
        fi
        (($(date +%s) < deadline)) || return 124
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------
# The guest (kernel, initramfs, golden image), built by setup.sh.

# Sets GUEST_DIR, GUEST_KERNEL, GUEST_INITRD, GUEST_GOLDEN; runs setup.sh,
# which does nothing when everything is present.
ensure_guest() {
    local out
    out="$(bash "$VUC_QEMU_DIR/setup.sh")" || die "setup.sh failed"
    GUEST_DIR="$(printf '%s\n' "$out" | sed -n 's/^GUEST_DIR=//p' | tail -1)"
    if [ -z "$GUEST_DIR" ] || [ ! -d "$GUEST_DIR" ]; then
        die "setup.sh did not report a guest directory"
    fi
    GUEST_KERNEL="$GUEST_DIR/vmlinux"
    GUEST_INITRD="$GUEST_DIR/initramfs.cpio.gz"
    GUEST_GOLDEN="$GUEST_DIR/golden.img"
    local f
    for f in "$GUEST_KERNEL" "$GUEST_INITRD" "$GUEST_GOLDEN"; do
        [ -s "$f" ] || die "missing $f (remove $GUEST_DIR and run setup.sh again)"
    done
}

# ---------------------------------------------------------------------------
# Acceleration. /dev/kvm on this kind of host may be kvm_pvm (a nested,
# paravirtualised KVM) that cannot run an ordinary guest kernel; QEMU then
# fails or hangs. Use KVM only when a short probe boot proves it works.

# Sets VUC_ACCEL_RESOLVED to kvm or tcg. Needs ensure_guest first.
resolve_accel() {
    [ -z "${VUC_ACCEL_RESOLVED:-}" ] || return 0
    case "$VUC_ACCEL" in
    tcg)
        VUC_ACCEL_RESOLVED=tcg
        return 0
        ;;
    kvm)
        VUC_ACCEL_RESOLVED=kvm
        return 0
        ;;
    auto | probe) ;;
    *) die "VUC_ACCEL must be auto, probe (auto, always probing KVM), kvm or tcg, not '$VUC_ACCEL'" ;;
    esac
    VUC_ACCEL_RESOLVED=tcg
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        log "accel: /dev/kvm is not usable; using TCG"
        return 0
    fi
    if [ "$VUC_ACCEL" = auto ] && [ -d /sys/module/kvm_pvm ] && [ ! -d /sys/module/kvm_intel ] && [ ! -d /sys/module/kvm_amd ]; then
        log "accel: /dev/kvm is kvm_pvm (nested PVM), which cannot run an ordinary kernel; using TCG"
        return 0
    fi
    # A cached verdict for this boot of the host and this guest kernel.
    local bootid verdict_file
    bootid="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)"
    verdict_file="$GUEST_DIR/kvm-probe.$bootid"
    if [ "$VUC_ACCEL" = auto ] && [ -f "$verdict_file" ]; then
        VUC_ACCEL_RESOLVED="$(cat "$verdict_file")"
        log "accel: $VUC_ACCEL_RESOLVED (probe result cached in $verdict_file)"
        return 0
    fi
    # kvm_pvm and other broken KVMs: QEMU prints "KVM internal error" and
    # then sits paused forever, so watch for that as well as for success.
    # (Under kvm_pvm this Debian kernel crawls - 33 s to reach memory
    # init - then fails on a "lock cmpxchg16b" with "emulation failure".)
    local probe_log rc=124 pid deadline
    probe_log="$(mktemp)"
    "$VUC_QEMU" -accel kvm -cpu host -M pc -m 256M -nodefaults -no-user-config \
        -display none -no-reboot \
        -chardev "file,id=con,path=$probe_log" -serial chardev:con \
        -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD" \
        -append "console=ttyS0 loglevel=4 panic=-1 vmtest=probe" \
        </dev/null >"$probe_log.err" 2>&1 &
    pid=$!
    deadline=$(($(date +%s) + 30))
    while (($(date +%s) < deadline)); do
        if grep -q '^VMTEST PROBE ok' "$probe_log"; then
            rc=0
            break
        fi
        if grep -q 'KVM internal error' "$probe_log.err" || ! kill -0 "$pid" 2>/dev/null; then
            rc=1
            break
        fi
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$rc" -eq 0 ]; then
        VUC_ACCEL_RESOLVED=kvm
        log "accel: KVM probe boot succeeded; using KVM"
    else
        local why="no result in 30 s"
        [ "$rc" -eq 124 ] || why="$(head -n 1 "$probe_log.err")"
        log "accel: KVM probe boot failed ($why); using TCG"
    fi
    rm -f "$probe_log" "$probe_log.err"
    echo "$VUC_ACCEL_RESOLVED" >"$verdict_file"
}

# ---------------------------------------------------------------------------
# QEMU against a vhost-user-blk socket.

# qemu_cmd CONSOLE SOCK MODE [options]: sets QEMU_CMD, the command line that
# boots the test guest with its root on a vhost-user-blk disk at SOCK.
# CONSOLE is a file for the serial console, or "stdio" (interactive; Ctrl-A
# X quits, Ctrl-A C is the monitor). MODE picks the guest's /vmtest script.
#   --queues N     vhost-user-blk num-queues (default 1)
#   --cpus N       vCPUs (default 1)
#   --mem SIZE     guest memory (default 512M)
#   --reconnect S  chardev reconnect after S seconds (default 0: off)
#   --append ARGS  more kernel command line
#   --qmp PATH     a QMP socket at PATH (scripts/qemu/qmp.py talks to it)
#   --incoming URI wait for a migration stream (-incoming URI)
# shellcheck disable=SC2054 # commas inside QEMU option values
qemu_cmd() {
    local console="$1" sock="$2" mode="$3"
    shift 3
    local queues=1 cpus=1 mem=512M reconnect=0 append="" qmp="" incoming=""
    while (($#)); do
        case "$1" in
        --queues) queues="$2" ;;
        --cpus) cpus="$2" ;;
        --mem) mem="$2" ;;
        --reconnect) reconnect="$2" ;;
        --append) append="$2" ;;
        --qmp) qmp="$2" ;;
        --incoming) incoming="$2" ;;
        *) die "qemu_cmd: unknown option $1" ;;
        esac
        shift 2
    done
    resolve_accel
    local accel=(-accel tcg -cpu max)
    [ "$VUC_ACCEL_RESOLVED" = kvm ] && accel=(-accel kvm -cpu host)
    local serial=(-chardev "file,id=con,path=$console" -serial chardev:con)
    [ "$console" = stdio ] && serial=(-chardev stdio,id=con,mux=on,signal=off -serial chardev:con -mon chardev=con)
    # The vhost-user chardev; reconnect-ms replaces QEMU 9.2's deprecated
    # "reconnect" (seconds).
    local chardev="socket,id=vub0,path=$sock"
    ((reconnect > 0)) && chardev+=",reconnect-ms=$((reconnect * 1000))"
    QEMU_CMD=(
        "$VUC_QEMU" "${accel[@]}" -M pc -smp "$cpus" -m "$mem"
        -object "memory-backend-memfd,id=mem,size=$mem,share=on"
        -numa node,memdev=mem
        -nodefaults -no-user-config -display none -no-reboot
        "${serial[@]}"
        -chardev "$chardev"
        -device "vhost-user-blk-pci,chardev=vub0,num-queues=$queues"
        -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD"
        -append "console=ttyS0 loglevel=4 panic=-1 mitigations=off vmtest=$mode $append"
    )
    [ -n "$qmp" ] && QEMU_CMD+=(-qmp "unix:$qmp,server=on,wait=off")
    [ -n "$incoming" ] && QEMU_CMD+=(-incoming "$incoming")
    QEMU_DESC="$VUC_ACCEL_RESOLVED, $cpus vCPU, $queues queue(s), mode $mode"
}

# start_qemu LOG SOCK MODE [qemu_cmd options]: boots the test guest in the
# background, its serial console going to LOG (QEMU's own messages to
# LOG.qemu); sets QEMU_PID.
start_qemu() {
    local log_file="$1"
    qemu_cmd "$@"
    : >"$log_file"
    "${QEMU_CMD[@]}" </dev/null >"$log_file.qemu" 2>&1 &
    QEMU_PID=$!
    register_pid "$QEMU_PID"
    log "QEMU pid $QEMU_PID ($QEMU_DESC), console $log_file"
}

# ---------------------------------------------------------------------------
# The vhost-user-blk backend: our daemon, or qemu-storage-daemon with a
# qcow2 overlay standing in for the COW file.

vuc_bin() {
    if [ -z "${VUC_BIN:-}" ]; then
        local target="${CARGO_TARGET_DIR:-$VUC_SRC_DIR/target}"
        case "$target" in /*) ;; *) target="$VUC_SRC_DIR/$target" ;; esac
        log "building vhost-user-cow (cargo build --release)"
        (cd "$VUC_SRC_DIR" && cargo build --release --quiet --bin vhost-user-cow) >&2 ||
            die "cargo build failed"
        VUC_BIN="$target/release/vhost-user-cow"
    fi
    [ -x "$VUC_BIN" ] || die "no vhost-user-cow binary at $VUC_BIN"
    echo "$VUC_BIN"
}

# Checks the backend is usable; for ours, builds the binary.
backend_init() {
    case "$VUC_BACKEND" in
    ours)
        VUC_BIN="$(vuc_bin)"
        if ! "$VUC_BIN" serve --help >/dev/null 2>&1; then
            die "$VUC_BIN has no 'serve' subcommand yet; run with VUC_BACKEND=qsd to use qemu-storage-daemon instead"
        fi
        OVERLAY_EXT=cow
        ;;
    qsd)
        command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found (package qemu-utils)"
        command -v qemu-img >/dev/null || die "qemu-img not found (package qemu-utils)"
        OVERLAY_EXT=qcow2
        ;;
    *) die "VUC_BACKEND must be ours or qsd, not '$VUC_BACKEND'" ;;
    esac
    log "backend: $VUC_BACKEND"
}

# backend_create OVERLAY BASE
backend_create() {
    case "$VUC_BACKEND" in
    ours) "$VUC_BIN" create "$1" --backing "$2" ;;
    qsd) qemu-img create -q -f qcow2 -b "$2" -F raw "$1" ;;
    esac
}

# backend_info OVERLAY
backend_info() {
    case "$VUC_BACKEND" in
    ours) "$VUC_BIN" info "$1" ;;
    qsd)
        qemu-img info -U "$1"
        echo "host bytes used: $(($(stat -c %b "$1") * 512))"
        ;;
    esac
}

# backend_used_bytes OVERLAY: host bytes the overlay occupies.
backend_used_bytes() { echo $(($(stat -c %b "$1") * 512)); }

# backend_check OVERLAY: exit 0 when clean.
backend_check() {
    case "$VUC_BACKEND" in
    ours) "$VUC_BIN" check "$1" ;;
    qsd) qemu-img check "$1" ;;
    esac
}

# backend_merge OVERLAY OUT_RAW
backend_merge() {
    case "$VUC_BACKEND" in
    ours) "$VUC_BIN" merge "$1" --into "$2" ;;
    qsd) qemu-img convert -f qcow2 -O raw "$1" "$2" ;;
    esac
}

# backend_start SOCK OVERLAY QUEUES LOG: starts the daemon in the background
# and waits for its socket; sets BACKEND_PID. A stale socket file is removed
# first (a SIGKILLed daemon leaves one behind).
backend_start() {
    local sock="$1" overlay="$2" queues="$3" log_file="$4" rc=0
    rm -f "$sock"
    case "$VUC_BACKEND" in
    ours)
        # VUC_SERVE_ARGS: more serve options (a test's, e.g. --sync).
        # shellcheck disable=SC2086 # split on purpose
        "$VUC_BIN" serve --socket-path "$sock" --disk "$overlay" --format cow --num-queues "$queues" \
            ${VUC_SERVE_ARGS:-} </dev/null >>"$log_file" 2>&1 &
        ;;
    qsd)
        # writethrough=on: the guest sees a write-through disk (it sends no
        # FLUSH), so qcow2 metadata must not sit in qsd's cache, or a
        # SIGKILLed qsd loses writes the guest saw complete.
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=f0,filename=$overlay" \
            --blockdev "driver=qcow2,node-name=d0,file=f0" \
            --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues,writethrough=on" \
            </dev/null >>"$log_file" 2>&1 &
        ;;
    esac
    BACKEND_PID=$!
    register_pid "$BACKEND_PID"
    wait_for_file "$sock" 20 "$BACKEND_PID" || rc=$?
    if [ "$rc" -ne 0 ]; then
        sed 's/^/    /' "$log_file" >&2
        die "backend ($VUC_BACKEND) did not create $sock (status $rc)"
    fi
    log "backend $VUC_BACKEND pid $BACKEND_PID serving $overlay on $sock ($queues queue(s))"
}

# backend_stop: SIGTERM; the daemon must exit 0 within 15 s.
backend_stop() {
    local rc=0
    stop_pid "$BACKEND_PID" "backend" 15 || rc=$?
    if [ "$rc" -ne 0 ]; then
        log "backend (pid $BACKEND_PID) exited with status $rc after SIGTERM (expected 0)"
        return 1
    fi
    log "backend stopped (exit 0)"
}
