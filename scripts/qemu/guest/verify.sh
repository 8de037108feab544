# VM test 2: a second boot of the same COW file sees what test 1 wrote.
. /vmtest/lib.sh
tag="$(param tag none)"
if [ "$(cat /data/hello.txt 2>&1)" = "hello from vmtest $tag" ]; then
    pass persist-small
else
    fail persist-small "/data/hello.txt: $(head -c 200 /data/hello.txt 2>&1)"
fi
(cd /data/small && sha256sum -c -s /data/small.sha256) && pass persist-files || fail persist-files "small files differ"
t0=$(now)
(cd /data && sha256sum -c -s big.sha256) && pass persist-workload || fail persist-workload "/data/big.bin differs"
info "checked /data/big.bin in $(since "$t0")s"
exit "$FAILED"
