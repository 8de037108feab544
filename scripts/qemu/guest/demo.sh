# The README demo: show the disk, write a file, show it again.
. /vmtest/lib.sh
info "root filesystem:"
df -h / | sed 's/^/    /'
echo "hello from the guest, $(date)" >/data/demo.txt
write_random /data/demo.bin "$(param mib 32)"
sync
info "after writing /data/demo.txt and $(param mib 32) MiB of /data/demo.bin:"
df -h / | sed 's/^/    /'
ls -l /data | sed 's/^/    /'
cat /data/demo.txt && pass demo
exit "$FAILED"
