# VM test 4, second boot (after QEMU was killed): the root filesystem was
# mounted (its journal replayed) and can be written and read.
. /vmtest/lib.sh
dmesg | grep -E 'EXT4-fs \(vda\)' | sed 's/^/VMTEST INFO dmesg: /'
n=$(ls /data/crash 2>/dev/null | wc -l)
info "$n files in /data/crash"
[ "$n" -ge 1 ] && pass recover-files || fail recover-files "no files survived in /data/crash"
write_random /data/after-crash 8 && sha256sum /data/after-crash >/tmp/a.sha
drop_caches
sha256sum -c -s /tmp/a.sha && pass recover-io || fail recover-io "write/read after recovery differs"
exit "$FAILED"
