//! Fixed-size, aligned memory slots carved out of larger zeroed blocks:
//! the bitmap's pages. One allocation per block instead of per page keeps
//! the allocator's alignment waste out of the resident set, and a slot
//! never moves while it is in use (bitmap writes are issued from it).

use super::aligned::AlignedBuf;
use crate::units::to_usize;

/// Bytes per block (or one slot, if slots are larger).
const BLOCK_BYTES: usize = 256 << 10;
/// At most this many slots per block. The first blocks are smaller (1, 2,
/// 4, ... slots), so that a pool of a few pages stays small (and cheap to
/// clone, which the scheduler's exhaustive tests do at every step).
const MAX_SLOTS_PER_BLOCK: usize = 64;

#[derive(Clone)]
pub struct PagePool {
    slot_bytes: usize,
    /// Slots of the full-size blocks (a power of two).
    per_block: usize,
    blocks: Vec<AlignedBuf>,
    /// Slots not in use.
    free: Vec<u32>,
}

impl PagePool {
    /// Slots of `slot_bytes` (a power of two), each aligned to
    /// `min(slot_bytes, 4096)`.
    pub fn new(slot_bytes: usize) -> PagePool {
        assert!(slot_bytes.is_power_of_two());
        let per_block = (BLOCK_BYTES / slot_bytes)
            .clamp(1, MAX_SLOTS_PER_BLOCK)
            .next_power_of_two();
        PagePool {
            slot_bytes,
            per_block,
            blocks: Vec::new(),
            free: Vec::new(),
        }
    }

    /// A zeroed slot.
    pub fn alloc(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            self.slice_mut(s).fill(0);
            return s;
        }
        let block = self.blocks.len();
        let (first, slots) = self.block_span(block);
        let bytes = self.slot_bytes * slots;
        // Mapped: a slot's memory becomes resident when the slot is first
        // used, not when its block is made; and the pages are not left in
        // a malloc arena once freed.
        let block = AlignedBuf::mapped_zeroed(bytes).unwrap_or_else(|| AlignedBuf::zeroed(bytes));
        self.blocks.push(block);
        let slot = |i: usize| u32::try_from(first + i).expect("page pool slot numbers fit u32");
        // Hand out the lowest slot now, keep the others (highest popped last).
        self.free.extend((1..slots).rev().map(slot));
        slot(0)
    }

    /// Block `b`'s first slot and slot count: blocks of 1, 2, 4, ... slots
    /// up to `per_block`, then `per_block` each.
    fn block_span(&self, b: usize) -> (usize, usize) {
        let small = self.per_block.trailing_zeros() as usize;
        if b < small {
            ((1 << b) - 1, 1 << b)
        } else {
            (
                self.per_block - 1 + (b - small) * self.per_block,
                self.per_block,
            )
        }
    }

    /// The block holding slot `s` and the slot's index in it.
    fn locate(&self, s: usize) -> (usize, usize) {
        if s + 1 < self.per_block {
            let b = (s + 1).ilog2() as usize;
            (b, s + 1 - (1 << b))
        } else {
            let small = self.per_block.trailing_zeros() as usize;
            let t = s + 1 - self.per_block;
            (small + t / self.per_block, t % self.per_block)
        }
    }

    pub fn free(&mut self, slot: u32) {
        self.free.push(slot);
    }

    pub fn ptr(&self, slot: u32) -> *mut u8 {
        let (b, i) = self.locate(to_usize(u64::from(slot)));
        // SAFETY: i is below the block's slot count: inside its allocation.
        unsafe { self.blocks[b].as_ptr().add(i * self.slot_bytes) }
    }

    pub fn slice(&self, slot: u32) -> &[u8] {
        // SAFETY: slot_bytes initialised bytes owned by the pool.
        unsafe { std::slice::from_raw_parts(self.ptr(slot), self.slot_bytes) }
    }

    pub fn slice_mut(&mut self, slot: u32) -> &mut [u8] {
        // SAFETY: as above, exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(slot), self.slot_bytes) }
    }

    /// Bytes the pool holds (in use or free).
    pub fn allocated_bytes(&self) -> usize {
        (0..self.blocks.len())
            .map(|b| self.block_span(b).1 * self.slot_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_distinct_and_zeroed_on_reuse() {
        let mut p = PagePool::new(4096);
        let a = p.alloc();
        let b = p.alloc();
        assert_ne!(a, b);
        assert_eq!(p.ptr(a) as usize % 4096, 0);
        assert_eq!(p.ptr(b) as usize % 4096, 0);
        p.slice_mut(a).fill(7);
        p.free(a);
        let c = p.alloc();
        assert_eq!(c, a);
        assert!(p.slice(c).iter().all(|&x| x == 0));
        let small = PagePool::new(8);
        assert_eq!(small.per_block, MAX_SLOTS_PER_BLOCK);
    }

    #[test]
    fn blocks_grow_and_every_slot_has_its_own_memory() {
        let mut p = PagePool::new(64);
        let slots: Vec<u32> = (0..300).map(|_| p.alloc()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for &s in &slots {
            let (b, i) = p.locate(s as usize);
            let (first, n) = p.block_span(b);
            assert!(i < n && first + i == s as usize, "slot {s}");
            assert!(seen.insert(p.ptr(s) as usize), "slot {s} shares memory");
            assert_eq!(p.ptr(s) as usize % 64, 0);
        }
        assert_eq!(seen.len(), 300);
        assert_eq!(
            p.allocated_bytes(),
            p.blocks.len().saturating_sub(6) * 64 * 64 + 63 * 64
        );
    }
}
