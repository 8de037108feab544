#!/usr/bin/env bash
# The image tools without a VM (scripts/qemu/demo.sh boots one on a COW
# disk served by the daemon). Builds the binary, makes a 64 MiB backing
# image and a COW overlay in a temporary directory, writes one sector into
# the overlay by hand the way the daemon orders a guest write (data, then
# the bitmap bit), then shows info, check and merge, and compares the
# merge with uml_moo's when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
vuc="$target/release/vhost-user-cow"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "== in $work"

# A 64 MiB backing image: 1 MiB of data, the rest a hole.
head -c $((1 << 20)) /dev/urandom > base.img
truncate -s 64M base.img

echo "== create"
"$vuc" create disk.cow --backing base.img
ls -ls base.img disk.cow

# A guest write of sector 100: data at data_offset + 100 * 512, then bit
# 100 (byte 12, bit 4) of the bitmap. Data first, then the bit, as the
# daemon orders them.
field() { "$vuc" info --json disk.cow | sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p"; }
data_offset=$(field data_offset)
bitmap_offset=$(field bitmap_offset)
printf 'hello from the COW file' | dd of=disk.cow bs=1 seek=$((data_offset + 100 * 512)) conv=notrunc status=none
printf '\x10' | dd of=disk.cow bs=1 seek=$((bitmap_offset + 12)) conv=notrunc status=none

echo "== info"
"$vuc" info disk.cow
echo "== check"
"$vuc" check disk.cow
echo "== merge --into merged.img"
"$vuc" merge disk.cow --into merged.img
dd if=merged.img bs=512 skip=100 count=1 status=none | head -c 23
echo
if command -v uml_moo >/dev/null; then
    uml_moo disk.cow uml_merged.img >/dev/null
    cmp merged.img uml_merged.img && echo "== merged.img is identical to uml_moo's output"
else
    echo "== (uml_moo not installed; skipping the comparison)"
fi
