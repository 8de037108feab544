# VM test 4, first boot: write without end until the host kills QEMU.
. /vmtest/lib.sh
mkdir -p /data/crash
i=0
while :; do
    write_random "/data/crash/c$i" 4 || { fail crash "dd failed"; break; }
    [ "$i" -eq 1 ] && echo "VMTEST READY crash"
    i=$((i + 1))
done
exit "$FAILED"
