//! The `u64` to `usize` conversion, as in the daemon's `units` module.

// Like the daemon, these clients support 64-bit targets only.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("vhost-user-cow-load supports 64-bit targets only (usize must hold any u64)");

/// `u64` to `usize`, lossless: the crate only builds where `usize` is 64
/// bits (the `compile_error!` above).
#[inline]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // lossless: 64-bit targets only, enforced above
pub const fn to_usize(v: u64) -> usize {
    v as usize
}
