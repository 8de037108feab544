#!/usr/bin/env bash
# Installs the host packages the VM scripts need and builds the test guest.
# Idempotent: skips what is present. Prints GUEST_DIR=... on stdout (all
# other output goes to stderr).
#
# The guest lives in $VUC_CACHE_DIR/guest-<key>/ (outside the source tree);
# the key hashes this script, scripts/qemu/guest/ and the kernel and busybox
# package versions, so changing any of them builds a new guest:
#   vmlinux             the Debian kernel, decompressed (boots via PVH)
#   initramfs.cpio.gz   busybox + virtio/ext4 modules; mounts /dev/vda
#   golden.img          ext4 root filesystem (busybox tree + guest tests)
#   golden.sha256       its checksum, to prove it never changes
# Downloaded .debs are kept in $VUC_CACHE_DIR/debs/.
#
# Host packages: qemu-system-x86 (from bookworm-backports on Debian 12, so
# that it matches the preinstalled qemu-utils 10.x instead of replacing it),
# e2fsprogs, cpio, xz-utils, zstd.
set -euo pipefail
PROG=setup
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

GUEST_SRC="$VUC_QEMU_DIR/guest"
GOLDEN_SIZE="${VUC_GOLDEN_SIZE:-1G}"

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
apt_get() { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get "$@"; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

APT_UPDATED=0
apt_update_once() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    apt_get update -qq >&2
    APT_UPDATED=1
}

codename() { sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"'; }

# The Debian mirror the machine already uses (first URI serving the release).
debian_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    {
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "${files[@]}"
        awk '/^URIs:/ { print $2 }' "${files[@]}"
    } | grep -v -e security -e backports | grep '/debian/\?$' | head -1
}

ensure_backports() {
    local suite="$1-backports"
    if grep -rqsE "^[^#]*$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local mirror
    mirror="$(debian_mirror)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    log "adding $suite from $mirror to /etc/apt/sources.list.d/vhost-user-cow-backports.list"
    echo "deb $mirror $suite main" | "${sudo[@]}" tee /etc/apt/sources.list.d/vhost-user-cow-backports.list >/dev/null
    APT_UPDATED=0
}

# qemu-system-x86 without removing anything (Debian 12's own 7.2 would
# remove qemu-utils 10.x, which holds qemu-storage-daemon).
ensure_qemu() {
    if command -v qemu-system-x86_64 >/dev/null; then
        return 0
    fi
    local target=() cn
    cn="$(codename)"
    if [ "$cn" = bookworm ]; then
        ensure_backports "$cn"
        target=(-t "$cn-backports")
    fi
    apt_update_once
    local sim
    sim="$(apt_get -s install --no-install-recommends "${target[@]}" qemu-system-x86)" ||
        die "apt-get -s install qemu-system-x86 failed: $sim"
    if printf '%s\n' "$sim" | grep '^Remv' >/dev/null; then
        printf '%s\n' "$sim" | grep '^Remv' >&2
        die "installing qemu-system-x86 would remove the packages above; refusing"
    fi
    log "installing qemu-system-x86 ${target[*]}"
    apt_get install -y -qq --no-install-recommends "${target[@]}" qemu-system-x86 >&2
}

ensure_tools() {
    local missing=() p
    for p in e2fsprogs cpio xz-utils zstd gzip; do
        installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        apt_update_once
        log "installing ${missing[*]}"
        apt_get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    ensure_qemu
}

# The .deb of PACKAGE (a concrete name, not a virtual one) in the cache.
cached_deb() {
    local pkg="$1" ver deb
    ver="$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')"
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        die "no candidate version of $pkg (apt-get update?)"
    fi
    # .deb file names encode the epoch's colon as %3a.
    deb="$VUC_CACHE_DIR/debs/${pkg}_${ver/:/%3a}_amd64.deb"
    if [ ! -s "$deb" ]; then
        mkdir -p "$VUC_CACHE_DIR/debs"
        log "downloading $pkg $ver"
        (cd "$VUC_CACHE_DIR/debs" && apt-get download -q "$pkg=$ver" >&2 2>/dev/null) ||
            (cd "$VUC_CACHE_DIR/debs" && apt-get download "$pkg=$ver" >&2) ||
            die "apt-get download $pkg=$ver failed"
    fi
    [ -s "$deb" ] || die "expected $deb after apt-get download"
    echo "$deb"
}

kernel_package() {
    local pkg="${VUC_KERNEL_PKG:-}"
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    fi
    [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 to a kernel package"
    echo "$pkg"
}

# Decompresses a bzImage into an ELF vmlinux (what scripts/extract-vmlinux
# does): try each compression magic at each offset until an ELF comes out.
extract_vmlinux() {
    local in="$1" out="$2" magic tool off
    for spec in 'fd377a585a00:xz -dc --single-stream' '28b52ffd:zstd -dcq' '1f8b0800:gzip -dcq' \
        '5d000000:xz -dc --format=lzma'; do
        magic="${spec%%:*}"
        tool="${spec#*:}"
        local pat
        pat="$(printf '%s' "$magic" | sed 's/../\\x&/g')"
        while read -r off; do
            [ -n "$off" ] || continue
            # shellcheck disable=SC2086
            tail -c +$((off + 1)) "$in" | $tool >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$pat" "$in" | cut -d: -f1 | head -5)
    done
    rm -f "$out"
    return 1
}

# Modules to load, in dependency order, from the "depends=" field of each
# module's .modinfo section. crc32c is requested by name by ext4/jbd2 at
# mount time (no modprobe in the guest), so it is listed explicitly.
WANTED_MODULES=(crc32c_generic virtio_pci virtio_blk ext4)

module_deps() { tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '; }

resolve_modules() {
    local moddir="$1" f name
    declare -gA MOD_PATH=()
    while read -r f; do
        name="$(basename "$f")"
        name="${name%%.ko*}"
        MOD_PATH["${name//-/_}"]="$f"
    done < <(find "$moddir/kernel" -name '*.ko*')
    declare -gA MOD_SEEN=()
    MOD_ORDER=()
    local m
    for m in "${WANTED_MODULES[@]}"; do add_module "$m"; done
}

add_module() {
    local m="${1//-/_}" file dep plain
    [ -n "${MOD_SEEN[$m]:-}" ] && return 0
    MOD_SEEN[$m]=1
    file="${MOD_PATH[$m]:-}"
    if [ -z "$file" ]; then
        # Built into the kernel?
        grep -q "/${m}.ko" "$KMODDIR/modules.builtin" 2>/dev/null && return 0
        grep -q "/${1}.ko" "$KMODDIR/modules.builtin" 2>/dev/null && return 0
        die "module $m not found in the kernel package"
    fi
    plain="$(mktemp)"
    decompress_module "$file" "$plain"
    for dep in $(module_deps "$plain"); do add_module "$dep"; done
    rm -f "$plain"
    MOD_ORDER+=("$m")
}

decompress_module() {
    case "$1" in
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -dcq "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) cp "$1" "$2" ;;
    esac
}

build_guest() {
    local dir="$1" kdeb="$2" bdeb="$3" tmp
    tmp="$(mktemp -d "$VUC_CACHE_DIR/build.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    local t0
    t0="$(now)"
    log "building the guest in $dir"

    log "extracting $(basename "$kdeb")"
    dpkg-deb -x "$kdeb" "$tmp/kernel"
    dpkg-deb -x "$bdeb" "$tmp/busybox"
    local vmlinuz kver
    vmlinuz="$(find "$tmp/kernel/boot" -name 'vmlinuz-*' | head -1)"
    [ -n "$vmlinuz" ] || die "no vmlinuz in $kdeb"
    kver="${vmlinuz##*/vmlinuz-}"
    KMODDIR="$tmp/kernel/lib/modules/$kver"
    [ -d "$KMODDIR" ] || KMODDIR="$tmp/kernel/usr/lib/modules/$kver"
    [ -d "$KMODDIR" ] || die "no modules directory for $kver"

    log "decompressing vmlinuz-$kver to vmlinux"
    extract_vmlinux "$vmlinuz" "$tmp/vmlinux" || die "could not decompress $vmlinuz"
    local bb="$tmp/busybox/bin/busybox"
    [ -x "$bb" ] || die "no bin/busybox in $bdeb"

    # --- initramfs
    resolve_modules "$KMODDIR"
    log "initramfs modules: ${MOD_ORDER[*]}"
    local ird="$tmp/initramfs" m
    mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
    cp "$bb" "$ird/bin/busybox"
    ln -s busybox "$ird/bin/sh"
    for m in "${MOD_ORDER[@]}"; do
        decompress_module "${MOD_PATH[$m]}" "$ird/lib/modules/$m.ko"
    done
    printf '%s\n' "${MOD_ORDER[@]}" >"$ird/lib/modules/load-order"
    install -m 755 "$GUEST_SRC/initramfs-init" "$ird/init"
    (cd "$ird" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) |
        gzip -9n >"$tmp/initramfs.cpio.gz"

    # --- golden root filesystem
    local root="$tmp/root" applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,data,etc,root,vmtest}
    cp "$bb" "$root/bin/busybox"
    while read -r applet; do
        case "$applet" in /bin/busybox | /sbin/init | /linuxrc | "") continue ;; esac
        [ -e "$root$applet" ] || ln -s /bin/busybox "$root$applet"
    done < <("$bb" --list-full | sed 's|^|/|')
    cp "$GUEST_SRC"/*.sh "$root/vmtest/"
    install -m 755 "$GUEST_SRC/init" "$root/sbin/init"
    chmod 755 "$root"/vmtest/*.sh
    chmod 1777 "$root/tmp"
    echo "vmtest" >"$root/etc/hostname"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    echo "$kver" >"$root/etc/vmtest-kernel"
    truncate -s "$GOLDEN_SIZE" "$tmp/golden.img"
    # Fixed UUID and hash seed, no timestamps from the build host:
    # reproducible enough, and the root is found by device, not by label.
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L vmtest-root \
        -U 5a1e5a1e-0000-4000-8000-00000000c0ff -E root_owner=0:0,hash_seed=5a1e5a1e-0000-4000-8000-000000000001 \
        -d "$root" "$tmp/golden.img"
    fsck.ext4 -fn "$tmp/golden.img" >"$tmp/fsck.log" 2>&1 || { cat "$tmp/fsck.log" >&2; die "fsck of the new golden image failed"; }
    chmod 444 "$tmp/golden.img"
    (cd "$tmp" && sha256sum golden.img >golden.sha256)

    mkdir -p "$dir.new"
    mv "$tmp/vmlinux" "$tmp/initramfs.cpio.gz" "$tmp/golden.img" "$tmp/golden.sha256" "$dir.new/"
    echo "$kver" >"$dir.new/kernel-version"
    rm -rf "$dir"
    mv "$dir.new" "$dir"
    rm -rf "$tmp"
    trap - EXIT
    log "guest built in $(elapsed "$t0")s: kernel $kver, $(du -h "$dir/initramfs.cpio.gz" | cut -f1) initramfs, golden image $GOLDEN_SIZE ($(du -h "$dir/golden.img" | cut -f1) used)"
}

main() {
    mkdir -p "$VUC_CACHE_DIR"
    ensure_tools
    # A machine that never ran apt-get update cannot resolve the packages.
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        apt_update_once
    fi
    local kpkg kdeb bdeb key
    kpkg="$(kernel_package)"
    kdeb="$(cached_deb "$kpkg")"
    bdeb="$(cached_deb busybox-static)"
    key="$(
        {
            cat "$0"
            (cd "$GUEST_SRC" && for f in *; do
                echo "== $f"
                cat "$f"
            done)
            basename "$kdeb"
            basename "$bdeb"
            echo "$GOLDEN_SIZE"
        } | sha256sum | cut -c1-16
    )"
    local dir="$VUC_CACHE_DIR/guest-$key"
    # One build at a time (runs from several worktrees share the cache).
    exec 9>"$VUC_CACHE_DIR/build.lock"
    flock -w 600 9 || die "timed out waiting for another setup.sh to finish building"
    if [ -s "$dir/golden.sha256" ]; then
        log "guest up to date: $dir"
    else
        build_guest "$dir" "$kdeb" "$bdeb"
    fi
    touch "$dir"
    # Keep the cache small: remove guests of other script versions that
    # nobody used for a day (another checkout may still be using a newer one).
    local old
    while read -r old; do
        log "removing old guest $old"
        rm -rf "$old"
    done < <(find "$VUC_CACHE_DIR" -maxdepth 1 -name 'guest-*' ! -path "$dir" -mmin +1440)
    exec 9>&-
    echo "GUEST_DIR=$dir"
}

main "$@"
