//! virtio-blk request parsing over fuzzed guest memory and descriptor
//! chains, direct and indirect.
//!
//! Ring layout as in `src/virtio/request_tests.rs`: descriptor table at 0,
//! avail ring at 0x1000, used ring at 0x2000, indirect tables from 0x4000,
//! request header at 0x1_0000, data from 0x2_0000, status at 0x3_0000;
//! memory is one region 0..0x20_0000 or two adjacent ones split at
//! 0x10_0000, then a hole.
//!
//! Input (little-endian):
//! * byte 0: bit 0 two regions, bit 1 read-only, bits 2-3 seg_max
//!   (126, 0 = unlimited, 1, 3), bit 4 size_max 0 (unlimited) else
//!   (bit 5: 4096, else 1 MiB), bit 6 discard / write-zeroes segment limits
//!   of 2 instead of 32, bit 7 capacity 2^40 sectors instead of 4096;
//! * byte 1: log2 of the queue size (mod 9: 1..256);
//! * bytes 2-3: the head index;
//! * bytes 4-19: the request header written at 0x1_0000 (type, ioprio,
//!   sector);
//! * byte 20: descriptors in the table (mod 33); byte 21: descriptors in
//!   the indirect table at 0x4000 (mod 33);
//! * then 16 bytes per descriptor, table first: addr u64, len u32,
//!   flags u16, next u16. The address's top nibble picks where it points:
//!   0 header + (low % 0x100), 1 data + (low % 0x2000), 2 status +
//!   (low % 16), 3 indirect table + 16 * (low % 16), 4 around the region
//!   split, 5 around the end of memory, 6 the top of the address space;
//!   anything else is taken as is;
//! * the rest (up to 0x2000 bytes) is written at the data address (discard
//!   segments, GET_ID buffers...).
//!
//! Checked: nothing panics, and every outcome keeps the parser's promises:
//! segments lie inside guest memory, inside one region, inside the chain's
//! descriptors of the right direction; IN/OUT lengths are multiples of 512
//! within capacity; a failure's status address is in memory when present.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use vhost_user_cow::virtio::parse_request;
use vhost_user_cow::virtio::request::{
    BlkRequest, Limits, RequestFailure, RequestType, Segment, ID_BYTES,
};

type Mem = GuestMemoryMmap<()>;

const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const ITABLE: u64 = 0x4000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const REGION_B: u64 = 0x10_0000;
const MEM_END: u64 = 0x20_0000;

const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

fn mem(two: bool) -> Mem {
    if two {
        Mem::from_ranges(&[
            (GuestAddress(0), REGION_B as usize),
            (GuestAddress(REGION_B), (MEM_END - REGION_B) as usize),
        ])
    } else {
        Mem::from_ranges(&[(GuestAddress(0), MEM_END as usize)])
    }
    .unwrap()
}

/// One region and two regions, made once (mapping 2 MiB per run would
/// cost more than the parsing).
fn mems() -> &'static [Mem; 2] {
    static MEMS: OnceLock<[Mem; 2]> = OnceLock::new();
    MEMS.get_or_init(|| [mem(false), mem(true)])
}

fn addr(raw: u64) -> u64 {
    let low = raw & 0x0fff_ffff_ffff_ffff;
    match raw >> 60 {
        0 => HDR + low % 0x100,
        1 => DATA + low % 0x2000,
        2 => STATUS + low % 16,
        3 => ITABLE + 16 * (low % 16),
        4 => REGION_B - 0x100 + low % 0x200,
        5 => MEM_END - 0x100 + low % 0x200,
        6 => u64::MAX - low % 0x20,
        _ => raw,
    }
}

fn desc(b: &[u8]) -> RawDescriptor {
    let a = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let len = u32::from_le_bytes(b[8..12].try_into().unwrap());
    let flags = u16::from_le_bytes(b[12..14].try_into().unwrap());
    let next = u16::from_le_bytes(b[14..16].try_into().unwrap());
    RawDescriptor::from(Descriptor::new(addr(a), len, flags, next))
}

fn check_segment(m: &Mem, s: &Segment, descs: &[(u64, u32, bool)], writable: bool) {
    assert!(!s.is_empty());
    let region = m
        .find_region(s.guest_addr())
        .expect("segment start in memory");
    let start = s.guest_addr().0;
    let last = start + s.len() as u64 - 1;
    assert!(last <= region.last_addr().0, "segment crosses region end");
    assert_eq!(s.ptr(), m.get_host_address(s.guest_addr()).unwrap());
    assert!(
        descs.iter().any(|&(a, l, w)| w == writable
            && l > 0
            && start >= a
            && (last as u128) < a as u128 + l as u128),
        "segment {start:#x}+{} not inside a descriptor of its direction: {descs:x?}",
        s.len()
    );
}

fn check_outcome(
    m: &Mem,
    res: &Result<BlkRequest, RequestFailure>,
    descs: &[(u64, u32, bool)],
    l: &Limits,
) {
    let cap = l.capacity_sectors;
    match res {
        Ok(r) => {
            let sum: u64 = r.data.iter().map(|s| s.len() as u64).sum();
            assert_eq!(sum, r.data_len);
            let writable = matches!(r.req_type, RequestType::In | RequestType::GetId);
            for s in &r.data {
                check_segment(m, s, descs, writable);
            }
            assert!(GuestMemoryBackend::check_range(m, r.status_addr, 1));
            // The status byte is the last byte of the last descriptor, a
            // writable one.
            let &(a, len, w) = descs.last().expect("a chain");
            assert!(w && len > 0);
            assert_eq!(r.status_addr.0, a.wrapping_add(u64::from(len) - 1));
            assert!(r.writable_len >= 1);
            match r.req_type {
                RequestType::In | RequestType::Out => {
                    assert_eq!(r.data_len % 512, 0);
                    assert!(r.sector.checked_add(r.num_sectors()).unwrap() <= cap);
                    if r.req_type == RequestType::In {
                        assert_eq!(
                            u64::from(r.writable_len),
                            (r.data_len + 1).min(u32::MAX.into())
                        );
                    } else {
                        assert_eq!(r.writable_len, 1);
                    }
                    assert!(!(l.read_only && r.req_type == RequestType::Out));
                }
                RequestType::GetId => {
                    assert!(r.data_len <= ID_BYTES as u64);
                    assert_eq!(u64::from(r.writable_len), r.data_len + 1);
                }
                RequestType::Flush => assert!(r.data.is_empty()),
                RequestType::Discard | RequestType::WriteZeroes => {
                    assert!(r.data.is_empty());
                    assert!(!r.ranges.is_empty());
                    assert!(!l.read_only);
                    let (max_seg, max_sectors) = if r.req_type == RequestType::Discard {
                        (l.max_discard_seg, l.max_discard_sectors)
                    } else {
                        (l.max_write_zeroes_seg, l.max_write_zeroes_sectors)
                    };
                    assert!(r.ranges.len() <= max_seg as usize);
                    for x in &r.ranges {
                        assert!(x.num_sectors <= max_sectors);
                        assert!(x.sector.checked_add(u64::from(x.num_sectors)).unwrap() <= cap);
                    }
                }
                RequestType::Unsupported(_) => panic!("unsupported type accepted"),
            }
            if !matches!(r.req_type, RequestType::Discard | RequestType::WriteZeroes) {
                assert!(r.ranges.is_empty());
            }
            assert_eq!(r.used_len(0), r.writable_len);
        }
        Err(f) => {
            assert_eq!(f.status_addr.is_some(), f.error.status().is_some());
            if let Some(a) = f.status_addr {
                assert!(GuestMemoryBackend::check_range(m, a, 1));
                let &(d, len, w) = descs.last().expect("a chain");
                assert!(w && len > 0);
                assert_eq!(a.0, d.wrapping_add(u64::from(len) - 1));
            }
            assert!(f.used_len() <= 1);
            assert!(!f.to_string().is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 22 {
        return;
    }
    let flags = data[0];
    let qsize = 1u16 << (data[1] % 9);
    let head = u16::from_le_bytes([data[2], data[3]]);
    let header = &data[4..20];
    let n = (data[20] % 33) as usize;
    let ni = (data[21] % 33) as usize;
    let mut rest = &data[22..];
    let mut take = |count: usize| {
        let k = count.min(rest.len() / 16);
        let d: Vec<RawDescriptor> = rest[..16 * k].chunks(16).map(desc).collect();
        rest = &rest[16 * k..];
        d
    };
    let table = take(n);
    let itable = take(ni);
    if table.is_empty() {
        return;
    }
    let payload = &rest[..rest.len().min(0x2000)];

    let m = &mems()[usize::from(flags & 1)];
    // The memory is reused between runs: clear what any run writes.
    m.write_slice(&[0u8; 16 * 33], GuestAddress(0)).unwrap();
    m.write_slice(&[0u8; 16 * 33], GuestAddress(ITABLE))
        .unwrap();
    m.write_slice(&[0u8; 8], GuestAddress(AVAIL)).unwrap();
    m.write_slice(&[0u8; 0x2000], GuestAddress(DATA)).unwrap();
    m.write_slice(header, GuestAddress(HDR)).unwrap();
    m.write_slice(payload, GuestAddress(DATA)).unwrap();
    for (i, d) in table.iter().enumerate() {
        m.write_obj(*d, GuestAddress(16 * i as u64)).unwrap();
    }
    for (i, d) in itable.iter().enumerate() {
        m.write_obj(*d, GuestAddress(ITABLE + 16 * i as u64))
            .unwrap();
    }
    m.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    m.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    m.write_obj(head.to_le(), GuestAddress(AVAIL + 4)).unwrap();

    let mut q = Queue::new(256).unwrap();
    q.set_size(qsize);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    if !q.is_valid(m) {
        return;
    }
    let Ok(mut it) = q.iter(m) else {
        return;
    };
    let Some(chain) = it.next() else {
        return;
    };

    let cap = if flags & 0x80 != 0 { 1 << 40 } else { 4096 };
    let mut l = Limits::new(cap);
    l.read_only = flags & 2 != 0;
    l.seg_max = [126, 0, 1, 3][usize::from((flags >> 2) & 3)];
    l.size_max = if flags & 0x10 != 0 {
        0
    } else if flags & 0x20 != 0 {
        4096
    } else {
        1 << 20
    };
    if flags & 0x40 != 0 {
        l.max_discard_seg = 2;
        l.max_write_zeroes_seg = 2;
    }

    // The chain as walked (indirect tables flattened), for the checks.
    let descs: Vec<(u64, u32, bool)> = chain
        .clone()
        .map(|d| (d.addr().0, d.len(), d.flags() & WRITE != 0))
        .collect();
    let res = parse_request(&chain, &l);
    check_outcome(m, &res, &descs, &l);
});
