//! The bitmap's resident pages, readable by other threads without the
//! owner's lock: the read fast path's "is every chunk of this range
//! allocated?" (docs/design.md, "Reads off the scheduler's lock").
//!
//! The owner (`Bitmap`, inside the scheduler) publishes a page here once
//! its bytes are valid (loaded, or made from a hole), changes its bytes
//! only while holding the write lock, and withdraws the page before its
//! slot is freed or reused. A reader holds the read lock while it looks
//! at the bytes, so it never sees a slot that is being reused, and never
//! races a bit being set. A page not published (on file and not loaded,
//! being loaded, or a hole) answers "not all set": the caller then takes
//! the slow path, which is right for every one of those cases.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustc_hash::FxHashMap;

/// The address of a published page's bytes (a page-pool slot, which never
/// moves while the page is published).
#[derive(Clone, Copy)]
struct PagePtr(*const u8);

// SAFETY: the pointer is only dereferenced under the view's read lock,
// while the owner keeps the slot alive and changes it only under the
// write lock (see the module comment).
unsafe impl Send for PagePtr {}
// SAFETY: as for Send: shared use is only reads under the read lock.
unsafe impl Sync for PagePtr {}

/// The published pages, by page number.
pub struct Published {
    pages: FxHashMap<u64, PagePtr>,
}

impl Published {
    /// `page`'s bytes are valid at `ptr` from now on (until `withdraw`).
    pub fn publish(&mut self, page: u64, ptr: *const u8) {
        self.pages.insert(page, PagePtr(ptr));
    }

    /// `page`'s slot is about to be freed or reused.
    pub fn withdraw(&mut self, page: u64) {
        self.pages.remove(&page);
    }

    pub fn clear(&mut self) {
        self.pages.clear();
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// The lock and the published pages, shared by the owner and its readers.
pub struct View {
    published: RwLock<Published>,
}

impl View {
    pub fn new() -> Arc<View> {
        Arc::new(View {
            published: RwLock::new(Published {
                pages: FxHashMap::default(),
            }),
        })
    }

    /// For the owner. A poisoned lock (a panicked reader) still guards a
    /// consistent table: readers change nothing.
    pub fn write(&self) -> RwLockWriteGuard<'_, Published> {
        self.published.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, Published> {
        self.published.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// A reader's handle: the geometry it needs and the shared view.
#[derive(Clone)]
pub struct BitmapReader {
    view: Arc<View>,
    chunks: u64,
    /// log2(sectors per chunk).
    chunk_shift: u32,
    /// log2(bytes per page).
    page_shift: u32,
}

impl BitmapReader {
    pub(crate) fn new(view: Arc<View>, chunks: u64, chunk_shift: u32, page_shift: u32) -> Self {
        BitmapReader {
            view,
            chunks,
            chunk_shift,
            page_shift,
        }
    }

    /// Whether every chunk of sectors `[sector, sector + count)` is known
    /// allocated (its bit set in a published page). `false` means "not
    /// known": a bit clear, a page not resident, or a range past the end.
    /// One read-lock acquisition.
    pub fn all_set(&self, sector: u64, count: u64) -> bool {
        if count == 0 {
            return false;
        }
        let Some(last_sector) = sector.checked_add(count - 1) else {
            return false;
        };
        let first = sector >> self.chunk_shift;
        let end = (last_sector >> self.chunk_shift) + 1;
        if end > self.chunks {
            return false;
        }
        let page_chunks = 8u64 << self.page_shift;
        let page_bytes = 1usize << self.page_shift;
        let published = self.view.read();
        let mut chunk = first;
        while chunk < end {
            let page = chunk / page_chunks;
            let base = page * page_chunks;
            let hi = end.min(base + page_chunks);
            let Some(ptr) = published.pages.get(&page) else {
                return false;
            };
            // SAFETY: a published page's slot holds `page_bytes` bytes and
            // stays allocated and unchanged while the read lock is held.
            let bytes = unsafe { std::slice::from_raw_parts(ptr.0, page_bytes) };
            if !all_ones(bytes, chunk - base, hi - base) {
                return false;
            }
            chunk = hi;
        }
        true
    }
}

/// Whether bits `[lo, hi)` of `bytes` (least significant bit first, the
/// bitmap's layout) are all set. Whole 64-bit words where it can.
pub fn all_ones(bytes: &[u8], lo: u64, hi: u64) -> bool {
    let mut bit = lo;
    while bit < hi {
        if bit % 64 == 0 && hi - bit >= 64 {
            let i = usize::try_from(bit / 8).expect("page offsets fit usize");
            let w = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
            if w != u64::MAX {
                return false;
            }
            bit += 64;
            continue;
        }
        let byte = bytes[usize::try_from(bit / 8).expect("page offsets fit usize")];
        let b_lo = bit % 8;
        let b_hi = (hi - bit / 8 * 8).min(8);
        let mask = (0xffu8 >> (8 - b_hi)) & (0xffu8 << b_lo);
        if byte & mask != mask {
            return false;
        }
        bit = bit / 8 * 8 + b_hi;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn all_ones_matches_a_bit_by_bit_check(
            bytes in proptest::collection::vec(prop_oneof![Just(0xffu8), any::<u8>()], 24),
            lo in 0u64..192,
            len in 0u64..192,
        ) {
            let hi = (lo + len).min(192);
            let naive = (lo..hi).all(|b| bytes[(b / 8) as usize] & (1 << (b % 8)) != 0);
            prop_assert_eq!(all_ones(&bytes, lo, hi), naive);
        }
    }
}
