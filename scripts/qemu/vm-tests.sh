#!/usr/bin/env bash
# VM tests: boot the test guest with its root filesystem on a vhost-user-blk
# disk served by the backend (VUC_BACKEND=ours: vhost-user-cow over a COW
# file; qsd: qemu-storage-daemon over a qcow2 overlay) and check, in the
# guest and on the host, that the data is right.
#
#   boot            root on /dev/vda from a fresh overlay over the golden
#                   image; the guest writes files and a checksummed workload
#                   (VUC_VM_MIB MiB, default 200) and reads them back. Host:
#                   golden image unchanged, overlay grew, check clean, the
#                   merged image passes fsck and holds the guest's files.
#   persist         the same overlay booted again: the files are still there.
#   mq              two vCPUs, two virtqueues, a writer on each CPU.
#   qemu-restart    QEMU killed (SIGKILL) mid-workload, a new QEMU started
#                   against the same daemon: it boots (journal replay), and
#                   the filesystem checks clean afterwards.
#   daemon-restart  the daemon killed (SIGKILL) while the guest is idle and
#                   started again; QEMU (chardev reconnect) carries on and
#                   the guest's data reads back correctly.
#   daemon-restart-busy  the same in the middle of the guest's I/O: strict,
#                   no guest I/O error, no lost write, I/O resumed in time.
#   daemon-kill-loop  the daemon SIGKILLed at random moments of the guest's
#                   writes and flushes, VUC_VM_KILLS times (default 3),
#                   each time restarted by a supervisor loop (as systemd
#                   would); the requests in flight are resubmitted.
#   daemon-upgrade  the daemon stopped with SIGTERM and replaced by the
#                   release build of the previous commit (VUC_PREV_REV,
#                   default HEAD~1, built once into a cache under target/)
#                   and back, while the guest writes.
#   daemon-restart-busy  the same in the middle of the guest's I/O; reports
#                   what the guest sees (see the function for what fails).
#   migrate         live migration to a second QEMU on the same daemon (its
#                   second connection) while the guest writes and verifies;
#                   the guest finishes on the destination, data intact.
#   migrate-file    the guest saved to a file (what `virsh save` does) and
#                   restored from it by a new QEMU.
#
# The guest reports "VMTEST PASS name" / "VMTEST FAIL name: why" on its
# serial console; a missing PASS, any FAIL, or a missing clean shutdown
# fails the test and shows the console. Every wait has a timeout.
#
# Environment (see also lib.sh): VUC_VM_TESTS (names to run, default all),
# VUC_VM_MIB, VUC_KEEP=1 (keep the work directory), VUC_VM_TIMEOUT_SCALE
# (multiplies every guest timeout; default 1, KVM needs less).
set -euo pipefail
PROG=vm-tests
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

ALL_TESTS=(boot persist mq qemu-restart daemon-restart daemon-restart-busy daemon-kill-loop daemon-upgrade migrate migrate-file)
read -r -a TESTS <<<"${VUC_VM_TESTS:-${ALL_TESTS[*]}}"
MIB="${VUC_VM_MIB:-200}"
SCALE="${VUC_VM_TIMEOUT_SCALE:-1}"
KEEP="${VUC_KEEP:-0}"

WORK="$(mktemp -d /tmp/vuc-vm.XXXXXX)"
FAILED_ANY=0
TEST_PID=""
cleanup() {
    # A test still running (we were interrupted): stop it, it kills its
    # QEMU and daemon on the way out.
    if [ -n "$TEST_PID" ] && kill -0 "$TEST_PID" 2>/dev/null; then
        kill -TERM "$TEST_PID" 2>/dev/null || true
        wait "$TEST_PID" 2>/dev/null || true
        FAILED_ANY=1
    fi
    kill_registered
    if [ "$KEEP" = 1 ] || ((FAILED_ANY)); then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Test failure: print why and leave the test's subshell.
tfail() {
    log "FAIL: $*"
    exit 1
}

timeout_s() { echo $(($1 * SCALE)); }

show_console() {
    local console="$1"
    log "---- guest console ($console), last 60 lines:"
    tail -n 60 "$console" | sed 's/^/    | /' >&2
    if [ -s "$console.qemu" ]; then
        log "---- QEMU stderr:"
        tail -n 20 "$console.qemu" | sed 's/^/    | /' >&2
    fi
}

show_backend_log() {
    if [ -s "$1" ]; then
        log "---- backend log ($1), last 30 lines:"
        tail -n 30 "$1" | sed 's/^/    | /' >&2
    fi
}

# The guest's report lines (the serial console ends lines with CR LF).
vmtest_lines() { tr -d '\r' <"$1" | grep '^VMTEST ' || true; }

# expect_guest CONSOLE PASS_NAME...: the guest reported every PASS_NAME,
# no FAIL, and shut down cleanly (VMTEST DONE).
expect_guest() {
    local console="$1" name bad=0 lines
    shift
    lines="$(vmtest_lines "$console")"
    printf '%s\n' "$lines" | grep '^VMTEST \(INFO\|READY\)' | sed 's/^VMTEST /    guest: /' >&2 || true
    if printf '%s\n' "$lines" | grep '^VMTEST FAIL' >/dev/null; then
        printf '%s\n' "$lines" | grep '^VMTEST FAIL' | sed 's/^/    /' >&2
        bad=1
    fi
    for name in "$@"; do
        if printf '%s\n' "$lines" | grep -x "VMTEST PASS $name" >/dev/null; then
            log "guest: PASS $name"
        else
            log "guest: no 'VMTEST PASS $name'"
            bad=1
        fi
    done
    if ! printf '%s\n' "$lines" | grep '^VMTEST DONE' >/dev/null; then
        log "guest: no clean shutdown (no 'VMTEST DONE')"
        bad=1
    fi
    if ((bad)); then
        show_console "$console"
        tfail "guest checks failed"
    fi
}

# run_guest CONSOLE SOCK MODE TIMEOUT [start_qemu options]: boot, wait for
# the guest to power off.
run_guest() {
    local console="$1" sock="$2" mode="$3" timeout="$4" rc=0 t0
    shift 4
    t0="$(now)"
    start_qemu "$console" "$sock" "$mode" "$@"
    wait_pid "$QEMU_PID" "$(timeout_s "$timeout")" || rc=$?
    if [ "$rc" -eq 124 ]; then
        show_console "$console"
        tfail "guest ($mode) did not power off within $(timeout_s "$timeout")s"
    fi
    if [ "$rc" -ne 0 ]; then
        show_console "$console"
        tfail "QEMU exited with status $rc"
    fi
    log "guest ($mode) powered off after $(elapsed "$t0")s"
}

golden_unchanged() {
    (cd "$GUEST_DIR" && sha256sum --quiet -c golden.sha256) ||
        tfail "the golden (backing) image $GUEST_GOLDEN changed"
    log "golden image unchanged (sha256)"
}

# merged_image OVERLAY OUT: check the overlay, merge it into a raw image,
# fsck that image.
check_and_merge() {
    local overlay="$1" out="$2" rc=0
    backend_check "$overlay" >&2 || rc=$?
    ((rc == 0)) || tfail "check of $overlay: exit status $rc"
    log "check $overlay: clean"
    backend_merge "$overlay" "$out" >&2 || tfail "merge of $overlay failed"
    rc=0
    fsck.ext4 -fn "$out" >"$out.fsck" 2>&1 || rc=$?
    if ((rc != 0)); then
        sed 's/^/    | /' "$out.fsck" >&2
        tfail "fsck.ext4 -fn of the merged image: exit status $rc"
    fi
    log "merged image passes fsck.ext4 -fn ($(grep -o '[0-9]*/[0-9]* files' "$out.fsck" || true))"
}

# img_cat IMG PATH: a file's content, read out of an ext4 image with debugfs.
img_cat() { debugfs -R "cat $2" "$1" 2>/dev/null; }
# img_dump IMG PATH OUT
img_dump() {
    rm -f "$3"
    debugfs -R "dump $2 $3" "$1" >/dev/null 2>&1
    [ -f "$3" ] || tfail "$2 is not in the merged image"
}

test_boot() {
    local d="$WORK/boot" tag before after
    mkdir -p "$d"
    tag="$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "$tag" >"$d/tag"
    local overlay="$d/disk.$OVERLAY_EXT"
    golden_unchanged
    backend_create "$overlay" "$GUEST_GOLDEN"
    before="$(backend_used_bytes "$overlay")"
    log "overlay $overlay created ($before bytes used)"
    backend_start "$d/sock" "$overlay" 1 "$d/backend.log"
    run_guest "$d/console.log" "$d/sock" write 300 --append "vmtest.tag=$tag vmtest.mib=$MIB"
    backend_stop || {
        show_backend_log "$d/backend.log"
        tfail "backend did not stop cleanly"
    }
    expect_guest "$d/console.log" root-rw small-files workload
    after="$(backend_used_bytes "$overlay")"
    log "overlay grew from $before to $after bytes"
    ((after - before >= MIB * 1048576)) ||
        tfail "the overlay grew by $((after - before)) bytes, less than the $MIB MiB the guest wrote"
    golden_unchanged
    check_and_merge "$overlay" "$d/merged.img"

    # The guest's files, read out of the merged image without mounting it.
    local got
    got="$(img_cat "$d/merged.img" /data/hello.txt)"
    [ "$got" = "hello from vmtest $tag" ] || tfail "/data/hello.txt in the merged image is '$got'"
    img_cat "$d/merged.img" /data/big.sha256 >"$d/big.sha256"
    grep -q ' big.bin$' "$d/big.sha256" || tfail "no /data/big.sha256 in the merged image"
    img_dump "$d/merged.img" /data/big.bin "$d/big.bin"
    (cd "$d" && sha256sum --quiet -c big.sha256) || tfail "/data/big.bin in the merged image differs from the guest's checksum"
    [ "$(stat -c %s "$d/big.bin")" -eq $((MIB * 1048576)) ] || tfail "/data/big.bin has the wrong size"
    mkdir -p "$d/small"
    img_cat "$d/merged.img" /data/small.sha256 >"$d/small.sha256"
    [ "$(wc -l <"$d/small.sha256")" -eq 64 ] || tfail "/data/small.sha256 in the merged image is incomplete"
    local f
    while read -r _ f; do
        img_dump "$d/merged.img" "/data/small/$f" "$d/small/$f"
    done <"$d/small.sha256"
    (cd "$d/small" && sha256sum --quiet -c ../small.sha256) || tfail "small files in the merged image differ"
    log "merged image holds the guest's files (hello.txt, 64 small files, $MIB MiB big.bin)"
    rm -f "$d/merged.img" "$d/big.bin"
}

test_persist() {
    local d="$WORK/boot" overlay
    overlay="$d/disk.$OVERLAY_EXT"
    if [ ! -f "$overlay" ] || [ ! -f "$d/tag" ]; then
        tfail "needs the overlay of the boot test (run 'boot' first)"
    fi
    backend_start "$d/sock" "$overlay" 1 "$d/backend2.log"
    run_guest "$d/console2.log" "$d/sock" verify 300 --append "vmtest.tag=$(cat "$d/tag")"
    backend_stop || {
        show_backend_log "$d/backend2.log"
        tfail "backend did not stop cleanly"
    }
    expect_guest "$d/console2.log" persist-small persist-files persist-workload
    backend_check "$overlay" >&2 || tfail "check of $overlay after the second boot failed"
    golden_unchanged
}

test_mq() {
    local d="$WORK/mq"
    mkdir -p "$d"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$overlay" 2 "$d/backend.log"
    run_guest "$d/console.log" "$d/sock" mq 300 --cpus 2 --queues 2 --append "vmtest.queues=2"
    backend_stop || {
        show_backend_log "$d/backend.log"
        tfail "backend did not stop cleanly"
    }
    expect_guest "$d/console.log" mq-cpus mq-queues mq-io mq-both-queues
    check_and_merge "$overlay" "$d/merged.img"
    mkdir -p "$d/mq"
    img_cat "$d/merged.img" /data/mq.sha256 >"$d/mq.sha256"
    img_dump "$d/merged.img" /data/mq/w0 "$d/mq/w0"
    img_dump "$d/merged.img" /data/mq/w1 "$d/mq/w1"
    (cd "$d/mq" && sha256sum --quiet -c ../mq.sha256) || tfail "the writers' files in the merged image differ"
    log "merged image holds both writers' files"
    rm -rf "$d/merged.img" "$d/mq"
}

test_qemu_restart() {
    local d="$WORK/qemu-restart" rc=0
    mkdir -p "$d"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$overlay" 1 "$d/backend.log"
    start_qemu "$d/console1.log" "$d/sock" crash
    wait_for_line "$d/console1.log" '^VMTEST READY crash' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console1.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
    sleep 3
    kill -KILL "$QEMU_PID"
    wait "$QEMU_PID" 2>/dev/null || true
    log "QEMU killed with SIGKILL in the middle of the workload ($(grep -c '' "$d/console1.log") console lines)"
    kill -0 "$BACKEND_PID" 2>/dev/null || {
        show_backend_log "$d/backend.log"
        tfail "the backend died when QEMU was killed"
    }
    run_guest "$d/console2.log" "$d/sock" recover 300
    backend_stop || {
        show_backend_log "$d/backend.log"
        tfail "backend did not stop cleanly"
    }
    expect_guest "$d/console2.log" recover-files recover-io
    if grep -q 'EXT4-fs (vda): recovery complete' "$d/console2.log"; then
        log "the guest replayed the journal (EXT4-fs (vda): recovery complete)"
    else
        show_console "$d/console2.log"
        tfail "no journal replay on the second boot: was QEMU really killed mid-workload?"
    fi
    check_and_merge "$overlay" "$d/merged.img"
    rm -f "$d/merged.img"
}

# kill_and_restart_backend D OVERLAY: SIGKILL the backend, check QEMU
# survives, start the backend again on the same socket.
kill_and_restart_backend() {
    local d="$1" overlay="$2"
    kill -KILL "$BACKEND_PID"
    wait "$BACKEND_PID" 2>/dev/null || true
    log "backend killed with SIGKILL"
    sleep 2
    kill -0 "$QEMU_PID" 2>/dev/null || {
        show_console "$d/console.log"
        tfail "QEMU exited when the backend was killed"
    }
    backend_start "$d/sock" "$overlay" 1 "$d/backend2.log"
}

# QEMU's stderr lines a backend restart causes: the vhost-user connection
# failing under QEMU, and its reconnection.
RESTART_NOISE='Failed to set msg fds|ring restore failed|Connection refused|Failed to read msg header|Failed to write msg header|vhost_set_[a-z_]+ failed|Broken pipe|Connection reset by peer|Failed to connect|Error reading|vhost_user_read|vhost lacks feature mask|Disconnected'

# show_qemu_messages CONSOLE: QEMU's stderr, summed up: lines of the kinds
# a backend restart causes are labelled so; any other line is shown.
show_qemu_messages() {
    local f="$1.qemu" total unexpected
    [ -s "$f" ] || return 0
    total="$(grep -c '' "$f")"
    unexpected="$(grep -cvE "$RESTART_NOISE" "$f" || true)"
    log "QEMU stderr: $total lines; $((total - unexpected)) of the kinds expected while the backend restarts (the vhost-user connection lost and made again):"
    grep -oE "$RESTART_NOISE" "$f" | sort | uniq -c | sort -rn | sed 's/^/    | expected: /' >&2
    if ((unexpected > 0)); then
        log "QEMU stderr: $unexpected lines not of those kinds:"
        grep -vE "$RESTART_NOISE" "$f" | sort | uniq -c | sort -rn | head -n 10 | sed 's/^/    | /' >&2
    fi
}

# no_vhost_start_error CONSOLE: QEMU never failed to start the device on
# a restarted backend.
no_vhost_start_error() {
    if grep -q 'Error starting vhost' "$1.qemu" 2>/dev/null; then
        grep 'Error starting vhost' "$1.qemu" | head -n 5 | sed 's/^/    | /' >&2
        tfail "QEMU logged 'Error starting vhost'"
    fi
}

# progress_count CONSOLE: chunks the guest has announced so far.
progress_count() { tr -d '\r' <"$1" | grep -c '^VMTEST PROGRESS' || true; }

# wait_progress CONSOLE N TIMEOUT: until the guest announced more than N
# chunks (its I/O resumed); 124 on timeout, 1 if QEMU died.
wait_progress() {
    local console="$1" n="$2" deadline
    deadline=$(($(date +%s) + $3))
    while (($(progress_count "$console") <= n)); do
        kill -0 "$QEMU_PID" 2>/dev/null || return 1
        (($(date +%s) < deadline)) || return 124
        sleep 0.2
    done
}

# guest_result CONSOLE: the guest's "result:" line (chunks, lost, errors).
guest_result() { vmtest_lines "$1" | sed -n 's/^VMTEST INFO result: //p' | tail -n 1; }

# resubmitted LOG: requests the daemon found in flight at its start.
resubmitted() {
    { tr -d '\r' <"$1" 2>/dev/null | grep 'requests in flight at the restart' || true; } |
        sed -n 's/.*found \([0-9]*\) requests.*/\1/p' | awk '{ s += $1 } END { print s + 0 }'
}

# wait_in_flight CONTROL_SOCKET TIMEOUT: until the daemon's query-stats
# counts requests in flight; prints how many (or, on failure, the last
# answer). 124 on timeout, 1 if the control socket does not answer.
wait_in_flight() {
    local ctl="$1" deadline out n
    deadline=$(($(date +%s) + $2))
    while :; do
        out="$("$VUC_BIN" ctl "$ctl" query-stats --json 2>&1)" || {
            echo "$out"
            return 1
        }
        n="$(python3 -c 'import json, sys; print(json.load(sys.stdin)["total"]["in_flight"])' <<<"$out" 2>&1)" || {
            echo "query-stats: $n"
            return 1
        }
        if ((n > 0)); then
            echo "$n"
            return 0
        fi
        (($(date +%s) < deadline)) || {
            echo "in_flight 0 in the last query-stats"
            return 124
        }
        sleep 0.05
    done
}

# The daemon killed while the guest is idle (nothing in flight) and started
# again: QEMU reconnects and the guest carries on; data and filesystem
# must be intact.
test_daemon_restart() {
    local d="$WORK/daemon-restart" rc=0
    mkdir -p "$d"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$overlay" 1 "$d/backend.log"
    start_qemu "$d/console.log" "$d/sock" reconnect --reconnect 1 --append "vmtest.phase=idle vmtest.pause=12"
    wait_for_line "$d/console.log" '^VMTEST READY reconnect-idle' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
    kill_and_restart_backend "$d" "$overlay"
    rc=0
    wait_pid "$QEMU_PID" "$(timeout_s 180)" || rc=$?
    show_qemu_messages "$d/console.log"
    if ((rc != 0)); then
        show_console "$d/console.log"
        show_backend_log "$d/backend2.log"
        tfail "QEMU after the backend restart: status $rc (124: the guest did not finish in time)"
    fi
    backend_stop || {
        show_backend_log "$d/backend2.log"
        tfail "backend did not stop cleanly"
    }
    expect_guest "$d/console.log" reconnect-idle
    check_and_merge "$overlay" "$d/merged.img"
    rm -f "$d/merged.img"
}

# The daemon killed in the middle of the guest's I/O and started again.
# Strict: QEMU hands the restarted daemon its in-flight area, the requests
# in flight at the kill are resubmitted, and the guest must see no I/O
# error and lose no write (it checks every chunk it fsynced, before and
# after the restart); its I/O must resume within 120 s (TCG); QEMU must
# not log "Error starting vhost"; the overlay checks clean and merges into
# an image that passes fsck.
test_daemon_restart_busy() {
    local d="$WORK/daemon-restart-busy" rc=0 n0 t0
    mkdir -p "$d"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$overlay" 1 "$d/backend.log"
    start_qemu "$d/console.log" "$d/sock" reconnect --reconnect 1 --append "vmtest.phase=busy vmtest.secs=20"
    wait_for_line "$d/console.log" '^VMTEST READY reconnect-busy' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
    sleep 1
    n0="$(progress_count "$d/console.log")"
    t0="$(now)"
    kill_and_restart_backend "$d" "$overlay"
    wait_progress "$d/console.log" "$n0" "$(timeout_s 120)" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console.log"
        show_backend_log "$d/backend2.log"
        tfail "the guest's I/O did not resume within $(timeout_s 120)s of the kill (status $rc)"
    fi
    log "guest I/O resumed $(elapsed "$t0")s after the kill; the restarted daemon resubmitted $(resubmitted "$d/backend2.log") requests"
    wait_pid "$QEMU_PID" "$(timeout_s 180)" || rc=$?
    show_qemu_messages "$d/console.log"
    if ((rc != 0)); then
        show_console "$d/console.log"
        show_backend_log "$d/backend2.log"
        tfail "QEMU after the backend restart: status $rc (124: the guest did not finish in time)"
    fi
    log "guest: $(guest_result "$d/console.log")"
    expect_guest "$d/console.log" reconnect-busy
    no_vhost_start_error "$d/console.log"
    kill -0 "$BACKEND_PID" 2>/dev/null || {
        show_backend_log "$d/backend2.log"
        tfail "the restarted backend died"
    }
    backend_stop || {
        show_backend_log "$d/backend2.log"
        tfail "the restarted backend did not stop cleanly"
    }
    golden_unchanged
    check_and_merge "$overlay" "$d/merged.img"
    rm -f "$d/merged.img"
}

# supervise D OVERLAY: runs the daemon and starts it again whenever it
# exits, as systemd's Restart=always would, until D/stop exists. Each
# incarnation N logs to D/backend-N.log; D/backend.pid holds "PID N" of
# the current one, D/exits gets "N STATUS" as each ends.
supervise() {
    local d="$1" overlay="$2" n=0 rc
    trap 'kill_registered; exit 0' TERM
    while [ ! -e "$d/stop" ]; do
        n=$((n + 1))
        backend_start "$d/sock" "$overlay" 1 "$d/backend-$n.log"
        echo "$BACKEND_PID $n" >"$d/backend.pid.new"
        mv "$d/backend.pid.new" "$d/backend.pid"
        rc=0
        wait "$BACKEND_PID" || rc=$?
        echo "$n $rc" >>"$d/exits"
        [ -e "$d/stop" ] || sleep 0.2
    done
}

# The daemon SIGKILLed VUC_VM_KILLS times (default 3; the campaign in the
# issue is 20; more while none has found requests in flight, each of them
# after throttling the daemon to 20 IOPS, so that requests wait taken
# while the guest writes, and as soon as query-stats counts one in flight)
# at random moments while the guest writes and flushes (two
# writers); a supervisor loop restarts it each time. The daemon runs with
# O_DSYNC (--sync), as on storage that is slow to acknowledge, so that
# requests are in flight much of the time. Fails on any guest I/O error or lost
# write, on I/O that does not resume within 120 s of a kill, on "Error
# starting vhost" from QEMU, when no kill found a request to resubmit, and
# on a damaged overlay. Reports, per kill, what the restarted daemon
# resubmitted and how long the guest waited.
test_daemon_kill_loop() {
    local d="$WORK/daemon-kill-loop" rc=0 kills="${VUC_VM_KILLS:-3}" k pid n n0 t0 t_all r
    local secs=$((15 + 4 * kills)) per_kill=() total=0 nonzero=0 done_kills=0
    mkdir -p "$d"
    t_all="$(now)"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    # A control socket: the first kill after the ones asked for throttles
    # the daemon first (below).
    VUC_SERVE_ARGS="--sync --control-socket $d/ctl.sock" supervise "$d" "$overlay" 2>>"$d/supervisor.log" &
    local sup=$!
    register_pid "$sup"
    # On the way out, also the daemon the supervisor runs (a SIGKILLed
    # supervisor cannot stop it).
    # shellcheck disable=SC2064 # $d is expanded now, on purpose
    trap "touch '$d/stop'; kill -KILL \"\$(cut -d' ' -f1 '$d/backend.pid' 2>/dev/null)\" 2>/dev/null || true; kill_registered; true" EXIT
    wait_for_file "$d/backend.pid" 30 "$sup" || tfail "the supervisor did not start the daemon"
    start_qemu "$d/console.log" "$d/sock" reconnect --reconnect 1 --append "vmtest.phase=killloop vmtest.writers=2 vmtest.secs=$(timeout_s "$secs")"
    wait_for_line "$d/console.log" '^VMTEST READY reconnect-killloop' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
    # After the kills asked for, more (up to 8 times as many, while the
    # guest writes) until one has found requests in flight: a random
    # moment finds the daemon idle more often than not under TCG.
    for ((k = 1; k <= 8 * kills; k++)); do
        ((k <= kills || nonzero == 0)) || break
        # A random moment: 0.3 to 2.5 s into the guest's writes; the extra
        # kills sooner (0.1 to 0.8 s), so that more of them fit in the
        # guest's writing time.
        if ((k <= kills)); then
            sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.1f", 0.3 + (r % 23) / 10 }')"
        else
            sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.1f", 0.1 + (r % 8) / 10 }')"
        fi
        if vmtest_lines "$d/console.log" | grep '^VMTEST INFO workload ends' >/dev/null; then
            ((k > kills)) && break
            show_console "$d/console.log"
            tfail "the guest's workload ended before kill $k of $kills (it runs $(timeout_s "$secs")s)"
        fi
        read -r pid n <"$d/backend.pid"
        if ((k > kills)) && [ "$VUC_BACKEND" = ours ]; then
            # None found requests in flight: this one waits until the
            # daemon says it has some, then kills at once. At 20 IOPS the
            # guest's writes wait taken, held back by the limit (delayed,
            # never failed), so that they are still in flight at the kill.
            "$VUC_BIN" ctl "$d/ctl.sock" set-throttle iops-total=20 >>"$d/supervisor.log" 2>&1 ||
                tfail "kill $k: set-throttle on the daemon's control socket failed ($(tail -n 2 "$d/supervisor.log"))"
            r="$(wait_in_flight "$d/ctl.sock" "$(timeout_s 30)")" ||
                tfail "kill $k: the daemon had no request in flight for $(timeout_s 30)s while the guest writes ($r)"
            log "kill $k: the daemon has $r requests in flight"
        fi
        n0="$(progress_count "$d/console.log")"
        t0="$(now)"
        kill -KILL "$pid"
        rc=0
        wait_progress "$d/console.log" "$n0" "$(timeout_s 120)" || rc=$?
        if ((rc != 0)); then
            show_console "$d/console.log"
            show_backend_log "$d/backend-$((n + 1)).log"
            tfail "kill $k: the guest's I/O did not resume within $(timeout_s 120)s (status $rc)"
        fi
        r="$(resubmitted "$d/backend-$((n + 1)).log")"
        per_kill+=("$r")
        total=$((total + r))
        ((r > 0)) && nonzero=$((nonzero + 1))
        done_kills=$k
        log "kill $k ($kills asked for): daemon $n (pid $pid) killed after chunk $n0; daemon $((n + 1)) resubmitted $r requests; guest I/O resumed after $(elapsed "$t0")s"
    done
    rc=0
    wait_pid "$QEMU_PID" "$(timeout_s $((secs + 240)))" || rc=$?
    show_qemu_messages "$d/console.log"
    touch "$d/stop"
    read -r pid n <"$d/backend.pid"
    stop_pid "$pid" "backend" 15 || true
    wait "$sup" 2>/dev/null || true
    if ((rc != 0)); then
        show_console "$d/console.log"
        tfail "QEMU after the kills: status $rc (124: the guest did not finish in time)"
    fi
    grep -q "^$n 0\$" "$d/exits" || tfail "the last daemon did not exit 0 on SIGTERM ($(tail -n 1 "$d/exits"))"
    log "KILL LOOP: $done_kills kills ($kills asked for); guest $(guest_result "$d/console.log"); resubmitted per kill: ${per_kill[*]} (total $total, $nonzero kills with requests in flight); $(elapsed "$t_all")s in all"
    expect_guest "$d/console.log" reconnect-killloop
    no_vhost_start_error "$d/console.log"
    if [ "$VUC_BACKEND" = ours ]; then
        ((nonzero > 0)) || tfail "no kill found a request in flight to resubmit"
    fi
    golden_unchanged
    check_and_merge "$overlay" "$d/merged.img"
    rm -f "$d/merged.img"
}

# prev_bin: the release binary of VUC_PREV_REV (default HEAD~1), built once
# into ${CARGO_TARGET_DIR:-target}/prev/<commit>/ from `git archive` (its
# own target directory, seeded from the current release build so that only
# the crate itself is compiled).
prev_bin() {
    local rev="${VUC_PREV_REV:-HEAD~1}" sha target dir t0
    sha="$(git -C "$VUC_SRC_DIR" rev-parse --verify "$rev^{commit}" 2>/dev/null)" ||
        die "VUC_PREV_REV=$rev is not a commit of $VUC_SRC_DIR"
    target="${CARGO_TARGET_DIR:-$VUC_SRC_DIR/target}"
    case "$target" in /*) ;; *) target="$VUC_SRC_DIR/$target" ;; esac
    dir="$target/prev/$sha"
    if [ ! -x "$dir/vhost-user-cow" ]; then
        t0="$(now)"
        log "building the previous commit ($rev = ${sha:0:12}) into $dir"
        rm -rf "$dir/src"
        mkdir -p "$dir/src"
        git -C "$VUC_SRC_DIR" archive "$sha" | tar -x -C "$dir/src"
        # tar gives the files the commit's time, older than the seeded
        # build's artifacts: cargo would take those as up to date and hand
        # back the current build. Newer files make it compile the crate.
        find "$dir/src" -type f -exec touch {} +
        if [ ! -d "$target/prev/build/release" ] && [ -d "$target/release" ]; then
            mkdir -p "$target/prev/build"
            cp -a "$target/release" "$target/prev/build/release"
        fi
        (cd "$dir/src" && CARGO_TARGET_DIR="$target/prev/build" cargo build --release --quiet --bin vhost-user-cow) >&2 ||
            die "cargo build of $rev failed"
        cp "$target/prev/build/release/vhost-user-cow" "$dir/vhost-user-cow"
        rm -rf "$dir/src"
        log "built the previous commit in $(elapsed "$t0")s"
    fi
    echo "$dir/vhost-user-cow"
}

# replace_backend D OVERLAY BIN OLD_LOG LOG WHAT: SIGTERM the daemon (it
# must exit 0), start BIN on the same socket, and wait for the guest's
# I/O. Sets STEP_GUARANTEED: 1 when the stopped daemon said it published
# every request it took (OLD_LOG), which is what makes the step safe.
# Returns 1 when the guest's I/O did not resume in time.
replace_backend() {
    local d="$1" overlay="$2" bin="$3" old_log="$4" log_file="$5" what="$6" n0 t0 rc=0
    n0="$(progress_count "$d/console.log")"
    t0="$(now)"
    backend_stop || tfail "$what: the daemon did not exit 0 on SIGTERM"
    STEP_GUARANTEED=0
    grep -q 'published before disconnecting' "$old_log" && STEP_GUARANTEED=1
    VUC_BIN="$bin" backend_start "$d/sock" "$overlay" 1 "$log_file"
    wait_progress "$d/console.log" "$n0" "$(timeout_s 120)" || rc=$?
    if ((rc != 0)); then
        log "$what: the guest's I/O did not resume within $(timeout_s 120)s (status $rc)"
        return 1
    fi
    log "$what: guest I/O resumed $(elapsed "$t0")s after the SIGTERM"
}

# An upgrade and a downgrade under guest writes: this build stopped with
# SIGTERM and replaced by the previous commit's release build, then that
# one replaced by this build again. What is guaranteed: a daemon of this
# build publishes every request it took before it exits on SIGTERM, so
# QEMU's rewind to the used index loses and repeats nothing whichever
# daemon comes next, with in-flight tracking or without (QEMU just does not
# use it with a daemon that does not offer it). So the downgrade step is
# strict. The upgrade step is strict too when the previous build says it
# drained at SIGTERM (its log); a build from before that (which finished
# its requests without publishing them) gives no such guarantee: then the
# guest's verdict is reported, and only the host side (QEMU serves on, the
# overlay checks clean, fsck) fails the test.
test_daemon_upgrade() {
    local d="$WORK/daemon-upgrade" rc=0 prev cur="$VUC_BIN" t0 strict=1 resumed=1
    if [ "$VUC_BACKEND" != ours ]; then
        log "SKIP: the upgrade test replaces vhost-user-cow builds (VUC_BACKEND=$VUC_BACKEND)"
        return 0
    fi
    mkdir -p "$d"
    t0="$(now)"
    prev="$(prev_bin)"
    log "previous build: $prev (ready after $(elapsed "$t0")s)"
    local overlay="$d/disk.$OVERLAY_EXT"
    backend_create "$overlay" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$overlay" 1 "$d/backend-1.log"
    start_qemu "$d/console.log" "$d/sock" reconnect --reconnect 1 --append "vmtest.phase=upgrade vmtest.secs=$(timeout_s 25)"
    wait_for_line "$d/console.log" '^VMTEST READY reconnect-upgrade' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
    sleep 1
    replace_backend "$d" "$overlay" "$prev" "$d/backend-1.log" "$d/backend-2.log" \
        "downgrade (this build -> previous commit)" || {
        show_console "$d/console.log"
        tfail "the downgrade stalled the guest"
    }
    ((STEP_GUARANTEED)) || tfail "this build did not say it published its requests at SIGTERM"
    sleep 2
    replace_backend "$d" "$overlay" "$cur" "$d/backend-2.log" "$d/backend-3.log" \
        "upgrade (previous commit -> this build)" || resumed=0
    if ((!STEP_GUARANTEED)); then
        strict=0
        log "the previous build did not publish its requests at SIGTERM (it predates that): the upgrade step is not guaranteed, the guest's verdict is only reported"
    fi
    ((resumed || !strict)) || {
        show_console "$d/console.log"
        tfail "the upgrade stalled the guest"
    }
    rc=0
    wait_pid "$QEMU_PID" "$(timeout_s 240)" || rc=$?
    show_qemu_messages "$d/console.log"
    if ((rc == 124 && !strict)); then
        log "OUTCOME (not guaranteed with this previous build): the guest did not finish in time"
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    elif ((rc != 0)); then
        show_console "$d/console.log"
        tfail "QEMU after the replacements: status $rc (124: the guest did not finish in time)"
    fi
    log "UPGRADE: guest $(guest_result "$d/console.log"); $(elapsed "$t0")s in all, the previous build included"
    no_vhost_start_error "$d/console.log"
    if ((strict)); then
        expect_guest "$d/console.log" reconnect-upgrade
    elif ! vmtest_lines "$d/console.log" | grep -x 'VMTEST PASS reconnect-upgrade' >/dev/null; then
        log "OUTCOME (not guaranteed with this previous build): $(vmtest_lines "$d/console.log" | grep '^VMTEST FAIL' | head -n 3 | tr '\n' ' ')"
    else
        log "OUTCOME: the guest carried on unharmed (not guaranteed with this previous build)"
    fi
    backend_stop || tfail "the last daemon did not exit 0 on SIGTERM"
    golden_unchanged
    check_and_merge "$overlay" "$d/merged.img"
    rm -f "$d/merged.img"
}

# ---------------------------------------------------------------------------
# Migration (docs/design.md, "Two connections, one active").

QMP="$(dirname "$0")/qmp.py"
MIG_MEM=256M

# migration_report JSON: the figures of a completed query-migrate answer.
migration_report() {
    python3 -c 'import json, sys
r = json.loads(sys.argv[1]); ram = r.get("ram", {})
print("status %s, total time %s ms, downtime %s ms, setup %s ms, RAM %.0f MiB transferred in %s pass(es)" % (
    r.get("status"), r.get("total-time"), r.get("downtime"), r.get("setup-time"),
    ram.get("transferred", 0) / 1048576, ram.get("dirty-sync-count")))' "$1"
}

# qemu_messages WHO CONSOLE: what that QEMU wrote to its stderr, or that
# it wrote nothing.
qemu_messages() {
    if [ -s "$2.qemu" ]; then
        log "QEMU messages, $1:"
        show_qemu_messages "$2"
    else
        log "QEMU messages, $1: none"
    fi
}

# wait_qmp PATH PID: until QEMU's QMP socket is there.
wait_qmp() {
    wait_for_file "$1" "$(timeout_s 30)" "$2" || tfail "no QMP socket $1 (status $?)"
}

# migrated_guest_checks D CONSOLE_SRC CONSOLE_DST OVERLAY: the guest
# finished on the destination with its data intact, the overlay checks
# clean and merges to what the guest wrote.
migrated_guest_checks() {
    local d="$1" src="$2" dst="$3" overlay="$4" after
    if vmtest_lines "$src" | grep '^VMTEST DONE' >/dev/null; then
        tfail "the guest finished on the source: the migration came too late"
    fi
    after="$(vmtest_lines "$dst" | grep -c '^VMTEST INFO chunk' || true)"
    ((after >= 1)) || {
        show_console "$dst"
        tfail "no chunk written after the switch: the workload did not go on on the destination"
    }
    log "chunks written: $(vmtest_lines "$src" | grep -c '^VMTEST INFO chunk') before the switch, $after after"
    expect_guest "$dst" migrate-io
    check_and_merge "$overlay" "$d/merged.img"
    img_cat "$d/merged.img" /data/mig.sha256 >"$d/mig.sha256"
    [ -s "$d/mig.sha256" ] || tfail "no /data/mig.sha256 in the merged image"
    mkdir -p "$d/mig"
    local f
    while read -r _ f; do
        img_dump "$d/merged.img" "/data/mig/$f" "$d/mig/$f"
    done <"$d/mig.sha256"
    (cd "$d/mig" && sha256sum --quiet -c ../mig.sha256) || tfail "the guest's chunks in the merged image differ"
    log "merged image holds the guest's $(wc -l <"$d/mig.sha256") chunks, checksums match"
    rm -rf "$d/merged.img" "$d/mig"
}

# backend_handover LOG: the daemon's log shows the destination taking the
# device over from the source (ours only).
backend_handover() {
    [ "$VUC_BACKEND" = ours ] || return 0
    grep -q 'stopped its rings and is no longer the active one' "$1" ||
        tfail "the backend log shows no handover from the source's connection"
    grep -q 'dirty log of .* bytes mapped' "$1" || tfail "the backend log shows no dirty log"
    log "backend log:"
    grep -E 'connected|active|waits|dirty log|refused' "$1" | sed 's/^.*\] /    | /' >&2
}

# start_migration_source D QEMU_OPTIONS...: a fresh overlay, the daemon,
# and the source QEMU (QMP at D/qmp-src) running the migrate workload;
# returns once the guest has started writing (QEMU_PID is the source).
start_migration_source() {
    local d="$1" rc=0
    shift
    mkdir -p "$d"
    backend_create "$d/disk.$OVERLAY_EXT" "$GUEST_GOLDEN"
    backend_start "$d/sock" "$d/disk.$OVERLAY_EXT" 1 "$d/backend.log"
    start_qemu "$d/console-src.log" "$d/sock" migrate "$@" --qmp "$d/qmp-src"
    wait_for_line "$d/console-src.log" '^VMTEST READY migrate' "$(timeout_s 120)" "$QEMU_PID" || rc=$?
    if ((rc != 0)); then
        show_console "$d/console-src.log"
        tfail "the guest's workload did not start (status $rc)"
    fi
}

# qmp_migrate D URI: QMP migrate of the source (D/qmp-src) to URI; waits
# until it completed and prints query-migrate's answer.
qmp_migrate() {
    local d="$1" uri="$2" json
    python3 "$QMP" "$d/qmp-src" migrate "{\"uri\": \"$uri\"}" >/dev/null || {
        show_qemu_messages "$d/console-src.log"
        tfail "QMP migrate to $uri refused"
    }
    json="$(python3 "$QMP" "$d/qmp-src" wait-migration "$(timeout_s 300)")" || {
        log "query-migrate: $json"
        show_qemu_messages "$d/console-src.log"
        tfail "the migration to $uri did not complete"
    }
    echo "$json"
}

# Live migration between two QEMUs on one daemon, over a unix socket.
test_migrate() {
    local d="$WORK/migrate" rc=0 src dst json
    local overlay="$d/disk.$OVERLAY_EXT" opts=(--mem "$MIG_MEM" --append "vmtest.secs=60")
    start_migration_source "$d" "${opts[@]}"
    src="$QEMU_PID"
    # The destination connects to the daemon while the source still uses it.
    start_qemu "$d/console-dst.log" "$d/sock" migrate "${opts[@]}" --qmp "$d/qmp-dst" --incoming "unix:$d/migration"
    dst="$QEMU_PID"
    wait_qmp "$d/qmp-src" "$src"
    wait_qmp "$d/qmp-dst" "$dst"
    wait_for_file "$d/migration" "$(timeout_s 30)" "$dst" || tfail "the destination does not listen on $d/migration"
    python3 "$QMP" "$d/qmp-src" migrate-set-parameters '{"max-bandwidth": 1073741824}' >/dev/null ||
        tfail "migrate-set-parameters failed"
    json="$(qmp_migrate "$d" "unix:$d/migration")" || tfail "the migration failed"
    echo "$json" >"$d/migration.json"
    log "MIGRATION (unix socket): $(migration_report "$json")"
    python3 "$QMP" "$d/qmp-dst" query-status >"$d/dst-status.json" || true
    log "destination: $(cat "$d/dst-status.json")"
    python3 "$QMP" "$d/qmp-src" quit >/dev/null || true
    wait_pid "$src" 30 || log "the source QEMU did not quit in 30 s"
    rc=0
    wait_pid "$dst" "$(timeout_s 300)" || rc=$?
    qemu_messages source "$d/console-src.log"
    qemu_messages destination "$d/console-dst.log"
    if ((rc != 0)); then
        show_console "$d/console-dst.log"
        show_backend_log "$d/backend.log"
        tfail "the destination QEMU: status $rc (124: the guest did not finish in time)"
    fi
    backend_stop || {
        show_backend_log "$d/backend.log"
        tfail "backend did not stop cleanly"
    }
    backend_handover "$d/backend.log"
    migrated_guest_checks "$d" "$d/console-src.log" "$d/console-dst.log" "$overlay"
    golden_unchanged
}

# The guest saved to a file and restored from it (virsh save / restore:
# pause, migrate to a file, quit; a new QEMU with -incoming).
test_migrate_file() {
    local d="$WORK/migrate-file" rc=0 src dst json
    local overlay="$d/disk.$OVERLAY_EXT" opts=(--mem "$MIG_MEM" --append "vmtest.secs=30")
    start_migration_source "$d" "${opts[@]}"
    src="$QEMU_PID"
    wait_qmp "$d/qmp-src" "$src"
    python3 "$QMP" "$d/qmp-src" stop >/dev/null || tfail "QMP stop failed"
    json="$(qmp_migrate "$d" "file:$d/vm.state")" || tfail "the save failed"
    log "SAVE (file:): $(migration_report "$json"); state file $(($(stat -c %s "$d/vm.state") / 1048576)) MiB"
    python3 "$QMP" "$d/qmp-src" quit >/dev/null || true
    wait_pid "$src" 30 || tfail "the saved QEMU did not quit"
    qemu_messages "saved guest" "$d/console-src.log"
    start_qemu "$d/console-dst.log" "$d/sock" migrate "${opts[@]}" --qmp "$d/qmp-dst" --incoming "file:$d/vm.state"
    dst="$QEMU_PID"
    wait_qmp "$d/qmp-dst" "$dst"
    # A guest saved paused is restored paused; `virsh restore` resumes it.
    json="$(python3 "$QMP" "$d/qmp-dst" wait-migration "$(timeout_s 300)")" || {
        log "query-migrate: $json"
        show_qemu_messages "$d/console-dst.log"
        tfail "the restore did not complete"
    }
    log "RESTORE (file:): incoming migration $(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("status"))' "$json")"
    python3 "$QMP" "$d/qmp-dst" cont >/dev/null || tfail "QMP cont after the restore failed"
    rc=0
    wait_pid "$dst" "$(timeout_s 300)" || rc=$?
    qemu_messages "restored guest" "$d/console-dst.log"
    if ((rc != 0)); then
        show_console "$d/console-dst.log"
        show_backend_log "$d/backend.log"
        tfail "the restored QEMU: status $rc (124: the guest did not finish in time)"
    fi
    backend_stop || {
        show_backend_log "$d/backend.log"
        tfail "backend did not stop cleanly"
    }
    migrated_guest_checks "$d" "$d/console-src.log" "$d/console-dst.log" "$overlay"
    golden_unchanged
}

main() {
    local t name fn
    for name in "${TESTS[@]}"; do
        case " ${ALL_TESTS[*]} " in *" $name "*) ;; *) die "unknown VM test '$name' (known: ${ALL_TESTS[*]})" ;; esac
    done
    local t_all
    t_all="$(now)"
    ensure_guest
    backend_init
    resolve_accel
    log "guest: $GUEST_DIR (kernel $(cat "$GUEST_DIR/kernel-version")); work directory: $WORK"
    local results=()
    for name in "${TESTS[@]}"; do
        fn="test_${name//-/_}"
        log "==== $name"
        t="$(now)"
        # Each test in a subshell with errexit working (not in an if), its
        # processes killed when it ends; in the background, so that a
        # signal to this script is handled at once (see cleanup).
        (
            set -e
            trap kill_registered EXIT
            trap 'exit 143' TERM
            trap 'exit 130' INT
            "$fn"
        ) &
        TEST_PID=$!
        local rc=0
        wait "$TEST_PID" || rc=$?
        TEST_PID=""
        if ((rc == 0)); then
            results+=("PASS $name ($(elapsed "$t")s)")
            log "==== PASS $name ($(elapsed "$t")s)"
        else
            FAILED_ANY=1
            results+=("FAIL $name ($(elapsed "$t")s)")
            log "==== FAIL $name ($(elapsed "$t")s)"
        fi
    done
    log "summary ($VUC_BACKEND backend, $VUC_ACCEL_RESOLVED, $(elapsed "$t_all")s in all):"
    printf '    %s\n' "${results[@]}" >&2
    ((FAILED_ANY == 0))
}

main "$@"
