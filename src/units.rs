//! The 512-byte sector, and the one integer conversion the crate leans on.
//!
//! Two sizes are easy to confuse. [`SECTOR_BYTES`] is the virtio-blk
//! sector: the unit of request sectors, of the disk's capacity and of the
//! sector numbers the COW bitmap and data area are addressed by, always 512
//! bytes. The COW file's `sectorsize` (header field, see
//! [`crate::format::header::DEFAULT_SECTORSIZE`]) is the chunk one bitmap
//! bit covers, a power of two from 512 up, read from the header.

/// Bytes per virtio-blk sector (always 512, whatever the logical block size
/// or the COW file's `sectorsize`).
pub const SECTOR_BYTES: u64 = 1 << SECTOR_SHIFT;
/// log2 of [`SECTOR_BYTES`].
pub const SECTOR_SHIFT: u32 = 9;

// The daemon supports 64-bit Linux only: guest memory, file offsets and
// request lengths are u64 and are used as usize without checks.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("vhost-user-cow supports 64-bit targets only (usize must hold any u64)");

/// `u64` to `usize`, lossless: the crate only builds where `usize` is 64
/// bits (the `compile_error!` above). Use this instead of `as usize` so that
/// `clippy::cast_possible_truncation` keeps flagging the casts that can
/// really truncate.
#[inline]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // lossless: 64-bit targets only, enforced above
pub const fn to_usize(v: u64) -> usize {
    v as usize
}
