//! The in-memory COW bitmap (one bit per chunk, least significant bit first,
//! exactly the on-disk byte layout) and the mapping of a sector range to
//! runs of backing and COW extents.
//!
//! The storage is page-aligned and padded to whole pages so that bitmap
//! writes can be issued straight from it, even with O_DIRECT.

use crate::fsutil::aligned::{AlignedBuf, PAGE};
use crate::units::to_usize;

#[cfg(target_endian = "big")]
compile_error!("the bitmap is scanned as little-endian 64-bit words");

pub const BITMAP_ALIGN: usize = PAGE;

/// A run of consecutive 512-byte sectors that all live in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub sector: u64,
    pub count: u64,
    /// true: the sectors are in the COW file; false: in the backing file.
    pub in_cow: bool,
}

#[derive(Clone)]
pub struct Bitmap {
    /// The bits, zero-padded to whole pages.
    buf: AlignedBuf,
    chunks: u64,
    /// log2(sectors per chunk).
    chunk_shift: u32,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap")
            .field("chunks", &self.chunks)
            .field("sectors_per_chunk", &self.sectors_per_chunk())
            .finish()
    }
}

impl Bitmap {
    /// An all-zero bitmap of `chunks` bits, each covering `chunk_size`
    /// bytes (a power of two, at least 512).
    pub fn new(chunks: u64, chunk_size: u64) -> Bitmap {
        Self::try_new(chunks, chunk_size).expect("bitmap fits in memory")
    }

    /// As `new`, or None when the bitmap cannot be held in memory.
    pub fn try_new(chunks: u64, chunk_size: u64) -> Option<Bitmap> {
        assert!(chunk_size.is_power_of_two() && chunk_size >= 512);
        let bytes = usize::try_from(chunks.div_ceil(8)).ok()?;
        Some(Bitmap {
            buf: AlignedBuf::try_zeroed(bytes)?,
            chunks,
            chunk_shift: (chunk_size / 512).trailing_zeros(),
        })
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

    /// The whole allocation (bit bytes plus zero padding to a page).
    pub fn alloc_len(&self) -> usize {
        self.buf.len()
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    /// Pointer to bitmap byte `offset`, for a write issued straight from
    /// memory. The caller keeps those bytes unchanged until it completes.
    pub fn byte_ptr(&self, offset: usize) -> *const u8 {
        assert!(offset <= self.buf.len());
        // SAFETY: in bounds (checked above).
        unsafe { self.buf.as_ptr().add(offset) }
    }

    fn word(&self, i: u64) -> u64 {
        let b = self.as_bytes();
        let start = to_usize(i * 8);
        u64::from_le_bytes(b[start..start + 8].try_into().unwrap())
    }

    pub fn get(&self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        self.as_bytes()[(chunk / 8) as usize] & (1 << (chunk % 8)) != 0
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
        let bytes = self.as_bytes_mut();
        let mut bit = first;
        while bit < end {
            let byte = (bit / 8) as usize;
            let lo = bit % 8;
            let hi = (end - byte as u64 * 8).min(8);
            if lo == 0 && hi == 8 {
                // Whole bytes: fill as many as the range covers at once.
                let whole = ((end - bit) / 8) as usize;
                bytes[byte..byte + whole].fill(if value { 0xff } else { 0 });
                bit += whole as u64 * 8;
                continue;
            }
            // Bits lo..hi of the byte (0 <= lo < hi <= 8).
            let mask = (0xffu8 >> (8 - hi)) & (0xffu8 << lo);
            if value {
                bytes[byte] |= mask;
            } else {
                bytes[byte] &= !mask;
            }
            bit = byte as u64 * 8 + hi;
        }
    }

    /// The first chunk at or after `from` (and before `limit`) whose bit
    /// differs from `value`, or `limit`. Scans 64 bits at a time.
    pub fn next_change(&self, from: u64, limit: u64, value: bool) -> u64 {
        let limit = limit.min(self.chunks);
        if from >= limit {
            return limit;
        }
        let flip = if value { u64::MAX } else { 0 };
        let mut w = from / 64;
        // Bits below `from` in the first word are masked away.
        let mut bits = (self.word(w) ^ flip) & (u64::MAX << (from % 64));
        let last_word = (limit - 1) / 64;
        loop {
            if bits != 0 {
                return (w * 64 + u64::from(bits.trailing_zeros())).min(limit);
            }
            if w == last_word {
                return limit;
            }
            w += 1;
            bits = self.word(w) ^ flip;
        }
    }

    /// Number of set bits (allocated chunks).
    pub fn count_ones(&self) -> u64 {
        let bytes = self.as_bytes();
        let full = self.chunks / 8;
        let mut n: u64 = bytes[..full as usize]
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from(u64::from_le_bytes(w).count_ones())
            })
            .sum();
        let rem = self.chunks % 8;
        if rem != 0 {
            n += u64::from((bytes[full as usize] & ((1u8 << rem) - 1)).count_ones());
        }
        n
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
        assert_eq!(b.as_bytes().as_ptr() as usize % BITMAP_ALIGN, 0);
    }

    #[test]
    fn map_uniform_is_one_extent() {
        let mut b = Bitmap::new(1 << 20, 512);
        let e: Vec<_> = b.map(100, 2048).collect();
        assert_eq!(
            e,
            vec![Extent {
                sector: 100,
                count: 2048,
                in_cow: false
            }]
        );
        b.set_range(0, 1 << 20);
        let e: Vec<_> = b.map(100, 2048).collect();
        assert_eq!(
            e,
            vec![Extent {
                sector: 100,
                count: 2048,
                in_cow: true
            }]
        );
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
            let mut b = Bitmap::new(chunks, 512 * spc);
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
