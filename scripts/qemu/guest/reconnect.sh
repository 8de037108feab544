# VM tests 5-8: the host kills or replaces the daemon and starts it again.
#   vmtest.phase=idle  write, sync, announce "VMTEST READY reconnect-idle"
#                      and stay idle for vmtest.pause seconds (the host
#                      restarts the daemon then), write more, check all.
#   vmtest.phase=busy|killloop|upgrade
#                      write fsynced 4 MiB chunks for vmtest.secs seconds
#                      (vmtest.writers writers at once, default 1)
#                      while the host restarts the daemon (once, over and
#                      over, or with another build); every chunk is
#                      announced ("VMTEST PROGRESS n": the host waits for
#                      one after each restart) and checked at the end.
# Strict: a failed write, a chunk that reads back different (a lost
# write) or a kernel message about I/O errors fails the test. The last
# line before the verdict is "VMTEST INFO result: chunks=N lost=L
# errors=E", which the host reports.
. /vmtest/lib.sh
phase="$(param phase idle)"
secs="$(param secs 20)"
pause="$(param pause 10)"
writers="$(param writers 1)"
mkdir -p /data/rc /tmp/last
rm -f /tmp/rc.failed /tmp/rc.count
i=0
# One random 4 MiB pattern, made once: generating random data under TCG is
# slower than the disk, and the point is to keep the disk busy.
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
header() { printf '%-4095s\n' "chunk $1 $2"; }
# chunk W N: writer W's chunk N: the pattern with a 4 KiB header naming
# the chunk, written with O_DIRECT (no page-cache copy: the disk, not the
# guest's CPU, is what takes the time) and fsynced. Each writer keeps 32
# files and rewrites them in turn (the disk has 1 GiB); /tmp/last/FILE
# holds the chunk number of the last version fsynced, which `check`
# compares at the end. Writer 0 announces each chunk.
chunk() {
    t0=$(now)
    f="r$1-$(($2 % 32))"
    if ! dd if=/tmp/pat of="/data/rc/$f" bs=1M oflag=direct 2>/dev/null ||
        ! header "$1" "$2" | dd of="/data/rc/$f" bs=4096 count=1 iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null; then
        touch /tmp/rc.failed
        fail "reconnect-$phase" "the write of chunk $2 of writer $1 ($f) failed"
    fi
    echo "$1 $2" >"/tmp/last/$f"
    echo "$f" >>/tmp/rc.count
    took=$(since "$t0")
    # Only the slow chunks (the daemon's restart) are worth a line.
    case "$took" in 0.* | 1.* | 2.*) ;; *) info "chunk $2 of writer $1 took ${took}s" ;; esac
    [ "$1" = 0 ] && echo "VMTEST PROGRESS $2"
}
# check: every file against the last version fsynced; prints the files
# that differ, returns how many did (0: all intact).
check() {
    bad=0
    for l in /tmp/last/*; do
        f="${l##*/}"
        read -r w n <"$l"
        if ! { header "$w" "$n"; tail -c +4097 /tmp/pat; } | cmp -s - "/data/rc/$f"; then
            echo "$f (chunk $n of writer $w) differs"
            bad=$((bad + 1))
        fi
    done
    [ "$bad" -eq 0 ]
}

if [ "$phase" = idle ]; then
    while [ "$i" -lt 4 ]; do chunk 0 "$i"; i=$((i + 1)); done
    sync
    info "before the pause: in flight $(tr -s ' ' </sys/block/vda/inflight)"
    echo "VMTEST READY reconnect-idle"
    sleep "$pause"
    # First only read what was written before the restart.
    drop_caches
    if check >/tmp/rc.out; then
        info "after ${pause}s idle (the daemon restarted): chunks 0-3 read back intact"
    else
        info "after ${pause}s idle (the daemon restarted): chunks 0-3 DIFFER:"
        sed 's/^/VMTEST INFO /' /tmp/rc.out
    fi
    info "writing again"
    while [ "$i" -lt 8 ]; do chunk 0 "$i"; i=$((i + 1)); done
else
    # Writers 1.. in the background keep more requests in flight.
    w=1
    while [ "$w" -lt "$writers" ]; do
        (
            j=0
            start=$(date +%s)
            while [ $(($(date +%s) - start)) -lt "$secs" ]; do
                chunk "$w" "$j"
                j=$((j + 1))
            done
        ) &
        w=$((w + 1))
    done
    start=$(date +%s)
    while [ $(($(date +%s) - start)) -lt "$secs" ]; do
        chunk 0 "$i"
        i=$((i + 1))
        [ "$i" -eq 2 ] && echo "VMTEST READY reconnect-$phase"
    done
    wait
    echo "VMTEST INFO workload ends after $i chunks of writer 0"
fi

i=$(grep -c '' /tmp/rc.count)
set -- /tmp/last/*
files=$#
write_errors=0
[ -e /tmp/rc.failed ] && write_errors=1
drop_caches
lost=0
if ! check >/tmp/rc.out; then
    lost=$(grep -c '' /tmp/rc.out)
    sed 's/^/VMTEST INFO /' /tmp/rc.out
    fail "reconnect-$phase" "$lost of $files files differ from their last version after reading back"
fi
info "$i chunks of 4 MiB written; the last version of each of the $files files read back"
errors=$(dmesg | grep -ciE 'I/O error|not a head|Aborting journal|EXT4-fs error')
info "result: chunks=$i lost=$lost errors=$((errors + write_errors))"
if [ "$errors" -ne 0 ]; then
    dmesg | grep -iE 'vda|virtio|I/O error|journal|EXT4' | tail -n 20 | sed 's/^/VMTEST INFO dmesg: /'
    fail "reconnect-$phase" "$errors kernel messages about I/O errors"
elif [ "$lost" -eq 0 ] && [ "$write_errors" -eq 0 ]; then
    pass "reconnect-$phase"
fi
exit "$FAILED"
