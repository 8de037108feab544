# VM test 3: two vCPUs and two virtqueues; a writer pinned to each CPU.
. /vmtest/lib.sh
mib="$(param mib 48)"
want_q="$(param queues 2)"
ncpu=$(nproc)
nq=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)
[ "$ncpu" -eq 2 ] && pass mq-cpus || fail mq-cpus "nproc is $ncpu"
[ "$nq" -eq "$want_q" ] && pass mq-queues || fail mq-queues "/sys/block/vda/mq has $nq queues, want $want_q"
mkdir -p /data/mq
t0=$(now)
taskset -c 0 dd if=/dev/urandom of=/data/mq/w0 bs=1M count="$mib" conv=fsync 2>/dev/null &
p0=$!
taskset -c 1 dd if=/dev/urandom of=/data/mq/w1 bs=1M count="$mib" conv=fsync 2>/dev/null &
p1=$!
wait "$p0" && wait "$p1" || fail mq-io "a writer failed"
(cd /data/mq && sha256sum w0 w1 >../mq.sha256)
info "two writers, $mib MiB each, in $(since "$t0")s"
drop_caches
# Read back in parallel too.
(cd /data/mq && taskset -c 0 sha256sum w0 >/tmp/r0) &
p0=$!
(cd /data/mq && taskset -c 1 sha256sum w1 >/tmp/r1) &
p1=$!
wait "$p0"
wait "$p1"
if cat /tmp/r0 /tmp/r1 | cmp -s - /data/mq.sha256; then
    pass mq-io
else
    fail mq-io "checksums differ after reading back"
fi
# Both virtqueues carried requests: each has its own MSI-X vector
# ("virtioN-req.Q" in /proc/interrupts) that the backend signals.
used=0
for q in 0 1; do
    n=$(grep -E "virtio[0-9]+-req\.$q\$" /proc/interrupts | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }')
    info "virtqueue $q: $n interrupts"
    [ "$n" -gt 0 ] && used=$((used + 1))
done
[ "$used" -eq 2 ] && pass mq-both-queues || fail mq-both-queues "only $used of 2 virtqueues signalled completions"
exit "$FAILED"
