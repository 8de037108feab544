# VM test: the host migrates this guest to another QEMU (or saves it to a
# file and restores it) while it writes: 4 MiB chunks of random data,
# fsynced and checksummed, for vmtest.secs seconds of guest time, every
# 4th chunk followed by reading all of them back (page cache dropped).
# "VMTEST READY migrate" after the first chunks tells the host to start.
# Meanwhile a reader checksums a 32 MiB file again and again with the page
# cache dropped, so reads (data the daemon puts into guest memory) are in
# flight across the switch. Each chunk's line says which side of the
# switch it was on (the console of each QEMU is its own file). The
# checksums go to /data/mig.sha256, which the host compares with the
# merged image.
. /vmtest/lib.sh
secs="$(param secs 40)"
mkdir -p /data/mig
: >/tmp/mig.sha
i=0
verify() {
    drop_caches
    if ! (cd /data/mig && sha256sum -c /tmp/mig.sha >/tmp/mig.out 2>&1); then
        grep -v ': OK$' /tmp/mig.out | head -n 5 | sed 's/^/VMTEST INFO /'
        fail migrate-io "$(grep -vc ': OK$' /tmp/mig.out) of $i chunks differ after chunk $i"
    fi
}
write_random /data/mig/big 32 || fail migrate-io "dd of big failed"
(cd /data/mig && sha256sum big >/tmp/big.sha)
reader() {
    n=0
    while [ ! -f /tmp/reader.stop ]; do
        drop_caches
        (cd /data/mig && sha256sum -c /tmp/big.sha >/dev/null 2>&1) || echo "pass $n" >>/tmp/reader.fail
        n=$((n + 1))
    done
    echo "$n" >/tmp/reader.n
}
reader &
reader_pid=$!
start=$(date +%s)
while [ $(($(date +%s) - start)) -lt "$secs" ]; do
    write_random "/data/mig/m$i" 4 || fail migrate-io "dd of m$i failed"
    (cd /data/mig && sha256sum "m$i" >>/tmp/mig.sha)
    info "chunk $i written at $(now)"
    i=$((i + 1))
    [ "$i" -eq 2 ] && echo "VMTEST READY migrate"
    [ $((i % 4)) -eq 0 ] && verify
done
touch /tmp/reader.stop
wait "$reader_pid"
if [ -s /tmp/reader.fail ]; then
    fail migrate-io "the reader's checksum of big differed in $(wc -l </tmp/reader.fail) of $(cat /tmp/reader.n) passes"
fi
info "the reader checksummed big $(cat /tmp/reader.n) times"
verify
cat /tmp/big.sha >>/tmp/mig.sha
cp /tmp/mig.sha /data/mig.sha256
sync
info "$i chunks of 4 MiB written and read back"
errors=$(dmesg | grep -ciE 'I/O error|Aborting journal|EXT4-fs error')
if [ "$errors" -ne 0 ]; then
    dmesg | grep -iE 'vda|virtio|I/O error|journal|EXT4' | tail -n 20 | sed 's/^/VMTEST INFO dmesg: /'
    fail migrate-io "$errors kernel messages about I/O errors"
fi
[ "$FAILED" -eq 0 ] && pass migrate-io
exit "$FAILED"
