//! The descriptor chains the request parser walks: the ones virtio-queue
//! pops off the avail ring, and [`HeadChain`], a chain walked from a head
//! index the daemon already knows. The second is for requests resubmitted
//! after a restart (docs/design.md, "In-flight tracking"): their heads
//! come from the in-flight region, not from the avail ring, and
//! virtio-queue builds chains only from the avail ring (its
//! `DescriptorChain::new` is crate-private).
//!
//! [`HeadChain`] yields exactly what virtio-queue's walk yields for the
//! same table and head (tested below against it): it stops on a used-up
//! TTL, a `next` out of the table, an unreadable descriptor, a bad or
//! nested indirect table and a chain longer than 2^32 bytes, and the
//! framing step refuses such a chain because its last descriptor still
//! has NEXT.
//!
//! It is also the chain of every request the worker takes off the avail
//! ring (virtio-queue's walk only gives it the head): a [`DescTable`]
//! translated once per pass over a ring lets each descriptor be read from
//! its host address, where virtio-queue translates every descriptor's
//! guest address anew (docs/benchmarks.md, "Per-request cost").

use std::ops::Deref;

use virtio_bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::host_ranges::whole_in_one_region;

/// A chain of descriptors in guest memory, as the parser needs it.
pub trait Chain: Iterator<Item = Descriptor> + Clone {
    type Mem: GuestMemory + ?Sized;
    fn memory(&self) -> &Self::Mem;
}

impl<M> Chain for DescriptorChain<M>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    type Mem = M::Target;
    fn memory(&self) -> &M::Target {
        DescriptorChain::memory(self)
    }
}

/// A descriptor table: its guest address, its length in descriptors, and
/// its host address when the whole table lies in one mapped region (else
/// each descriptor is read through guest memory, as virtio-queue does).
#[derive(Clone, Copy, Debug)]
pub struct DescTable {
    addr: GuestAddress,
    len: u16,
    host: *const u8,
}

impl DescTable {
    /// The table of `len` descriptors at `addr` in `mem`. The host address
    /// stays valid as long as the memory map `mem` is (a worker holds its
    /// map for the whole pass).
    pub fn resolve<G: GuestMemory + ?Sized>(mem: &G, addr: GuestAddress, len: u16) -> DescTable {
        // Ring tables are 16-byte aligned (virtio 1.2, 2.7); an indirect
        // table need not be, and is then read as below.
        let host = whole_in_one_region(
            mem,
            addr,
            usize::from(len) * DESC_SIZE,
            Permissions::Read,
            8,
        );
        DescTable { addr, len, host }
    }

    /// Descriptor `i`, which must be below `len`; None when it cannot be
    /// read.
    fn read<G: GuestMemory + ?Sized>(&self, mem: &G, i: u16) -> Option<Descriptor> {
        let offset = usize::from(i) * DESC_SIZE;
        if self.host.is_null() {
            let at = self.addr.checked_add(offset as u64)?;
            return mem.read_obj(at).ok();
        }
        // SAFETY: `host` maps the whole table (len descriptors, checked
        // by `resolve`) for as long as the memory map it was resolved in,
        // which the chain holds; i < len; `host` is 8-byte aligned
        // (`resolve`). The guest may change the bytes at any time: they
        // are copied once, volatile, and then validated like any other
        // descriptor.
        let (lo, hi) = unsafe {
            let p = self.host.add(offset).cast::<u64>();
            (
                std::ptr::read_volatile(p),
                std::ptr::read_volatile(p.add(1)),
            )
        };
        // Little-endian fields: addr (8 bytes), len (4), flags (2), next (2).
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        // The fields are these bits of the second word: nothing is cut.
        #[allow(clippy::cast_possible_truncation)]
        let (len, flags, next) = (hi as u32, (hi >> 32) as u16, (hi >> 48) as u16);
        Some(Descriptor::new(lo, len, flags, next))
    }
}

const DESC_SIZE: usize = std::mem::size_of::<Descriptor>();

/// The chain that starts at descriptor `head` of a ring's table.
#[derive(Clone)]
pub struct HeadChain<M> {
    mem: M,
    table: DescTable,
    next: u16,
    ttl: u16,
    bytes: u32,
    indirect: bool,
}

// SAFETY: the table's host address is an address into the memory map the
// chain holds (`mem`), shared like the map itself; reads through it are
// volatile copies.
unsafe impl<M: Send> Send for HeadChain<M> {}

impl<M> HeadChain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    /// The chain of `head` in a table resolved in `mem` before. A head out
    /// of the table gives an empty chain.
    pub fn in_table(mem: M, table: DescTable, head: u16) -> HeadChain<M> {
        HeadChain {
            mem,
            table,
            next: head,
            ttl: table.len,
            bytes: 0,
            indirect: false,
        }
    }

    /// Continues in the indirect table `desc` names; None when it may not
    /// be followed (nested, misaligned length, too long).
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.indirect || desc.len() % VRING_DESC_ALIGN_SIZE != 0 {
            return None;
        }
        let len = u16::try_from(desc.len() / VRING_DESC_ALIGN_SIZE).ok()?;
        self.table = DescTable::resolve(&*self.mem, desc.addr(), len);
        self.next = 0;
        self.ttl = len;
        self.indirect = true;
        Some(())
    }
}

impl<M> Iterator for HeadChain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table.len {
                return None;
            }
            let desc = self.table.read(&*self.mem, self.next)?;
            if desc.refers_to_indirect_table() {
                self.enter_indirect(&desc)?;
                continue;
            }
            // A chain longer than 2^32 bytes is illegal (virtio 1.2, 2.7.5.2).
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

impl<M> Chain for HeadChain<M>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    type Mem = M::Target;
    fn memory(&self) -> &M::Target {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;
    const AVAIL: u64 = 0x8000;
    const USED: u64 = 0x9000;
    const INDIRECT: u64 = 0xa000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// virtio-queue's chain of `head`, popped off a one-entry avail ring.
    fn reference(m: &Mem, qsize: u16, head: u16) -> Vec<(u64, u32, u16, u16)> {
        reference_at(m, 0, qsize, head)
    }

    fn reference_at(m: &Mem, table: u64, qsize: u16, head: u16) -> Vec<(u64, u32, u16, u16)> {
        m.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        let mut q = Queue::new(qsize).unwrap();
        q.set_size(qsize);
        q.set_desc_table_address(Some(u32::try_from(table).unwrap()), Some(0));
        q.set_avail_ring_address(Some(u32::try_from(AVAIL).unwrap()), Some(0));
        q.set_used_ring_address(Some(u32::try_from(USED).unwrap()), Some(0));
        q.set_ready(true);
        let chain = q.iter(m).unwrap().next().unwrap();
        chain.map(summary).collect()
    }

    fn ours(m: &Mem, qsize: u16, head: u16) -> Vec<(u64, u32, u16, u16)> {
        ours_at(m, 0, qsize, head)
    }

    /// Our walk with the table translated the way the worker does it.
    fn ours_at(m: &Mem, table: u64, qsize: u16, head: u16) -> Vec<(u64, u32, u16, u16)> {
        let t = DescTable::resolve(m, GuestAddress(table), qsize);
        HeadChain::in_table(m, t, head).map(summary).collect()
    }

    fn summary(d: Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().raw_value(), d.len(), d.flags(), d.next())
    }

    fn write_table(m: &Mem, at: u64, table: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            m.write_obj(d, GuestAddress(at + 16 * i as u64)).unwrap();
        }
    }

    #[test]
    fn a_plain_chain_is_walked_to_its_end() {
        let m = mem();
        write_table(
            &m,
            0,
            &[
                (0x1000, 16, F_NEXT, 2),
                (0, 0, 0, 0),
                (0x2000, 512, F_NEXT | F_WRITE, 3),
                (0x3000, 1, F_WRITE, 0),
            ],
        );
        let got = ours(&m, 4, 0);
        assert_eq!(got.len(), 3);
        assert_eq!(got, reference(&m, 4, 0));
    }

    #[test]
    fn an_indirect_chain_is_walked_in_its_table() {
        let m = mem();
        write_table(&m, 0, &[(INDIRECT, 32, F_INDIRECT, 0)]);
        write_table(
            &m,
            INDIRECT,
            &[(0x1000, 16, F_NEXT, 1), (0x3000, 1, F_WRITE, 0)],
        );
        let got = ours(&m, 4, 0);
        assert_eq!(got.len(), 2);
        assert_eq!(got, reference(&m, 4, 0));
        // An indirect table at an address not 8-byte aligned is read
        // through guest memory, with the same result.
        let odd = INDIRECT + 0x104;
        assert!(DescTable::resolve(&m, GuestAddress(odd), 2).host.is_null());
        write_table(&m, 0, &[(odd, 32, F_INDIRECT, 0)]);
        write_table(&m, odd, &[(0x1000, 16, F_NEXT, 1), (0x3000, 1, F_WRITE, 0)]);
        let got = ours(&m, 4, 0);
        assert_eq!(got.len(), 2);
        assert_eq!(got, reference(&m, 4, 0));
    }

    #[test]
    fn loops_and_bad_links_stop_the_walk_as_virtio_queue_does() {
        let m = mem();
        // A loop: 0 -> 1 -> 0 ...; a next out of the table; a nested
        // indirect table; a misaligned indirect length.
        write_table(
            &m,
            0,
            &[
                (0x1000, 16, F_NEXT, 1),
                (0x1000, 16, F_NEXT, 0),
                (0x1000, 16, F_NEXT, 9),
                (INDIRECT, 24, F_INDIRECT, 0),
            ],
        );
        write_table(&m, INDIRECT, &[(INDIRECT, 16, F_INDIRECT, 0)]);
        for head in 0..4 {
            assert_eq!(ours(&m, 4, head), reference(&m, 4, head), "head {head}");
        }
        assert_eq!(ours(&m, 4, 0).len(), 4, "the TTL ends a loop");
        assert!(ours(&m, 4, 4).is_empty(), "a head out of the table");
    }

    #[test]
    fn a_table_in_one_region_is_read_from_its_host_address_and_one_across_two_is_not() {
        let m = mem();
        let t = DescTable::resolve(&m, GuestAddress(0), 8);
        assert!(!t.host.is_null());
        // Two regions that meet at 0x8000; a table across them, and one
        // partly outside guest memory.
        let two: Mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8000),
            (GuestAddress(0x8000), 0x8000),
        ])
        .unwrap();
        let across = 0x8000 - 64;
        assert!(DescTable::resolve(&two, GuestAddress(across), 8)
            .host
            .is_null());
        assert!(DescTable::resolve(&two, GuestAddress(0xffc0), 8)
            .host
            .is_null());
        // Across two regions, descriptor by descriptor: still the same walk.
        for (i, &(addr, len, flags, next)) in [
            (0x1000u64, 16u32, F_NEXT, 5u16),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (0x2000, 512, F_NEXT | F_WRITE, 6),
            (0x3000, 1, F_WRITE, 0),
        ]
        .iter()
        .enumerate()
        {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            two.write_obj(d, GuestAddress(across + 16 * i as u64))
                .unwrap();
        }
        let t = DescTable::resolve(&two, GuestAddress(across), 8);
        let got: Vec<_> = HeadChain::in_table(&two, t, 0).map(summary).collect();
        assert_eq!(got.len(), 3);
        let want = reference_at(&two, across, 8, 0);
        assert_eq!(got, want);
        // A table running out of guest memory: what is there is read.
        assert_eq!(
            HeadChain::in_table(&two, DescTable::resolve(&two, GuestAddress(0xffc0), 8), 0)
                .map(summary)
                .collect::<Vec<_>>(),
            reference_at(&two, 0xffc0, 8, 0)
        );
    }

    proptest! {
        /// Any table, any head, the table anywhere (whole in memory,
        /// ending at its end, half past it, outside): the same descriptors
        /// as virtio-queue.
        #[test]
        fn same_walk_as_virtio_queue(
            table_at in prop_oneof![Just(0u64), Just(0xff80), Just(0xffc0), Just(0x2_0000)],
            table in proptest::collection::vec(
                (prop_oneof![Just(0x1000u64), Just(INDIRECT), Just(0xfff8u64), Just(0x20000u64)],
                 prop_oneof![Just(0u32), Just(1), Just(16), Just(32), Just(48), Just(u32::MAX)],
                 0u16..8, 0u16..10),
                8),
            indirect in proptest::collection::vec(
                (Just(0x1000u64), 0u32..64, 0u16..8, 0u16..4), 4),
            head in 0u16..8,
        ) {
            let m = mem();
            // What lies in memory of a table placed partly outside it.
            for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
                let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                let _ = m.write_obj(d, GuestAddress(table_at + 16 * i as u64));
            }
            write_table(&m, INDIRECT, &indirect);
            prop_assert_eq!(ours_at(&m, table_at, 8, head), reference_at(&m, table_at, 8, head));
        }
    }
}
