//! Guest ranges to host addresses for one request: the region the last
//! range fell in is kept, so that a request's header, data and status
//! (nearly always in one region of guest RAM) cost one region lookup, not
//! one per range through vm-memory's slice iterators (docs/benchmarks.md,
//! "Per-request cost"). A range this cannot map whole — across a region's
//! end, outside guest memory, or behind an IOMMU — is left to the caller's
//! general path, which splits it or reports the error. A worker keeps
//! the region from one pass over its rings to the next ([`RegionCache`]),
//! as long as the memory map is the same.

use std::sync::{Arc, Weak};

use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryRegion, MemoryRegionAddress, Permissions,
};

/// One mapped region of guest memory: guest start, length, host start.
/// Length 0: no region.
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: *mut u8,
}

impl Region {
    const NONE: Region = Region {
        start: 0,
        len: 0,
        host: std::ptr::null_mut(),
    };

    #[inline]
    fn holds(&self, a: u64) -> bool {
        a.wrapping_sub(self.start) < self.len
    }
}

/// The regions kept: a request's header and status are often in one
/// region and its data in another (libblkio's rings and its buffers).
type Kept = [Region; 2];

pub struct HostRanges<'a, G: GuestMemory + ?Sized> {
    mem: &'a G,
    /// The most recently looked up first.
    kept: Kept,
}

impl<'a, G: GuestMemory + ?Sized> HostRanges<'a, G> {
    pub fn new(mem: &'a G) -> Self {
        HostRanges {
            mem,
            kept: [Region::NONE; 2],
        }
    }

    /// The host address of guest bytes `addr .. addr + len` (len > 0) when
    /// they lie in one region of plain guest memory; None otherwise. The
    /// address is valid as long as the memory map `mem` is.
    #[inline]
    pub fn get(&mut self, addr: GuestAddress, len: u64) -> Option<*mut u8> {
        let a = addr.raw_value();
        let r = if self.kept[0].holds(a) {
            self.kept[0]
        } else if self.kept[1].holds(a) {
            self.kept[1]
        } else {
            let r = self.lookup(addr)?;
            self.kept = [r, self.kept[0]];
            r
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
        let region = self.mem.physical_memory()?.find_region(addr)?;
        let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
        Some(Region {
            start: region.start_addr().raw_value(),
            len: region.len(),
            host,
        })
    }
}

/// The host address of `len` bytes at `addr` if they lie whole in one
/// region, accessible with `perm`, and the address is aligned to `align`;
/// else null (the caller
/// then goes through guest memory). For structures translated once and
/// read many times: a ring, a descriptor table.
pub fn whole_in_one_region<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    perm: Permissions,
    align: usize,
) -> *mut u8 {
    let first = mem
        .get_slices(addr, len, perm)
        .ok()
        .and_then(|mut slices| slices.next());
    match first {
        Some(Ok(s)) if s.len() == len && s.ptr_guard_mut().as_ptr() as usize % align == 0 => {
            s.ptr_guard_mut().as_ptr()
        }
        _ => std::ptr::null_mut(),
    }
}

/// Which memory map something was translated in. The map is known by
/// address; the `Weak` keeps that address from being reused by a later
/// map (it does not keep the map's memory mapped), so an equal address is
/// the same map.
pub struct KnownMap<M>(Weak<M>);

impl<M> Default for KnownMap<M> {
    fn default() -> Self {
        KnownMap(Weak::new())
    }
}

impl<M: GuestMemory> KnownMap<M> {
    pub fn is(&self, mem: &M) -> bool {
        std::ptr::eq(self.0.as_ptr(), mem)
    }

    /// Now `guard`'s map.
    pub fn set(&mut self, guard: &GuestMemoryLoadGuard<M>) {
        if !self.is(guard) {
            self.0 = Arc::downgrade(&guard.clone().into_inner());
        }
    }
}

/// The regions a worker's last pass ended on, for its next pass over the
/// same memory map.
pub struct RegionCache<M> {
    map: KnownMap<M>,
    kept: Kept,
}

// SAFETY: the kept host address is an address, dereferenced only through
// a `HostRanges` made by `start` for the same map, alive (the caller holds
// it) on whichever thread that is.
unsafe impl<M: Send + Sync> Send for RegionCache<M> {}

impl<M: GuestMemory> Default for RegionCache<M> {
    fn default() -> Self {
        RegionCache {
            map: KnownMap::default(),
            kept: [Region::NONE; 2],
        }
    }
}

impl<M: GuestMemory> RegionCache<M> {
    /// Mapping for a pass over `mem`: from the kept region if the last
    /// pass was over this map.
    pub fn start<'a>(&self, mem: &'a M) -> HostRanges<'a, M> {
        let kept = if self.map.is(mem) {
            self.kept
        } else {
            [Region::NONE; 2]
        };
        HostRanges { mem, kept }
    }

    /// Keeps what the pass over `guard`'s map ended on.
    pub fn keep(&mut self, guard: &GuestMemoryLoadGuard<M>, host: HostRanges<'_, M>) {
        self.map.set(guard);
        self.kept = host.kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

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

    #[test]
    fn a_kept_region_serves_only_its_own_map() {
        let map = |base: u64| {
            let m: GuestMemoryMmap<()> =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(base), 0x1000)]).unwrap();
            vm_memory::GuestMemoryAtomic::new(m)
        };
        let a = map(0x1000);
        let mut cache = RegionCache::default();
        let guard = a.memory();
        let mut h = cache.start(&*guard);
        let p = h.get(GuestAddress(0x1800), 8).unwrap();
        cache.keep(&guard, h);
        // The next pass over the same map starts from the kept region.
        let h = cache.start(&*guard);
        assert!(h.kept[0].holds(0x1800));
        drop(guard);
        // Another map, even at the same guest addresses: looked up anew.
        let b = map(0x1000);
        let guard_b = b.memory();
        let mut h = cache.start(&*guard_b);
        assert!(!h.kept[0].holds(0x1800) && !h.kept[1].holds(0x1800));
        let q = h.get(GuestAddress(0x1800), 8).unwrap();
        assert_ne!(p as usize, q as usize);
    }
}
