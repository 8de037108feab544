//! The avail and used rings of a split virtqueue (virtio 1.2, 2.7.6 and
//! 2.7.8), read and written by the device: the heads the driver made
//! available, the used elements and index, and whether the driver wants a
//! notification. virtio-queue's `Queue` keeps the ring's addresses and
//! positions (set up by the frontend's messages); this does its per-request
//! work from the rings' host addresses, translated once per memory map and
//! ring set-up, where virtio-queue translates every index and element's
//! guest address anew (docs/benchmarks.md, "Per-request cost"). Rings not
//! whole in one region are accessed through guest memory, with the same
//! orderings.
//!
//! The orderings are virtio-queue's: the avail index and entries are read
//! with Acquire; each used element is written before the used index, which
//! is stored with Release; a full fence orders the used index before the
//! driver's `used_event` is read.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Error, Queue, QueueT};
use vm_memory::Permissions::{Read, ReadWrite};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryLoadGuard};

use super::host_ranges::{whole_in_one_region, KnownMap};

const AVAIL_HEADER: u64 = 4; // flags, idx
const USED_HEADER: u64 = 4; // flags, idx
const USED_ELEM: u64 = 8; // id, len

/// Host addresses of one ring set-up in one memory map (null: through
/// guest memory).
#[derive(Clone, Copy)]
struct Host {
    avail: *mut u8,
    used: *mut u8,
}

/// What the host addresses were translated for.
struct Key<M> {
    map: KnownMap<M>,
    avail: u64,
    used: u64,
    size: u16,
}

/// The device's side of a split queue's rings.
pub struct SplitRing<M> {
    key: Option<Key<M>>,
    host: Host,
    /// Used elements added since the last notification check (for
    /// VIRTIO_F_EVENT_IDX, as the kernel's driver counts them).
    num_added: Wrapping<u16>,
}

// SAFETY: the host addresses are dereferenced only while a guard of the
// map they were translated in is held (`host` checks the map), on
// whichever thread holds it; the ring itself is guest memory, accessed
// with atomics and volatile writes.
unsafe impl<M: Send + Sync> Send for SplitRing<M> {}

impl<M: GuestMemory> Default for SplitRing<M> {
    fn default() -> Self {
        SplitRing {
            key: None,
            host: Host {
                avail: std::ptr::null_mut(),
                used: std::ptr::null_mut(),
            },
            num_added: Wrapping(0),
        }
    }
}

impl<M: GuestMemory> SplitRing<M> {
    /// The rings' host addresses for `queue` in `mem`'s map, translated
    /// again when the map or the ring's set-up changed.
    fn host(&mut self, queue: &Queue, mem: &GuestMemoryLoadGuard<M>) -> Host {
        let (avail, used, size) = (queue.avail_ring(), queue.used_ring(), queue.size());
        let same = self
            .key
            .as_ref()
            .is_some_and(|k| k.map.is(mem) && (k.avail, k.used, k.size) == (avail, used, size));
        if !same {
            let n = u64::from(size);
            // flags, idx, ring, used_event / avail_event.
            let avail_len = AVAIL_HEADER + 2 * n + 2;
            let used_len = USED_HEADER + USED_ELEM * n + 2;
            self.host = Host {
                avail: whole_in_one_region(&**mem, GuestAddress(avail), to_len(avail_len), Read, 2),
                used: whole_in_one_region(
                    &**mem,
                    GuestAddress(used),
                    to_len(used_len),
                    ReadWrite,
                    4,
                ),
            };
            let mut map = KnownMap::default();
            map.set(mem);
            self.key = Some(Key {
                map,
                avail,
                used,
                size,
            });
        }
        self.host
    }

    /// Appends up to `room` heads the driver made available to `out` and
    /// moves the queue's next-avail position past them, as virtio-queue's
    /// avail iterator does (the same errors: a queue not ready, an avail
    /// index more than the queue size ahead).
    pub fn take_heads(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryLoadGuard<M>,
        room: usize,
        out: &mut Vec<u16>,
    ) -> Result<(), Error> {
        if !queue.ready() || queue.avail_ring() == 0 {
            return Err(Error::QueueNotReady);
        }
        let host = self.host(queue, mem);
        let avail = queue.avail_ring();
        let size = queue.size();
        let idx = load_u16(&**mem, host.avail, avail, 2, Ordering::Acquire)?;
        let next = Wrapping(queue.next_avail());
        let ready = (Wrapping(idx) - next).0;
        if ready > size {
            return Err(Error::InvalidAvailRingIndex);
        }
        let mut taken = 0u16;
        while usize::from(taken) < room && taken < ready {
            let slot = u64::from((next + Wrapping(taken)).0 % size);
            let Ok(head) = load_u16(
                &**mem,
                host.avail,
                avail,
                AVAIL_HEADER + 2 * slot,
                Ordering::Acquire,
            ) else {
                break; // unreadable: as virtio-queue, stop without taking it
            };
            out.push(head);
            taken += 1;
        }
        queue.set_next_avail((next + Wrapping(taken)).0);
        Ok(())
    }

    /// Puts `head`'s used element on the used ring and publishes the used
    /// index; false (nothing written) for a head outside the queue or a
    /// ring outside guest memory.
    pub fn add_used(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryLoadGuard<M>,
        head: u16,
        len: u32,
    ) -> bool {
        let size = queue.size();
        if head >= size {
            log::error!("used element for descriptor {head}, outside the queue of {size}");
            return false;
        }
        let host = self.host(queue, mem);
        let used = queue.used_ring();
        let next = Wrapping(queue.next_used());
        let at = USED_HEADER + USED_ELEM * u64::from(next.0 % size);
        let (id, len) = (u32::from(head).to_le(), len.to_le());
        if host.used.is_null() {
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&id.to_ne_bytes());
            elem[4..].copy_from_slice(&len.to_ne_bytes());
            let Some(addr) = GuestAddress(used).checked_add(at) else {
                return false;
            };
            if mem.write_slice(&elem, addr).is_err() {
                return false;
            }
        } else {
            // SAFETY: `host.used` maps the whole used ring (`translate`),
            // 4-aligned, while `mem` (this map) is held; `at` + 8 is
            // inside it (slot < size). The driver reads, never writes, the
            // elements.
            unsafe {
                let p = host.used.add(to_len(at)).cast::<u32>();
                std::ptr::write_volatile(p, id);
                std::ptr::write_volatile(p.add(1), len);
            }
        }
        let next = next + Wrapping(1);
        queue.set_next_used(next.0);
        self.num_added += Wrapping(1);
        store_u16(&**mem, host.used, used, 2, next.0, Ordering::Release)
    }

    /// Whether the driver wants to be notified of the elements added since
    /// the last call: always without VIRTIO_F_EVENT_IDX (as virtio-queue,
    /// which ignores VRING_AVAIL_F_NO_INTERRUPT), else when `used_event`
    /// was passed; true when it cannot be read.
    pub fn needs_notification(&mut self, queue: &Queue, mem: &GuestMemoryLoadGuard<M>) -> bool {
        let used_idx = Wrapping(queue.next_used());
        // The used index is stored before the driver's event is read.
        fence(Ordering::SeqCst);
        if !queue.event_idx_enabled() {
            return true;
        }
        let host = self.host(queue, mem);
        let at = AVAIL_HEADER + 2 * u64::from(queue.size());
        let Ok(used_event) = load_u16(
            &**mem,
            host.avail,
            queue.avail_ring(),
            at,
            Ordering::Relaxed,
        ) else {
            return true;
        };
        let old = used_idx - self.num_added;
        self.num_added = Wrapping(0);
        used_idx - Wrapping(used_event) - Wrapping(1) < used_idx - old
    }

    /// The ring was set up anew: nothing added since a notification.
    pub fn reset(&mut self) {
        self.num_added = Wrapping(0);
    }
}

fn to_len(n: u64) -> usize {
    crate::units::to_usize(n)
}

/// Loads the little-endian u16 at `base + off`: from `host` (+ off) when
/// translated, else through guest memory.
fn load_u16<M: GuestMemory>(
    mem: &M,
    host: *mut u8,
    base: u64,
    off: u64,
    order: Ordering,
) -> Result<u16, Error> {
    if host.is_null() {
        let addr = GuestAddress(base)
            .checked_add(off)
            .ok_or(Error::AddressOverflow)?;
        return mem
            .load(addr, order)
            .map(u16::from_le)
            .map_err(Error::GuestMemory);
    }
    // SAFETY: `host` maps the whole ring, 2-aligned (`translate`), while
    // the caller holds the map; `off` is an even offset inside it.
    let a = unsafe { AtomicU16::from_ptr(host.add(to_len(off)).cast::<u16>()) };
    Ok(u16::from_le(a.load(order)))
}

/// Stores the little-endian u16 `v` at `base + off`, as `load_u16` reads;
/// false when it cannot be written.
fn store_u16<M: GuestMemory>(
    mem: &M,
    host: *mut u8,
    base: u64,
    off: u64,
    v: u16,
    order: Ordering,
) -> bool {
    if host.is_null() {
        return GuestAddress(base)
            .checked_add(off)
            .is_some_and(|addr| mem.store(v.to_le(), addr, order).is_ok());
    }
    // SAFETY: as in `load_u16`.
    let a = unsafe { AtomicU16::from_ptr(host.add(to_len(off)).cast::<u16>()) };
    a.store(v.to_le(), order);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    #[derive(Debug, Clone)]
    enum Op {
        /// The driver makes these heads available (its index may run
        /// ahead of the device by more than the queue: a broken ring).
        Avail(Vec<u16>),
        /// The driver sets used_event.
        UsedEvent(u16),
        Take(usize),
        Used(u16, u32),
        Notify,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(any::<u16>(), 0..40).prop_map(Op::Avail),
            any::<u16>().prop_map(Op::UsedEvent),
            (0usize..50).prop_map(Op::Take),
            (any::<u16>(), any::<u32>()).prop_map(|(h, l)| Op::Used(h, l)),
            Just(Op::Notify),
        ]
    }

    /// Where the rings are: the usual place, or where a hostile frontend
    /// may put them (the avail ring's header in memory and its entries
    /// past the end, the used ring on top of the avail ring, outside
    /// memory, at the top of the address space).
    const PLACES: [(u64, u64); 5] = [
        (AVAIL, USED),
        (MEM_END - 6, MEM_END - 8),
        (USED, USED),
        (0x10_0000, 0x20_0000),
        (u64::MAX - 1, u64::MAX - 3),
    ];
    const MEM_END: u64 = 0x8000;
    const MEM_LEN: usize = 0x8000;

    /// Guest memory with the rings, and a queue set up on it. `split`:
    /// region boundaries inside both rings (accessed through guest memory).
    fn setup(
        size: u16,
        event_idx: bool,
        split: bool,
        (avail, used): (u64, u64),
    ) -> (GuestMemoryAtomic<Mem>, Queue) {
        let ranges: &[(GuestAddress, usize)] = if split {
            &[
                (GuestAddress(0), 0x1040),
                (GuestAddress(AVAIL + 0x40), 0x1000 - 0x40 + 0x100),
                (GuestAddress(USED + 0x100), MEM_LEN - 0x2100),
            ]
        } else {
            &[(GuestAddress(0), MEM_LEN)]
        };
        let mem = GuestMemoryAtomic::new(Mem::from_ranges(ranges).unwrap());
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, q)
    }

    /// All of guest memory.
    fn memory(mem: &Mem) -> Vec<u8> {
        let mut v = vec![0u8; MEM_LEN];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    proptest! {
        /// Every result, position and byte of the used ring as
        /// virtio-queue's own avail iterator, add_used and
        /// needs_notification give them.
        #[test]
        fn as_virtio_queue(
            size_log in 0u32..9,
            event_idx: bool,
            split: bool,
            place in 0usize..PLACES.len(),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let size = 1u16 << size_log;
            // The boundaries fall inside the rings (at their usual place).
            let split = split && size >= 128;
            let (avail, _) = PLACES[place];
            let (mem_a, mut qa) = setup(size, event_idx, split, PLACES[place]);
            let (mem_b, mut qb) = setup(size, event_idx, split, PLACES[place]);
            let mut ring = SplitRing::<Mem>::default();
            let mut avail_idx = Wrapping(0u16);
            for op in ops {
                let (ga, gb) = (mem_a.memory(), mem_b.memory());
                match op {
                    // The driver's writes, where they land in memory.
                    Op::Avail(heads) => {
                        for h in heads {
                            let at = avail.wrapping_add(4 + 2 * u64::from(avail_idx.0 % size));
                            let _ = ga.write_obj(h % size, GuestAddress(at));
                            let _ = gb.write_obj(h % size, GuestAddress(at));
                            avail_idx += Wrapping(1);
                        }
                        let at = GuestAddress(avail.wrapping_add(2));
                        let _ = ga.write_obj(avail_idx.0, at);
                        let _ = gb.write_obj(avail_idx.0, at);
                    }
                    Op::UsedEvent(e) => {
                        let at = GuestAddress(avail.wrapping_add(4 + 2 * u64::from(size)));
                        let _ = ga.write_obj(e, at);
                        let _ = gb.write_obj(e, at);
                    }
                    Op::Take(room) => {
                        let want: Result<Vec<u16>, String> = qa
                            .iter(&*ga)
                            .map(|it| it.take(room).map(|c| c.head_index()).collect())
                            .map_err(|e| e.to_string());
                        let mut got = Vec::new();
                        let got = ring
                            .take_heads(&mut qb, &gb, room, &mut got)
                            .map(|()| got)
                            .map_err(|e| e.to_string());
                        prop_assert_eq!(got, want);
                        prop_assert_eq!(qb.next_avail(), qa.next_avail());
                    }
                    Op::Used(head, len) => {
                        let head = if head % 4 == 0 { head } else { head % size };
                        let want = qa.add_used(&*ga, head, len).is_ok();
                        prop_assert_eq!(ring.add_used(&mut qb, &gb, head, len), want);
                        prop_assert_eq!(qb.next_used(), qa.next_used());
                        prop_assert_eq!(memory(&gb), memory(&ga));
                    }
                    Op::Notify => {
                        // An unreadable used_event: notify (virtio-queue
                        // reports the error, and the worker notifies then).
                        let want = qa.needs_notification(&*ga).unwrap_or(true);
                        prop_assert_eq!(ring.needs_notification(&qb, &gb), want);
                    }
                }
            }
        }
    }

    #[test]
    fn rings_across_regions_are_not_translated_and_whole_ones_are() {
        let (mem, q) = setup(256, true, true, PLACES[0]);
        let mut ring = SplitRing::<Mem>::default();
        let host = ring.host(&q, &mem.memory());
        assert!(host.avail.is_null() && host.used.is_null());
        let (mem, q) = setup(256, true, false, PLACES[0]);
        let host = ring.host(&q, &mem.memory());
        assert!(!host.avail.is_null() && !host.used.is_null());
    }
}
