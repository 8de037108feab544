# Sourced by the guest's test scripts.
# shellcheck shell=sh

pass() { echo "VMTEST PASS $*"; }
fail() { echo "VMTEST FAIL $1: $2"; FAILED=1; }
info() { echo "VMTEST INFO $*"; }
export FAILED=0

# The value of vmtest.NAME=VALUE on the kernel command line, or $2.
param() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "vmtest.$1="*) echo "${arg#*=}"; return 0 ;; esac
    done
    echo "$2"
}

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Forget the page cache, so what follows reads from the disk.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# write_random FILE MIB: MIB MiB of random data, written and fsynced.
write_random() { dd if=/dev/urandom of="$1" bs=1M count="$2" conv=fsync 2>/dev/null; }
