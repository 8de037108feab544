#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time
# from its committed seed corpus (fuzz/README.md). Exits non-zero if any
# target crashed or hung (over 20 s on one input; the input is kept under
# fuzz/artifacts/<target>/).
#
#   FUZZ_SECONDS    seconds per target (default 30; four targets)
#   FUZZ_TARGETS    the targets to run (default: all four)
#   FUZZ_SANITIZER  address (default) or none
#
# The toolchain is the stable one: RUSTC_BOOTSTRAP=1 lets it take the -Z
# flags cargo-fuzz passes, for the fuzz build alone (never exported).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
read -r -a targets <<<"${FUZZ_TARGETS:-cow_header virtio_request vhost_user_messages scheduler}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

echo "== cargo fuzz build (-s $sanitizer)" >&2
RUSTC_BOOTSTRAP=1 cargo fuzz build -s "$sanitizer"

# New inputs go to a scratch corpus; the committed seeds stay as they are.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${seconds}s" >&2
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run -s "$sanitizer" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" 2>"$work/$t.log"; then
        failed+=("$t")
        tail -n 60 "$work/$t.log" >&2
    fi
    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|Done )' \
        "$work/$t.log" >&2 || true
done

if ((${#failed[@]})); then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]}" >&2
