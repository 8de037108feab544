//! The COW bitmap (one bit per chunk, least significant bit first,
//! exactly the on-disk byte layout), held in pages that are loaded on
//! first use, and the mapping of a sector range to runs of backing and
//! COW extents.
//!
//! A page is `page_bytes` of bitmap (4 KiB by default: 32768 chunks, 16 MiB
//! of disk at 512-byte chunks). A page is resident (in memory, in a slot
//! of a page pool that never moves), being loaded, or absent. An absent
//! page is either known zero (a hole of the COW file's bitmap area, never
//! written since) or on file, to be read before use. Whoever uses a page
//! pins it first (`pin`) and loads it if told to (`load_span`,
//! `load_ptr`, `load_done`): the I/O is the caller's. Unpinned resident
//! pages are dropped, oldest unused first (CLOCK), when more than the cap
//! are resident (`evict`), unless the bitmap is frozen (after a metadata
//! failure, docs/design.md rule 8). A page whose bits were ever set is on
//! file from then on: dropped, it is read again, never taken as zero.
//!
//! The tools load every page on file at open (`Disk::open`) and never
//! evict; the daemon's scheduler pins the pages of every request in
//! flight (docs/design.md, "The bitmap in pages").

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::bitmap_view::{BitmapReader, View};
use crate::fsutil::page_pool::PagePool;
use crate::fsutil::range_set::RangeSet;
use crate::units::to_usize;

#[cfg(target_endian = "big")]
compile_error!("the bitmap is scanned as little-endian 64-bit words");

/// Bytes of bitmap per page unless told otherwise.
pub const PAGE_BYTES: usize = 4096;

/// A run of consecutive 512-byte sectors that all live in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub sector: u64,
    pub count: u64,
    /// true: the sectors are in the COW file; false: in the backing file.
    pub in_cow: bool,
}

/// What a pinned page needs before it can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// Resident (or just made from a hole): usable now.
    Ready,
    /// To be read from the file (or already being read by an earlier pin).
    NeedsLoad,
}

#[derive(Debug, Clone)]
struct Page {
    /// None: a pinned page known to be zero, with no memory (reads of a
    /// hole allocate nothing); it gets a slot when a bit is set.
    slot: Option<u32>,
    pins: u32,
    loaded: bool,
    /// Used since the clock hand last passed (CLOCK's second chance).
    referenced: bool,
}

pub struct Bitmap {
    chunks: u64,
    /// log2(sectors per chunk).
    chunk_shift: u32,
    /// log2(page_bytes).
    page_shift: u32,
    /// Bytes of bits the file's bitmap area holds; bytes past it read as
    /// zero (old v1/v2 files whose bitmap formula under-counts).
    stored_bytes: u64,
    pool: PagePool,
    pages: FxHashMap<u64, Page>,
    /// Pages whose bytes in the file may be non-zero.
    on_file: RangeSet,
    /// Resident pages beyond this are dropped when unpinned.
    cap_pages: usize,
    /// Pages with a slot, in the order the clock hand visits them.
    clock: VecDeque<u64>,
    /// Pages with a slot (what the cap counts).
    resident: usize,
    /// Nothing is dropped any more (a bitmap write failed).
    frozen: bool,
    loads: u64,
    evictions: u64,
    /// The resident pages as readers off the owner's lock see them
    /// (`bitmap_view.rs`); made by the first `reader`.
    view: Option<Arc<View>>,
}

/// A copy has its own pages and no readers (the scheduler's exhaustive
/// tests clone it at every step).
impl Clone for Bitmap {
    fn clone(&self) -> Bitmap {
        Bitmap {
            chunks: self.chunks,
            chunk_shift: self.chunk_shift,
            page_shift: self.page_shift,
            stored_bytes: self.stored_bytes,
            pool: self.pool.clone(),
            pages: self.pages.clone(),
            on_file: self.on_file.clone(),
            cap_pages: self.cap_pages,
            clock: self.clock.clone(),
            resident: self.resident,
            frozen: self.frozen,
            loads: self.loads,
            evictions: self.evictions,
            view: None,
        }
    }
}

/// Readers that outlive the bitmap find no page (and take the slow path)
/// rather than freed memory.
impl Drop for Bitmap {
    fn drop(&mut self) {
        if let Some(v) = &self.view {
            v.write().clear();
        }
    }
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap")
            .field("chunks", &self.chunks)
            .field("sectors_per_chunk", &self.sectors_per_chunk())
            .field("resident_pages", &self.resident)
            .finish()
    }
}

/// The set bits of bitmap bytes whose first bit is chunk `first`, counting
/// only chunks below `chunks` (a last byte's tail is not a chunk).
pub fn count_chunk_bits(bytes: &[u8], first: u64, chunks: u64) -> u64 {
    let whole = to_usize((chunks.saturating_sub(first) / 8).min(bytes.len() as u64));
    let mut ones: u64 = bytes[..whole]
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum();
    let tail = chunks.saturating_sub(first + whole as u64 * 8);
    if tail > 0 && tail < 8 && whole < bytes.len() {
        ones += u64::from((bytes[whole] & ((1u8 << tail) - 1)).count_ones());
    }
    ones
}

/// Sets or clears bits `[lo, hi)` of `bytes`; only the bytes holding those
/// bits are written (partial bytes by OR / AND), so a bitmap write in
/// flight over neighbouring bytes never sees its memory touched.
fn update_bits(bytes: &mut [u8], lo: u64, hi: u64, value: bool) {
    let mut bit = lo;
    while bit < hi {
        let byte = to_usize(bit / 8);
        let b_lo = bit % 8;
        let b_hi = (hi - byte as u64 * 8).min(8);
        if b_lo == 0 && b_hi == 8 {
            // Whole bytes: fill as many as the range covers at once.
            let whole = to_usize((hi - bit) / 8);
            bytes[byte..byte + whole].fill(if value { 0xff } else { 0 });
            bit += whole as u64 * 8;
            continue;
        }
        let mask = (0xffu8 >> (8 - b_hi)) & (0xffu8 << b_lo);
        if value {
            bytes[byte] |= mask;
        } else {
            bytes[byte] &= !mask;
        }
        bit = byte as u64 * 8 + b_hi;
    }
}

impl Bitmap {
    /// An all-zero bitmap of `chunks` bits, each covering `chunk_size`
    /// bytes (a power of two, at least 512), in 4 KiB pages, no cap.
    pub fn new(chunks: u64, chunk_size: u64) -> Bitmap {
        assert!(chunk_size.is_power_of_two() && chunk_size >= 512);
        Bitmap {
            chunks,
            chunk_shift: (chunk_size / 512).trailing_zeros(),
            page_shift: PAGE_BYTES.trailing_zeros(),
            stored_bytes: chunks.div_ceil(8),
            pool: PagePool::new(PAGE_BYTES),
            pages: FxHashMap::default(),
            on_file: RangeSet::new(),
            cap_pages: usize::MAX,
            clock: VecDeque::new(),
            resident: 0,
            frozen: false,
            loads: 0,
            evictions: 0,
            view: None,
        }
    }

    /// A handle for threads that ask whether ranges are allocated without
    /// the owner's lock. From now on every page change is published to it.
    pub fn reader(&mut self) -> BitmapReader {
        let view = match &self.view {
            Some(v) => v.clone(),
            None => {
                let v = View::new();
                let mut published = v.write();
                for (&page, p) in &self.pages {
                    if let (true, Some(slot)) = (p.loaded, p.slot) {
                        published.publish(page, self.pool.ptr(slot));
                    }
                }
                drop(published);
                self.view = Some(v.clone());
                v
            }
        };
        BitmapReader::new(view, self.chunks, self.chunk_shift, self.page_shift)
    }

    /// Pages readers off the lock can see (for tests and counters).
    pub fn published_pages(&self) -> usize {
        self.view.as_ref().map_or(0, |v| v.write().len())
    }

    /// Pages of `bytes` (a power of two, at least 8: words never straddle
    /// pages). Only before any page is resident.
    pub fn with_page_bytes(mut self, bytes: usize) -> Bitmap {
        assert!(bytes.is_power_of_two() && bytes >= 8 && self.pages.is_empty());
        self.page_shift = bytes.trailing_zeros();
        self.pool = PagePool::new(bytes);
        self
    }

    /// Only the first `bytes` bytes are stored in the file.
    pub fn with_stored_bytes(mut self, bytes: u64) -> Bitmap {
        self.stored_bytes = bytes.min(self.byte_len() as u64);
        self
    }

    /// The pages that may hold set bits in the file (the others are holes).
    pub fn with_on_file(mut self, pages: RangeSet) -> Bitmap {
        self.on_file = pages;
        self
    }

    /// Keep at most `bytes` of unpinned pages resident (at least one page).
    pub fn with_cap_bytes(mut self, bytes: u64) -> Bitmap {
        let pages = (bytes >> self.page_shift).max(1);
        self.cap_pages = usize::try_from(pages).unwrap_or(usize::MAX);
        self
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    pub fn sectors_per_chunk(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// The chunk holding `sector`.
    pub fn chunk_of(&self, sector: u64) -> u64 {
        sector >> self.chunk_shift
    }

    /// Bytes that hold bits (the on-disk v3 bitmap length).
    pub fn byte_len(&self) -> usize {
        to_usize(self.chunks.div_ceil(8))
    }

    /// The bitmap's bytes rounded up to whole pages.
    pub fn alloc_len(&self) -> usize {
        self.byte_len().max(1).next_multiple_of(self.page_bytes())
    }

    pub fn page_bytes(&self) -> usize {
        1 << self.page_shift
    }

    /// Chunks per page.
    fn page_chunks(&self) -> u64 {
        8 << self.page_shift
    }

    /// The page holding bitmap byte `byte`.
    pub fn page_of_byte(&self, byte: u64) -> u64 {
        byte >> self.page_shift
    }

    /// The pages holding the bits of chunks `[first, first + count)`.
    pub fn pages_of_chunks(&self, first: u64, count: u64) -> std::ops::Range<u64> {
        if count == 0 {
            return 0..0;
        }
        first / self.page_chunks()..(first + count - 1) / self.page_chunks() + 1
    }

    /// The pages a request over sectors `[sector, sector + count)` uses.
    pub fn pages_of_sectors(&self, sector: u64, count: u64) -> std::ops::Range<u64> {
        let (first, n) = self.chunk_range(sector, count);
        self.pages_of_chunks(first, n.min(self.chunks.saturating_sub(first)))
    }

    /// Pages in memory (loaded or being loaded).
    pub fn resident_pages(&self) -> usize {
        self.resident
    }

    /// Bytes held for pages (the pool, in use or free).
    pub fn memory_bytes(&self) -> usize {
        self.pool.allocated_bytes()
    }

    /// Pages read from the file so far.
    pub fn pages_loaded(&self) -> u64 {
        self.loads
    }

    /// Pages dropped under the cap so far.
    pub fn pages_evicted(&self) -> u64 {
        self.evictions
    }

    /// Whether `page` is resident and loaded.
    pub fn is_loaded(&self, page: u64) -> bool {
        self.pages.get(&page).is_some_and(|p| p.loaded)
    }

    /// The pages on file, as ranges of page numbers.
    pub fn pages_on_file(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.on_file.iter()
    }

    /// A memory slot for `page` (a zeroed one).
    fn new_slot(&mut self, page: u64, clock: bool) -> u32 {
        self.resident += 1;
        if clock {
            self.clock.push_back(page);
        }
        self.pool.alloc()
    }

    fn free_slot(&mut self, page: u64, slot: Option<u32>) {
        if let Some(s) = slot {
            if let Some(v) = &self.view {
                v.write().withdraw(page);
            }
            self.resident -= 1;
            self.pool.free(s);
        }
    }

    /// Pins `page` in memory until `unpin`: a hole is usable at once (as
    /// zeros, with no memory until a bit is set); a page on file is read by
    /// the caller when told `NeedsLoad`.
    pub fn pin(&mut self, page: u64) -> Pinned {
        if let Some(p) = self.pages.get_mut(&page) {
            p.pins += 1;
            p.referenced = true;
            return if p.loaded {
                Pinned::Ready
            } else {
                Pinned::NeedsLoad
            };
        }
        let on_file = self.on_file.contains(page);
        let slot = on_file.then(|| self.new_slot(page, false));
        self.pages.insert(
            page,
            Page {
                slot,
                pins: 1,
                loaded: !on_file,
                referenced: true,
            },
        );
        if on_file {
            Pinned::NeedsLoad
        } else {
            Pinned::Ready
        }
    }

    pub fn unpin(&mut self, page: u64) {
        let p = self
            .pages
            .get_mut(&page)
            .expect("unpin of a page not resident");
        p.pins -= 1;
        // A zero page without memory, or one whose load failed and that
        // nobody waits for any more, is forgotten.
        if p.pins == 0 && (!p.loaded || p.slot.is_none()) {
            let slot = p.slot;
            self.pages.remove(&page);
            self.free_slot(page, slot);
        }
    }

    /// Where a load of `page` reads from: the bitmap byte it starts at and
    /// how many bytes of it the file holds (0 past the stored bytes).
    pub fn load_span(&self, page: u64) -> (u64, u64) {
        let start = page << self.page_shift;
        let len = (self.page_bytes() as u64).min(self.stored_bytes.saturating_sub(start));
        (start, len)
    }

    /// Where a load of pinned, unloaded `page` puts its bytes; the memory
    /// stays put and untouched until `load_done` or `load_failed`.
    pub fn load_ptr(&self, page: u64) -> *mut u8 {
        let p = &self.pages[&page];
        assert!(!p.loaded, "load of a loaded page");
        self.pool.ptr(p.slot.expect("a page on file has a slot"))
    }

    /// The slot of an unloaded page, for loading it synchronously.
    pub fn load_buf(&mut self, page: u64) -> &mut [u8] {
        let p = &self.pages[&page];
        assert!(!p.loaded, "load of a loaded page");
        let slot = p.slot.expect("a page on file has a slot");
        self.pool.slice_mut(slot)
    }

    /// The read of `page` completed: what lies past the stored bytes or the
    /// last chunk is not ours to trust, and is cleared.
    pub fn load_done(&mut self, page: u64) {
        let (start, len) = self.load_span(page);
        let chunks = self.chunks;
        let p = self
            .pages
            .get_mut(&page)
            .expect("load of a page not pinned");
        assert!(!p.loaded, "page loaded twice");
        p.loaded = true;
        let slot = p.slot.expect("a page on file has a slot");
        let bytes = self.pool.slice_mut(slot);
        bytes[to_usize(len)..].fill(0);
        // Bits past the last chunk, in the bitmap's last byte.
        let last = chunks.div_ceil(8);
        if chunks % 8 != 0 && (start..start + len).contains(&(last - 1)) {
            bytes[to_usize(last - 1 - start)] &= (1u8 << (chunks % 8)) - 1;
        }
        // Valid now: readers may see it.
        if let Some(v) = &self.view {
            v.write().publish(page, self.pool.ptr(slot));
        }
        self.loads += 1;
        self.clock.push_back(page);
    }

    /// The read of `page` failed: it stays unloaded (a later pin reads it
    /// again).
    pub fn load_failed(&mut self, page: u64) {
        let slot = self.pages[&page].slot.expect("a page on file has a slot");
        self.pool.slice_mut(slot).fill(0);
    }

    /// No page is dropped from now on (rule 8).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Drops unpinned resident pages, least recently used first (CLOCK),
    /// while more than the cap are resident.
    pub fn evict(&mut self) {
        if self.frozen || self.resident <= self.cap_pages {
            return;
        }
        let mut budget = 2 * self.clock.len();
        while self.resident > self.cap_pages && budget > 0 {
            budget -= 1;
            let Some(page) = self.clock.pop_front() else {
                break;
            };
            let p = self
                .pages
                .get_mut(&page)
                .expect("clock names a dropped page");
            if p.pins > 0 || p.referenced {
                p.referenced = false;
                self.clock.push_back(page);
                continue;
            }
            let slot = p.slot;
            self.pages.remove(&page);
            self.free_slot(page, slot);
            self.evictions += 1;
        }
    }

    /// The bytes of `page`, or None for a page known to be zero.
    fn page(&self, page: u64) -> Option<&[u8]> {
        match self.pages.get(&page) {
            Some(p) if p.loaded => p.slot.map(|s| self.pool.slice(s)),
            Some(_) => panic!("bitmap page {page} used while it is being loaded"),
            None if self.on_file.contains(page) => {
                panic!("bitmap page {page} used before it was loaded")
            }
            None => None,
        }
    }

    /// The bytes of `page` for changing them: a page known to be zero is
    /// made resident; from now on it is on file.
    fn page_mut(&mut self, page: u64) -> &mut [u8] {
        let slot = match self.pages.get(&page) {
            Some(p) => {
                assert!(
                    p.loaded,
                    "bitmap page {page} changed while it is being loaded"
                );
                p.slot
            }
            None => {
                assert!(
                    !self.on_file.contains(page),
                    "bitmap page {page} changed before it was loaded"
                );
                None
            }
        };
        let slot = match slot {
            Some(s) => s,
            None => {
                let s = self.new_slot(page, true);
                let p = self.pages.entry(page).or_insert(Page {
                    slot: None,
                    pins: 0,
                    loaded: true,
                    referenced: true,
                });
                p.slot = Some(s);
                s
            }
        };
        if !self.on_file.contains(page) {
            self.on_file.insert(page..page + 1);
        }
        self.pool.slice_mut(slot)
    }

    /// A copy of bitmap bytes `range` (pages in it must be loaded or zero).
    pub fn bytes(&self, range: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = Vec::with_capacity(to_usize(range.end - range.start));
        for (ptr_or_zero, len) in self.spans(range.start, range.end - range.start) {
            match ptr_or_zero {
                Some(s) => out.extend_from_slice(&s[..len]),
                None => out.resize(out.len() + len, 0),
            }
        }
        out
    }

    /// Bitmap bytes `[start, start + len)` as one piece per page (None for
    /// a page known to be zero).
    fn spans(&self, start: u64, len: u64) -> impl Iterator<Item = (Option<&[u8]>, usize)> + '_ {
        let end = start + len;
        let pb = self.page_bytes() as u64;
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos >> self.page_shift;
            let off = pos - (page << self.page_shift);
            let n = (pb - off).min(end - pos);
            pos += n;
            let bytes = self.page(page).map(|b| &b[to_usize(off)..]);
            Some((bytes, to_usize(n)))
        })
    }

    /// Memory of bitmap bytes `[start, start + len)`, one piece per page,
    /// for a write issued straight from it. The pages must be pinned and
    /// loaded; the caller keeps those bytes unchanged until it completes.
    pub fn write_segments(
        &self,
        start: u64,
        len: u64,
    ) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        self.spans(start, len).map(|(bytes, n)| {
            let b = bytes.expect("bitmap write from a page not resident");
            (b.as_ptr() as *mut u8, n)
        })
    }

    fn word(bytes: &[u8], i: u64) -> u64 {
        let start = to_usize(i * 8);
        u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap())
    }

    /// The bit of `chunk`, or None while its page is on file and not
    /// loaded.
    pub fn try_get(&self, chunk: u64) -> Option<bool> {
        let byte = chunk / 8;
        let page = byte >> self.page_shift;
        let off = to_usize(byte & (self.page_bytes() as u64 - 1));
        match self.pages.get(&page) {
            Some(p) if p.loaded => Some(
                p.slot
                    .is_some_and(|s| self.pool.slice(s)[off] & (1 << (chunk % 8)) != 0),
            ),
            Some(_) => None,
            None if self.on_file.contains(page) => None,
            None => Some(false),
        }
    }

    /// Whether bitmap bytes from `start` on are `expected` (without a copy).
    pub fn bytes_equal(&self, start: u64, expected: &[u8]) -> bool {
        let mut rest = expected;
        self.spans(start, expected.len() as u64).all(|(bytes, n)| {
            let (want, tail) = rest.split_at(n);
            rest = tail;
            match bytes {
                Some(b) => &b[..n] == want,
                None => want.iter().all(|&x| x == 0),
            }
        })
    }

    pub fn get(&self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        let byte = chunk / 8;
        let off = to_usize(byte & (self.page_bytes() as u64 - 1));
        self.page(byte >> self.page_shift)
            .is_some_and(|b| b[off] & (1 << (chunk % 8)) != 0)
    }

    /// Sets bits `[first, first + count)`. Only the bytes holding those bits
    /// are written (partial bytes by OR), so a bitmap write in flight over
    /// neighbouring bytes never sees its memory touched.
    pub fn set_range(&mut self, first: u64, count: u64) {
        self.update_range(first, count, true)
    }

    /// Clears bits `[first, first + count)` (used when a data write
    /// must be forgotten, e.g. in tests and merges).
    pub fn clear_range(&mut self, first: u64, count: u64) {
        self.update_range(first, count, false)
    }

    fn update_range(&mut self, first: u64, count: u64, value: bool) {
        assert!(first + count <= self.chunks, "bit range beyond bitmap");
        let end = first + count;
        let pc = self.page_chunks();
        // Readers off the lock never see bytes change under them.
        let view = self.view.clone();
        let mut published = view.as_deref().map(View::write);
        let mut bit = first;
        while bit < end {
            let page = bit / pc;
            let base = page * pc;
            let hi = end.min(base + pc);
            if value || self.pages.contains_key(&page) || self.on_file.contains(page) {
                let bytes = self.page_mut(page);
                if let Some(p) = published.as_mut() {
                    // A page made from a hole becomes visible here.
                    p.publish(page, bytes.as_ptr());
                }
                update_bits(bytes, bit - base, hi - base, value);
            }
            bit = hi;
        }
    }

    /// The first chunk at or after `from` (and before `limit`) whose bit
    /// differs from `value`, or `limit`. Scans 64 bits at a time and skips
    /// pages known to be zero.
    pub fn next_change(&self, from: u64, limit: u64, value: bool) -> u64 {
        let limit = limit.min(self.chunks);
        let pc = self.page_chunks();
        let flip = if value { u64::MAX } else { 0 };
        let mut pos = from;
        while pos < limit {
            let page = pos / pc;
            let base = page * pc;
            let page_end = limit.min(base + pc);
            let Some(bytes) = self.page(page) else {
                if value {
                    return pos; // a zero page: the first bit differs
                }
                pos = page_end;
                continue;
            };
            let mut w = (pos - base) / 64;
            // Bits below `pos` in the first word are masked away.
            let mut bits = (Self::word(bytes, w) ^ flip) & (u64::MAX << ((pos - base) % 64));
            let last_word = (page_end - 1 - base) / 64;
            loop {
                if bits != 0 {
                    return (base + w * 64 + u64::from(bits.trailing_zeros())).min(limit);
                }
                if w == last_word {
                    break;
                }
                w += 1;
                bits = Self::word(bytes, w) ^ flip;
            }
            pos = page_end;
        }
        limit
    }

    /// What counting every set bit needs without reading under the
    /// caller's lock: the set bits of the loaded pages, and the byte ranges
    /// of the bitmap area holding the other pages on file, to be counted
    /// from the file (a page is dropped only while clean, so there the
    /// file holds what memory would).
    pub fn count_split(&self) -> (u64, Vec<std::ops::Range<u64>>) {
        let mut ones = 0;
        let mut loaded = Vec::new();
        for (&page, p) in &self.pages {
            if !p.loaded {
                continue;
            }
            loaded.push(page);
            if let Some(slot) = p.slot {
                ones += count_chunk_bits(
                    self.pool.slice(slot),
                    page * self.page_chunks(),
                    self.chunks,
                );
            }
        }
        loaded.sort_unstable();
        let pb = self.page_bytes() as u64;
        let mut rest = Vec::new();
        let mut push = |a: u64, b: u64| {
            let (start, end) = (a * pb, (b * pb).min(self.stored_bytes));
            if start < end {
                rest.push(start..end);
            }
        };
        for r in self.on_file.iter() {
            let mut start = r.start;
            let from = loaded.partition_point(|&p| p < r.start);
            for &p in loaded[from..].iter().take_while(|&&p| p < r.end) {
                push(start, p);
                start = p + 1;
            }
            push(start, r.end);
        }
        (ones, rest)
    }

    /// Number of set bits (allocated chunks) in the resident pages: all of
    /// them when every page on file is loaded (as the tools do).
    pub fn count_ones(&self) -> u64 {
        self.pages
            .values()
            .filter(|p| p.loaded)
            .filter_map(|p| p.slot)
            .map(|slot| {
                self.pool
                    .slice(slot)
                    .chunks(8)
                    .map(|w| u64::from(u64::from_le_bytes(w.try_into().unwrap()).count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Splits sectors `[sector, sector + count)` into maximal runs of COW
    /// and backing sectors. The caller checks the range against the disk.
    pub fn map(&self, sector: u64, count: u64) -> ExtentIter<'_> {
        ExtentIter {
            bitmap: self,
            sector,
            end: sector + count,
        }
    }

    /// Whether every sector of the range is in the COW file.
    pub fn all_cow(&self, sector: u64, count: u64) -> bool {
        let first = self.chunk_of(sector);
        let end = self.chunk_of(sector + count - 1) + 1;
        self.next_change(first, end, true) == end
    }

    /// The chunk range covering sectors `[sector, sector + count)`.
    pub fn chunk_range(&self, sector: u64, count: u64) -> (u64, u64) {
        let first = self.chunk_of(sector);
        let end = (sector + count + self.sectors_per_chunk() - 1) >> self.chunk_shift;
        (first, end - first)
    }
}

pub struct ExtentIter<'a> {
    bitmap: &'a Bitmap,
    sector: u64,
    end: u64,
}

impl Iterator for ExtentIter<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.sector >= self.end {
            return None;
        }
        let b = self.bitmap;
        let chunk = b.chunk_of(self.sector);
        // Sectors past the last chunk (never for a valid request) read as backing.
        let in_cow = chunk < b.chunks && b.get(chunk);
        let end_chunk = (self.end - 1) / b.sectors_per_chunk() + 1;
        let change = b.next_change(chunk, end_chunk, in_cow);
        let run_end = (change << b.chunk_shift).min(self.end).max(self.sector + 1);
        let e = Extent {
            sector: self.sector,
            count: run_end - self.sector,
            in_cow,
        };
        self.sector = run_end;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(bits: &[bool], spc: u64, sector: u64, count: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for s in sector..sector + count {
            let in_cow = bits[to_usize(s / spc)];
            match out.last_mut() {
                Some(e) if e.in_cow == in_cow => e.count += 1,
                _ => out.push(Extent {
                    sector: s,
                    count: 1,
                    in_cow,
                }),
            }
        }
        out
    }

    #[test]
    fn set_and_scan() {
        let mut b = Bitmap::new(1000, 512);
        b.set_range(3, 130);
        assert!(!b.get(2) && b.get(3) && b.get(132) && !b.get(133));
        assert_eq!(b.count_ones(), 130);
        assert_eq!(b.next_change(0, 1000, false), 3);
        assert_eq!(b.next_change(3, 1000, true), 133);
        assert_eq!(b.next_change(133, 1000, false), 1000);
        b.clear_range(10, 5);
        assert_eq!(b.count_ones(), 125);
        let (ptr, _) = b.write_segments(0, 8).next().unwrap();
        assert_eq!(ptr as usize % PAGE_BYTES, 0);
    }

    /// 8-byte pages: 64 chunks each.
    fn small_pages(chunks: u64) -> Bitmap {
        Bitmap::new(chunks, 512).with_page_bytes(8)
    }

    #[test]
    fn reader_sees_pages_only_while_they_are_valid_and_resident() {
        // Pages 0..2 on file, 64 chunks (sectors) each; cap of one page.
        let mut on_file = RangeSet::new();
        on_file.insert(0..2);
        let mut b = small_pages(64 * 4).with_on_file(on_file).with_cap_bytes(8);
        let r = b.reader();
        assert!(!r.all_set(0, 8), "a page on file, not loaded");
        assert_eq!(b.pin(0), Pinned::NeedsLoad);
        b.load_buf(0).fill(0xff);
        assert!(!r.all_set(0, 8), "a page being loaded");
        b.load_done(0);
        assert!(r.all_set(0, 64));
        assert!(!r.all_set(0, 65), "page 1 not loaded");
        assert!(!r.all_set(63, 2));
        // A hole made resident by a write is seen with its bits.
        b.set_range(128 + 3, 5);
        assert!(r.all_set(131, 5));
        assert!(!r.all_set(130, 5) && !r.all_set(131, 6));
        // Unpinned and over the cap: dropped, withdrawn from readers first.
        b.unpin(0);
        b.evict();
        assert_eq!(b.resident_pages(), 1);
        assert_eq!(r.all_set(0, 1), b.is_loaded(0));
        assert_eq!(r.all_set(131, 5), b.is_loaded(2));
        assert_eq!(b.published_pages(), b.resident_pages());
        // A copy has its own pages: the reader never sees its changes.
        let mut copy = b.clone();
        copy.set_range(192, 64);
        assert!(!r.all_set(192, 1));
        drop(copy);
        assert_eq!(
            r.all_set(131, 5),
            b.is_loaded(2),
            "a dropped copy withdrew nothing"
        );
        // Past the end, empty: not known.
        assert!(!r.all_set(255, 2) && !r.all_set(0, 0) && !r.all_set(u64::MAX, 2));
        drop(b);
        assert!(
            !r.all_set(131, 1),
            "a reader outliving its bitmap sees nothing"
        );
    }

    #[test]
    fn count_chunk_bits_stops_at_the_last_chunk() {
        assert_eq!(count_chunk_bits(&[0xff, 0xff], 0, 16), 16);
        assert_eq!(count_chunk_bits(&[0xff, 0xff], 0, 11), 11);
        assert_eq!(count_chunk_bits(&[0xff, 0xff], 8, 11), 3);
        assert_eq!(count_chunk_bits(&[0xff, 0xff], 16, 11), 0);
        assert_eq!(count_chunk_bits(&[0x81], 0, 1000), 2);
    }

    #[test]
    fn count_split_leaves_the_pages_not_loaded_to_the_file() {
        // Pages 1..4 on file (8 bytes each); page 2 loaded with 3 bits set,
        // page 5 a hole with 2 bits set since.
        let mut on_file = RangeSet::new();
        on_file.insert(1..4);
        let mut b = small_pages(64 * 6 - 3).with_on_file(on_file);
        assert_eq!(b.pin(2), Pinned::NeedsLoad);
        b.load_buf(2)[0] = 0b111;
        b.load_done(2);
        b.set_range(5 * 64, 2);
        let (ones, rest) = b.count_split();
        assert_eq!(ones, 5);
        assert_eq!(rest, vec![8..16, 24..32]);
    }

    #[test]
    fn ranges_and_scans_cross_page_boundaries() {
        let mut b = small_pages(1000);
        b.set_range(60, 10);
        assert_eq!(b.resident_pages(), 2);
        assert_eq!(b.next_change(0, 1000, false), 60);
        assert_eq!(b.next_change(60, 1000, true), 70);
        // Pages 2.. are holes: skipped without being made resident.
        assert_eq!(b.next_change(70, 1000, false), 1000);
        assert_eq!(b.resident_pages(), 2);
        let segs: Vec<_> = b.write_segments(4, 8).map(|(_, n)| n).collect();
        assert_eq!(segs, vec![4, 4]);
        assert_eq!(b.bytes(7..9), vec![0xf0, 0x3f]);
    }

    #[test]
    fn pages_on_file_must_be_loaded_and_are_masked() {
        let mut on_file = RangeSet::new();
        on_file.insert(1..2);
        let mut b = small_pages(100).with_on_file(on_file.clone());
        assert_eq!(b.pin(0), Pinned::Ready);
        assert_eq!(b.pin(1), Pinned::NeedsLoad);
        assert_eq!(b.pin(1), Pinned::NeedsLoad, "still loading");
        assert_eq!(b.load_span(1), (8, 5));
        b.load_buf(1).fill(0xff);
        b.load_done(1);
        // Chunk 99 is the last: bits 64..100, nothing of the padding.
        assert_eq!(b.count_ones(), 36);
        assert!(b.get(99) && !b.get(63));
        for p in [0, 1, 1] {
            b.unpin(p);
        }
        // A file whose bitmap area holds 12 bytes: byte 12 reads as zero.
        let mut b = small_pages(100).with_on_file(on_file).with_stored_bytes(12);
        b.pin(1);
        assert_eq!(b.load_span(1), (8, 4));
        b.load_buf(1).fill(0xff);
        b.load_done(1);
        assert_eq!(b.count_ones(), 32);
    }

    #[test]
    fn eviction_keeps_pinned_pages_and_written_pages_stay_on_file() {
        let mut b = small_pages(64 * 10).with_cap_bytes(16);
        // Pinning a hole costs no memory; setting a bit makes it resident.
        assert_eq!(b.pin(9), Pinned::Ready);
        assert_eq!(b.resident_pages(), 0);
        assert!(!b.get(64 * 9));
        b.unpin(9);
        for p in 0..4 {
            assert_eq!(b.pin(p), Pinned::Ready);
            b.set_range(64 * p, 1);
        }
        assert_eq!(b.resident_pages(), 4);
        b.unpin(0);
        b.unpin(1);
        b.evict();
        assert_eq!(b.resident_pages(), 2, "pinned pages stay");
        assert!(b.is_loaded(2) && b.is_loaded(3));
        b.unpin(2);
        b.unpin(3);
        b.evict();
        assert_eq!(b.resident_pages(), 2);
        b.freeze();
        for p in 4..8 {
            b.pin(p);
            b.set_range(64 * p, 1);
            b.unpin(p);
        }
        b.evict();
        assert_eq!(b.resident_pages(), 6, "a frozen bitmap drops nothing");
        let mut b = small_pages(64 * 10).with_cap_bytes(8);
        b.pin(3);
        b.set_range(64 * 3, 1);
        b.unpin(3);
        for p in [5, 6] {
            b.pin(p);
            b.set_range(64 * p, 1);
            b.unpin(p);
        }
        b.evict();
        assert!(!b.is_loaded(3));
        assert_eq!(b.pin(3), Pinned::NeedsLoad, "a written page is read again");
    }

    proptest! {
        #[test]
        fn map_matches_naive_model(
            spc_shift in 0u32..4,
            bits in proptest::collection::vec(any::<bool>(), 1..300),
            start in 0u64..4000,
            len in 1u64..4000,
        ) {
            let spc = 1u64 << spc_shift;
            let chunks = bits.len() as u64;
            let sectors = chunks * spc;
            let sector = start % sectors;
            let count = len.min(sectors - sector);
            let mut b = Bitmap::new(chunks, 512 * spc).with_page_bytes(8);
            for (i, &v) in bits.iter().enumerate() {
                if v { b.set_range(i as u64, 1); }
            }
            let got: Vec<_> = b.map(sector, count).collect();
            prop_assert_eq!(got, naive(&bits, spc, sector, count));
            prop_assert_eq!(b.count_ones(), bits.iter().filter(|&&v| v).count() as u64);
        }

        #[test]
        fn set_range_touches_only_its_bits(
            chunks in 1u64..600,
            a in 0u64..600,
            n in 0u64..600,
        ) {
            let first = a % chunks;
            let count = n.min(chunks - first);
            let mut b = Bitmap::new(chunks, 512);
            b.set_range(first, count);
            for c in 0..chunks {
                prop_assert_eq!(b.get(c), c >= first && c < first + count);
            }
        }
    }
}
