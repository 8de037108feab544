# VM test 5: the host kills the daemon with SIGKILL and starts it again.
#   vmtest.phase=idle  write, sync, announce "VMTEST READY reconnect-idle"
#                      and stay idle for vmtest.pause seconds (the host
#                      restarts the daemon then), write more, check all.
#   vmtest.phase=busy  write and check for vmtest.secs seconds while the
#                      host kills and restarts the daemon; report what
#                      happened (slow chunks, I/O errors, bad data).
. /vmtest/lib.sh
phase="$(param phase idle)"
secs="$(param secs 20)"
pause="$(param pause 10)"
mkdir -p /data/rc
: >/tmp/rc.sha
i=0
chunk() {
    t0=$(now)
    write_random "/data/rc/r$i" 4 || fail "reconnect-$phase" "dd of r$i failed"
    (cd /data/rc && sha256sum "r$i" >>/tmp/rc.sha)
    took=$(since "$t0")
    # Only the slow chunks (the daemon's restart) are worth a line.
    case "$took" in 0.* | 1.*) ;; *) info "chunk $i took ${took}s" ;; esac
    i=$((i + 1))
}

if [ "$phase" = idle ]; then
    while [ "$i" -lt 4 ]; do chunk; done
    sync
    info "before the pause: in flight $(tr -s ' ' </sys/block/vda/inflight)"
    echo "VMTEST READY reconnect-idle"
    sleep "$pause"
    # First only read what was written before the restart.
    drop_caches
    if (cd /data/rc && sha256sum -c /tmp/rc.sha >/tmp/rc.out 2>&1); then
        info "after ${pause}s idle (the daemon restarted): chunks 0-3 read back intact"
    else
        info "after ${pause}s idle (the daemon restarted): chunks 0-3 DIFFER:"
        sed 's/^/VMTEST INFO /' /tmp/rc.out
    fi
    info "writing again"
    while [ "$i" -lt 8 ]; do chunk; done
else
    start=$(date +%s)
    while [ $(($(date +%s) - start)) -lt "$secs" ]; do
        chunk
        [ "$i" -eq 2 ] && echo "VMTEST READY reconnect-busy"
    done
fi

drop_caches
if (cd /data/rc 2>&1 && sha256sum -c /tmp/rc.sha) >/tmp/rc.out 2>&1; then
    ok=1
else
    ok=0
    grep -v ': OK$' /tmp/rc.out | sed 's/^/VMTEST INFO /'
    fail "reconnect-$phase" "$(grep -vc ': OK$' /tmp/rc.out) of $i chunks differ after reading back"
fi
info "$i chunks of 4 MiB written and read back"
errors=$(dmesg | grep -ciE 'I/O error|not a head|Aborting journal|EXT4-fs error')
if [ "$errors" -ne 0 ]; then
    dmesg | grep -iE 'vda|virtio|I/O error|journal|EXT4' | tail -n 20 | sed 's/^/VMTEST INFO dmesg: /'
    fail "reconnect-$phase" "$errors kernel messages about I/O errors"
elif [ "$ok" -eq 1 ]; then
    pass "reconnect-$phase"
fi
exit "$FAILED"
