//! Keeps a guest from turning a guessed raw image into a COW file.
//!
//! When the user did not name the format, a file is served as COW if it
//! starts with the COW magic. A guest of a raw image could write a COW
//! header naming a host file into its sector 0; at the next start the
//! daemon would then serve that host file to it (the same class of hole as
//! QEMU's CVE-2008-2004). So on a raw image whose format was guessed, a
//! write to sector 0 is checked: one that would leave the magic at offset
//! 0, in either byte order, is refused. See docs/design.md, "Trust model".
//!
//! The check reads guest memory that the guest may change at any moment,
//! so the first sector is copied out first, checked in the copy, and
//! written from the copy: what was checked is what reaches the file.

use crate::format::header::has_cow_magic;
use crate::fsutil::aligned::AlignedBuf;
use crate::units::{to_usize, SECTOR_BYTES};
use crate::virtio::request::{BlkRequest, Segment};

/// What became of a write to sector 0.
pub enum FirstSector {
    /// The write would give the image the COW magic: refuse it.
    Refused,
    /// The write's first sector now comes from this copy (keep it alive
    /// until the write completes).
    Pinned(AlignedBuf),
}

/// Copies the first sector of write `req` (which starts at sector 0 and
/// carries at least one sector) out of guest memory, checks it, and makes
/// the request's data start with the copy.
pub fn pin_first_sector(req: &mut BlkRequest) -> FirstSector {
    let len = to_usize(SECTOR_BYTES);
    let copy = AlignedBuf::zeroed(len);
    let mut got = 0;
    for s in &req.data {
        let n = s.len().min(len - got);
        // SAFETY: the parser checked the segment lies in guest memory, and
        // the request's memory guard keeps it mapped; a concurrent change
        // by the guest only changes what we copy, which is then checked.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr(), copy.as_ptr().add(got), n) };
        got += n;
        if got == len {
            break;
        }
    }
    if has_cow_magic(&copy.as_slice()[..got]) {
        return FirstSector::Refused;
    }
    let first = req
        .data
        .first()
        .map(Segment::guest_addr)
        .unwrap_or_default();
    // SAFETY: `copy` is `len` bytes and the caller keeps it alive for as
    // long as the request's segments are used.
    let head = unsafe { Segment::from_host(copy.as_ptr(), got, first) };
    let rest = Segment::skip(&req.data, got);
    req.data = std::iter::once(head).chain(rest).collect();
    FirstSector::Pinned(copy)
}
