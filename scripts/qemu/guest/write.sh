# VM test 1: the guest writes files and a checksummed workload, reads them
# back from the disk (page cache dropped). Parameters: vmtest.tag (a string
# the host checks for), vmtest.mib (workload size).
. /vmtest/lib.sh
tag="$(param tag none)"
mib="$(param mib 200)"

grep -q ' / ext4 rw,' /proc/mounts && pass root-rw || fail root-rw "/ is not ext4 read-write: $(grep ' / ' /proc/mounts)"

# Small files with known content.
mkdir -p /data/small
echo "hello from vmtest $tag" >/data/hello.txt
i=0
while [ "$i" -lt 64 ]; do
    echo "small file $i of $tag" >"/data/small/f$i"
    i=$((i + 1))
done
(cd /data/small && sha256sum f* >/data/small.sha256)
drop_caches
if [ "$(cat /data/hello.txt)" = "hello from vmtest $tag" ] && (cd /data/small && sha256sum -c -s /data/small.sha256); then
    pass small-files
else
    fail small-files "read-back after drop_caches differs"
fi

# The workload: MIB MiB of random data, checksummed while still in the
# page cache, then read back from the disk and checked.
t0=$(now)
write_random /data/big.bin "$mib" || fail workload "dd failed"
sync
info "wrote $mib MiB in $(since "$t0")s"
t0=$(now)
(cd /data && sha256sum big.bin >big.sha256)
info "checksummed (page cache) in $(since "$t0")s"
drop_caches
t0=$(now)
if (cd /data && sha256sum -c -s big.sha256); then
    pass workload
else
    fail workload "sha256 of /data/big.bin read back from disk differs"
fi
info "read back and checked $mib MiB in $(since "$t0")s"
df -k / | sed 's/^/VMTEST INFO df: /'
exit "$FAILED"
