//! Guest ranges to host addresses for one request: the region the last
//! range fell in is kept, so that a request's header, data and status
//! (nearly always in one region of guest RAM) cost one region lookup, not
//! one per range through vm-memory's slice iterators (docs/benchmarks.md,
//! "Per-request cost"). A range this cannot map whole — across a region's
//! end, outside guest memory, or behind an IOMMU — is left to the caller's
//! general path, which splits it or reports the error.

use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// One mapped region of guest memory: guest start, length, host start.
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: *mut u8,
}

pub struct HostRanges<'a, G: GuestMemory + ?Sized> {
    mem: &'a G,
    last: Option<Region>,
}

impl<'a, G: GuestMemory + ?Sized> HostRanges<'a, G> {
    pub fn new(mem: &'a G) -> Self {
        HostRanges { mem, last: None }
    }

    /// The host address of guest bytes `addr .. addr + len` (len > 0) when
    /// they lie in one region of plain guest memory; None otherwise. The
    /// address is valid as long as the memory map `mem` is.
    #[inline]
    pub fn get(&mut self, addr: GuestAddress, len: u64) -> Option<*mut u8> {
        let a = addr.raw_value();
        let r = match self.last {
            Some(r) if a.wrapping_sub(r.start) < r.len => r,
            _ => {
                let r = self.lookup(addr)?;
                self.last = Some(r);
                r
            }
        };
        let off = a - r.start;
        if len > r.len - off {
            return None;
        }
        // SAFETY: off < r.len: the address is inside the region's mapping,
        // which `host` starts (`lookup`).
        Some(unsafe { r.host.add(usize::try_from(off).ok()?) })
    }

    #[cold]
    fn lookup(&self, addr: GuestAddress) -> Option<Region> {
        // A linear scan: guest memory has a few regions (vm-memory's
        // binary search costs more than the scan at that size).
        let a = addr.raw_value();
        let region = self
            .mem
            .physical_memory()?
            .iter()
            .find(|r| a.wrapping_sub(r.start_addr().raw_value()) < r.len())?;
        let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
        Some(Region {
            start: region.start_addr().raw_value(),
            len: region.len(),
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    proptest! {
        /// Whatever region was kept before, a range maps exactly when it
        /// lies in one region, to the address vm-memory gives it.
        #[test]
        fn maps_as_vm_memory_does(ranges in proptest::collection::vec((0u64..0x6000, 1u64..0x2000), 1..20)) {
            // Two adjacent regions, a hole, a third.
            let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x2000), 0x1000),
                (GuestAddress(0x4000), 0x1000),
            ])
            .unwrap();
            let mut h = HostRanges::new(&mem);
            for (addr, len) in ranges {
                let got = h.get(GuestAddress(addr), len).map(|p| p as usize);
                let want = mem
                    .get_slice(GuestAddress(addr), usize::try_from(len).unwrap())
                    .ok()
                    .map(|s| s.ptr_guard().as_ptr() as usize);
                prop_assert_eq!(got, want, "{:#x}+{:#x}", addr, len);
            }
        }
    }

    #[test]
    fn ranges_inside_one_region_map_and_others_are_left_to_the_caller() {
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(&[7], GuestAddress(0x1ffe)).unwrap();
        mem.write_slice(&[9], GuestAddress(0x2000)).unwrap();
        let mut h = HostRanges::new(&mem);
        let p = h.get(GuestAddress(0x1ffe), 2).unwrap();
        // SAFETY: mapped by `mem`, which lives to the end of the test.
        assert_eq!(unsafe { *p }, 7);
        let q = h.get(GuestAddress(0x2000), 0x1000).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *q }, 9);
        // Across the regions' boundary (contiguous in guest memory, not
        // necessarily in host memory), before the first, after the last,
        // and a length that would wrap.
        assert!(h.get(GuestAddress(0x1fff), 2).is_none());
        assert!(h.get(GuestAddress(0xfff), 1).is_none());
        assert!(h.get(GuestAddress(0x3000), 1).is_none());
        assert!(h.get(GuestAddress(0x2001), u64::MAX).is_none());
        // The kept region does not stand in for another one.
        assert_eq!(
            h.get(GuestAddress(0x1000), 1).map(|p| p as usize),
            Some(p as usize - 0xffe)
        );
    }
}
