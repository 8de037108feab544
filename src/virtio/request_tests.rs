//! Tests of request parsing: framing, every request type, and proptest
//! over arbitrary chains. Included from `decode.rs`.

use super::*;
use crate::units::to_usize;
use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

type Mem = GuestMemoryMmap<()>;

// Descriptor flags as u16 (virtio_bindings has them as u32).
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const _: () = assert!(
    NEXT as u32 == VRING_DESC_F_NEXT
        && WRITE as u32 == VRING_DESC_F_WRITE
        && INDIRECT as u32 == VRING_DESC_F_INDIRECT
);
const R: bool = false;
const W: bool = true;

// Own ring layout (not MockSplitQueue's): descriptor table at 0 (at most
// 256 entries), avail ring at 0x1000, used ring at 0x2000, indirect
// tables from 0x4000, buffers from 0x10000. Two adjacent but separately
// mapped regions, then a hole from 0x20_0000.
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const ITABLE: u64 = 0x4000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const REGION_B: u64 = 0x10_0000;
const MEM_END: u64 = 0x20_0000;
const CAP: u64 = 1000;

fn mem() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(0), to_usize(REGION_B)),
        (GuestAddress(REGION_B), to_usize(MEM_END - REGION_B)),
    ])
    .unwrap()
}

fn limits() -> Limits {
    Limits::new(CAP)
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Writes `table` as the descriptor table of a `qsize` queue, makes
/// `head` available and pops it.
fn chain_raw<'a>(
    m: &'a Mem,
    qsize: u16,
    table: &[RawDescriptor],
    head: u16,
) -> DescriptorChain<&'a Mem> {
    for (i, d) in table.iter().enumerate() {
        m.write_obj(*d, GuestAddress(16 * i as u64)).unwrap();
    }
    m.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    m.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    m.write_obj(head.to_le(), GuestAddress(AVAIL + 4)).unwrap();
    let mut q = Queue::new(qsize).unwrap();
    q.set_size(qsize);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(u32::try_from(AVAIL).unwrap()), Some(0));
    q.set_used_ring_address(Some(u32::try_from(USED).unwrap()), Some(0));
    q.set_ready(true);
    let mut it = q.iter(m).unwrap();
    it.next().unwrap()
}

fn linked(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, w))| {
            let mut f = if w { WRITE } else { 0 };
            if i + 1 < descs.len() {
                f |= NEXT;
            }
            raw(a, l, f, u16::try_from(i + 1).unwrap())
        })
        .collect()
}

fn chain<'a>(m: &'a Mem, descs: &[(u64, u32, bool)]) -> DescriptorChain<&'a Mem> {
    chain_raw(m, 32, &linked(descs), 0)
}

fn header(m: &Mem, addr: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // ioprio: ignored
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn parse(m: &Mem, descs: &[(u64, u32, bool)], l: &Limits) -> Result<BlkRequest, RequestFailure> {
    parse_request(&chain(m, descs), l)
}

fn host(m: &Mem, addr: u64) -> *mut u8 {
    m.get_host_address(GuestAddress(addr)).unwrap()
}

/// Asserts the failure, its status and that a status address exists
/// exactly when a status is reported.
fn expect_err(r: Result<BlkRequest, RequestFailure>, err: RequestError, status: Option<u8>) {
    let f = r.expect_err("request should fail");
    assert_eq!(f.error, err);
    assert_eq!(f.error.status(), status);
    assert_eq!(f.status_addr.is_some(), status.is_some());
    assert_eq!(f.used_len(), u32::from(status.is_some()));
    // Display must work for every error.
    assert!(!f.to_string().is_empty());
}

fn expect_status_err(r: Result<BlkRequest, RequestFailure>, err: RequestError, status: u8) {
    let f = r.clone().expect_err("request should fail");
    assert_eq!(f.status(), Some((GuestAddress(STATUS), status)));
    expect_err(r, err, Some(status));
}

const T_IN: u32 = VIRTIO_BLK_T_IN;
const T_OUT: u32 = VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
const T_WZ: u32 = VIRTIO_BLK_T_WRITE_ZEROES;

// ---- valid requests ----

/// A 4 KiB read of sector 8 in the usual three descriptors, parsed.
fn single_read(m: &Mem) -> BlkRequest {
    header(m, HDR, T_IN, 8);
    parse(
        m,
        &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap()
}

#[test]
fn in_single_data_descriptor() {
    let m = mem();
    let r = single_read(&m);
    assert_eq!(r.req_type, RequestType::In);
    assert_eq!(r.sector, 8);
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.num_sectors(), 8);
    assert_eq!(r.status_addr, GuestAddress(STATUS));
    assert_eq!(r.writable_len, 4097);
    assert_eq!(r.used_len(STATUS_OK), 4097);
    assert_eq!(r.used_len(STATUS_IOERR), 1);
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data[0].ptr(), host(&m, DATA));
    assert_eq!(r.data[0].len(), 4096);
    assert!(!r.data[0].is_empty());
    assert_eq!(r.data[0].guest_addr(), GuestAddress(DATA));
    assert_eq!(r.data[0].iovec().iov_len, 4096);
    assert!(r.ranges.is_empty());
}

#[test]
fn status_written_through_its_resolved_address() {
    let m = mem();
    let r = single_read(&m);
    assert_ne!(r.status_ptr, StatusPtr::UNRESOLVED);
    for status in [STATUS_OK, STATUS_IOERR, 0x5a] {
        // SAFETY: `m` is the memory the request was parsed in.
        unsafe { r.write_status(&m, status) };
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), status);
        // Nothing around it is touched.
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), 0);
    }
    // Unresolved (a request made by hand): written through the memory.
    let mut by_hand = r.clone();
    by_hand.status_ptr = StatusPtr::UNRESOLVED;
    // SAFETY: as above.
    unsafe { by_hand.write_status(&m, 0x33) };
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0x33);
}

#[test]
fn in_several_data_descriptors() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let r = parse(
        &m,
        &[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 0x1000, 1024, W),
            (DATA + 0x3000, 512, W),
            (STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.data_len, 2048);
    assert_eq!(r.writable_len, 2049);
    let segs: Vec<_> = r.data.iter().map(|s| (s.guest_addr().0, s.len())).collect();
    assert_eq!(
        segs,
        vec![(DATA, 512), (DATA + 0x1000, 1024), (DATA + 0x3000, 512)]
    );
    assert_eq!(r.data[2].ptr(), host(&m, DATA + 0x3000));
}

#[test]
fn out_single_and_several() {
    let m = mem();
    header(&m, HDR, T_OUT, 3);
    let r = parse(
        &m,
        &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.req_type, RequestType::Out);
    assert_eq!((r.sector, r.data_len, r.writable_len), (3, 512, 1));
    assert_eq!(r.used_len(STATUS_OK), 1);
    let r = parse(
        &m,
        &[
            (HDR, 16, R),
            (DATA, 512, R),
            (DATA + 0x1000, 4096, R),
            (STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    assert_eq!((r.data.len(), r.data_len, r.writable_len), (2, 4608, 1));
}

#[test]
fn flush_with_and_without_data() {
    let m = mem();
    header(&m, HDR, T_FLUSH, 0);
    let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
    assert_eq!(r.req_type, RequestType::Flush);
    assert_eq!((r.data_len, r.writable_len), (0, 1));
    // Data is ignored, even if it is nonsense.
    let r = parse(
        &m,
        &[(HDR, 16, R), (MEM_END + 0x1000, 3, R), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.req_type, RequestType::Flush);
    assert!(r.data.is_empty());
}

#[test]
fn get_id_buffer_sizes() {
    let m = mem();
    header(&m, HDR, T_GET_ID, 0);
    for (buf, want) in [(20u32, 20u64), (100, 20), (1, 1), (7, 7)] {
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, buf, W), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::GetId);
        assert_eq!(r.data_len, want, "buf {buf}");
        assert_eq!(r.writable_len as u64, want + 1);
        assert_eq!(r.data.iter().map(|s| s.len() as u64).sum::<u64>(), want);
    }
    // Split over two descriptors, truncated to 20 bytes in total.
    let r = parse(
        &m,
        &[
            (HDR, 16, R),
            (DATA, 10, W),
            (DATA + 0x100, 15, W),
            (STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    let segs: Vec<_> = r.data.iter().map(|s| (s.guest_addr().0, s.len())).collect();
    assert_eq!(segs, vec![(DATA, 10), (DATA + 0x100, 10)]);
    assert_eq!(r.writable_len, 21);
    // No buffer at all: QEMU answers OK, writing only the status.
    let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
    assert_eq!((r.data_len, r.writable_len), (0, 1));
    // Buffer and status sharing one descriptor.
    let r = parse(&m, &[(HDR, 16, R), (DATA, 21, W)], &limits()).unwrap();
    assert_eq!((r.data_len, r.status_addr), (20, GuestAddress(DATA + 20)));
}

fn discard_seg(m: &Mem, addr: u64, sector: u64, n: u32, flags: u32) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&n.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&b, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_and_write_zeroes_valid() {
    let m = mem();
    header(&m, HDR, T_DISCARD, 0);
    discard_seg(&m, DATA, 10, 20, 0);
    let r = parse(
        &m,
        &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.req_type, RequestType::Discard);
    assert_eq!(
        r.ranges.to_vec(),
        vec![DiscardRange {
            sector: 10,
            num_sectors: 20,
            unmap: false
        }]
    );
    assert_eq!((r.data_len, r.writable_len), (0, 1));

    // Three segments, the payload split mid-segment over descriptors.
    discard_seg(&m, DATA + 16, 100, 1, 0);
    discard_seg(&m, DATA + 32, 990, 10, 0);
    let r = parse(
        &m,
        &[
            (HDR, 16, R),
            (DATA, 24, R),
            (DATA + 24, 24, R),
            (STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    let got: Vec<_> = r.ranges.iter().map(|x| (x.sector, x.num_sectors)).collect();
    assert_eq!(got, vec![(10, 20), (100, 1), (990, 10)]);

    header(&m, HDR, T_WZ, 0);
    discard_seg(&m, DATA, 5, 6, 1);
    discard_seg(&m, DATA + 16, 7, 0, 0);
    let r = parse(
        &m,
        &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.req_type, RequestType::WriteZeroes);
    assert_eq!(
        r.ranges.to_vec(),
        vec![
            DiscardRange {
                sector: 5,
                num_sectors: 6,
                unmap: true
            },
            DiscardRange {
                sector: 7,
                num_sectors: 0,
                unmap: false
            }
        ]
    );
}

// ---- framing ----

#[test]
fn header_split_across_two_descriptors() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    header(&m, HDR + 0x100, 0, 42); // only its sector half is used
    let r = parse(
        &m,
        &[
            (HDR, 8, R),
            (HDR + 0x108, 8, R),
            (DATA, 512, W),
            (STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    assert_eq!((r.req_type, r.sector), (RequestType::In, 42));
    // Sixteen 1-byte header descriptors.
    header(&m, HDR, T_OUT, 7);
    let mut d: Vec<_> = (0..16).map(|i| (HDR + i, 1, R)).collect();
    d.push((DATA, 512, R));
    d.push((STATUS, 1, W));
    let r = parse(&m, &d, &limits()).unwrap();
    assert_eq!(
        (r.req_type, r.sector, r.data_len),
        (RequestType::Out, 7, 512)
    );
}

#[test]
fn header_and_data_share_descriptors() {
    let m = mem();
    header(&m, HDR, T_OUT, 1);
    let r = parse(&m, &[(HDR, 16 + 1024, R), (STATUS, 1, W)], &limits()).unwrap();
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data[0].guest_addr(), GuestAddress(HDR + 16));
    assert_eq!(r.data[0].ptr(), host(&m, HDR + 16));
    assert_eq!(r.data_len, 1024);
    // IN: data and status in one writable descriptor.
    header(&m, HDR, T_IN, 1);
    let r = parse(&m, &[(HDR, 16, R), (DATA, 4097, W)], &limits()).unwrap();
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status_addr, GuestAddress(DATA + 4096));
    assert_eq!(r.writable_len, 4097);
}

#[test]
fn header_too_short() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    expect_status_err(
        parse(&m, &[(HDR, 8, R), (STATUS, 1, W)], &limits()),
        RequestError::HeaderTooShort { len: 8 },
        STATUS_IOERR,
    );
    expect_status_err(
        parse(
            &m,
            &[(HDR, 8, R), (HDR + 8, 7, R), (DATA, 512, W), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::HeaderTooShort { len: 15 },
        STATUS_IOERR,
    );
}

#[test]
fn header_in_write_only_descriptor() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::HeaderWriteOnly { addr: HDR, len: 16 },
        STATUS_IOERR,
    );
}

#[test]
fn missing_or_read_only_status() {
    let m = mem();
    header(&m, HDR, T_OUT, 0);
    expect_err(
        parse(&m, &[(HDR, 16, R)], &limits()),
        RequestError::StatusNotWritable {
            position: 0,
            addr: HDR,
            len: 16,
        },
        None,
    );
    expect_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)],
            &limits(),
        ),
        RequestError::StatusNotWritable {
            position: 2,
            addr: STATUS,
            len: 1,
        },
        None,
    );
    expect_err(
        parse(&m, &[(HDR, 16, R), (STATUS, 0, W)], &limits()),
        RequestError::StatusEmpty {
            position: 1,
            addr: STATUS,
        },
        None,
    );
    expect_err(
        parse(&m, &[(HDR, 16, R), (MEM_END, 1, W)], &limits()),
        RequestError::StatusOutOfMemory {
            position: 1,
            addr: MEM_END,
            len: 1,
        },
        None,
    );
    expect_err(
        parse(&m, &[(HDR, 16, R), (u64::MAX, 2, W)], &limits()),
        RequestError::StatusOutOfMemory {
            position: 1,
            addr: u64::MAX,
            len: 2,
        },
        None,
    );
}

#[test]
fn readable_after_writable() {
    let m = mem();
    header(&m, HDR, T_OUT, 0);
    expect_status_err(
        parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA + 512, 512, R),
                (STATUS, 1, W),
            ],
            &limits(),
        ),
        RequestError::ReadableAfterWritable {
            position: 2,
            addr: DATA + 512,
        },
        STATUS_IOERR,
    );
}

#[test]
fn wrong_data_direction() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::WrongDirection {
            req_type: RequestType::In,
            position: 1,
            len: 512,
        },
        STATUS_IOERR,
    );
    header(&m, HDR, T_OUT, 0);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::WrongDirection {
            req_type: RequestType::Out,
            position: 1,
            len: 512,
        },
        STATUS_IOERR,
    );
    header(&m, HDR, T_DISCARD, 0);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 16, W), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::WrongDirection {
            req_type: RequestType::Discard,
            position: 1,
            len: 16,
        },
        STATUS_IOERR,
    );
}

// ---- data length and range ----

#[test]
fn zero_length_data_follows_qemu() {
    let m = mem();
    for t in [T_IN, T_OUT] {
        header(&m, HDR, t, CAP);
        let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
        assert_eq!((r.data_len, r.writable_len), (0, 1));
        assert!(r.data.is_empty());
        header(&m, HDR, t, CAP + 1);
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()),
            RequestError::OutOfRange {
                sector: CAP + 1,
                sectors: 0,
                capacity: CAP,
            },
            STATUS_IOERR,
        );
    }
    // Zero-length descriptors between data ones are skipped, not counted.
    header(&m, HDR, T_IN, 0);
    let mut l = limits();
    l.seg_max = 1;
    let r = parse(
        &m,
        &[(HDR, 16, R), (DATA, 0, W), (DATA, 512, W), (STATUS, 1, W)],
        &l,
    )
    .unwrap();
    assert_eq!((r.data.len(), r.data_len), (1, 512));
}

#[test]
fn length_not_multiple_of_512() {
    let m = mem();
    for (t, w) in [(T_IN, W), (T_OUT, R)] {
        header(&m, HDR, t, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 513, w), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::UnalignedLength { len: 513 },
            STATUS_IOERR,
        );
        expect_status_err(
            parse(
                &m,
                &[
                    (HDR, 16, R),
                    (DATA, 256, w),
                    (DATA + 0x1000, 512, w),
                    (STATUS, 1, W),
                ],
                &limits(),
            ),
            RequestError::UnalignedLength { len: 768 },
            STATUS_IOERR,
        );
    }
}

#[test]
fn sector_beyond_capacity() {
    let m = mem();
    header(&m, HDR, T_IN, CAP - 2);
    assert!(parse(
        &m,
        &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
        &limits()
    )
    .is_ok());
    header(&m, HDR, T_IN, CAP - 1);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::OutOfRange {
            sector: CAP - 1,
            sectors: 2,
            capacity: CAP,
        },
        STATUS_IOERR,
    );
}

#[test]
fn sector_plus_length_overflows_u64() {
    let m = mem();
    let mut l = limits();
    l.capacity_sectors = u64::MAX;
    for sector in [u64::MAX, u64::MAX - 1] {
        header(&m, HDR, T_OUT, sector);
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)], &l),
            RequestError::OutOfRange {
                sector,
                sectors: 2,
                capacity: u64::MAX,
            },
            STATUS_IOERR,
        );
    }
}

#[test]
fn descriptor_outside_guest_memory() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    for (addr, len) in [
        (MEM_END, 512),
        (MEM_END - 256, 512),
        (u64::MAX - 255, 512),
        (u64::MAX, 512),
    ] {
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::DescriptorOutOfMemory {
                position: 1,
                addr,
                len,
            },
            STATUS_IOERR,
        );
    }
    // Header outside memory.
    expect_status_err(
        parse(&m, &[(MEM_END + 64, 16, R), (STATUS, 1, W)], &limits()),
        RequestError::DescriptorOutOfMemory {
            position: 0,
            addr: MEM_END + 64,
            len: 16,
        },
        STATUS_IOERR,
    );
    // OUT data outside memory.
    header(&m, HDR, T_OUT, 0);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (MEM_END, 512, R), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::DescriptorOutOfMemory {
            position: 1,
            addr: MEM_END,
            len: 512,
        },
        STATUS_IOERR,
    );
}

#[test]
fn data_spanning_two_regions_is_split() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let r = parse(
        &m,
        &[(HDR, 16, R), (REGION_B - 256, 512, W), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap();
    assert_eq!(r.data.len(), 2);
    assert_eq!(r.data[0].ptr(), host(&m, REGION_B - 256));
    assert_eq!(r.data[0].len(), 256);
    assert_eq!(r.data[1].ptr(), host(&m, REGION_B));
    assert_eq!(r.data[1].guest_addr(), GuestAddress(REGION_B));
    assert_eq!(r.data[1].len(), 256);
    assert_eq!(r.data_len, 512);
}

// ---- malformed chains ----

#[test]
fn descriptor_loop() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let table = [raw(HDR, 16, NEXT, 1), raw(DATA, 512, WRITE | NEXT, 0)];
    expect_err(
        parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
        RequestError::MalformedChain {
            count: 16,
            last_addr: DATA,
            next: 0,
        },
        None,
    );
    // Self loop on the status descriptor.
    let table = [raw(HDR, 16, NEXT, 1), raw(STATUS, 1, WRITE | NEXT, 1)];
    let f = parse_request(&chain_raw(&m, 16, &table, 0), &limits()).unwrap_err();
    assert!(matches!(f.error, RequestError::MalformedChain { .. }));
}

#[test]
fn next_index_out_of_table() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let table = [raw(HDR, 16, NEXT, 200)];
    expect_err(
        parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
        RequestError::MalformedChain {
            count: 1,
            last_addr: HDR,
            next: 200,
        },
        None,
    );
}

#[test]
fn indirect_tables() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    for (i, d) in linked(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
        .iter()
        .enumerate()
    {
        m.write_obj(*d, GuestAddress(ITABLE + 16 * i as u64))
            .unwrap();
    }
    // A good indirect table.
    let r = parse_request(
        &chain_raw(&m, 16, &[raw(ITABLE, 48, INDIRECT, 0)], 0),
        &limits(),
    )
    .unwrap();
    assert_eq!((r.req_type, r.data_len), (RequestType::In, 512));
    // Bad table length as the head: nothing can be read at all.
    expect_err(
        parse_request(
            &chain_raw(&m, 16, &[raw(ITABLE, 47, INDIRECT, 0)], 0),
            &limits(),
        ),
        RequestError::EmptyChain,
        None,
    );
    // Bad table length after a direct descriptor.
    let table = [raw(HDR, 16, NEXT, 1), raw(ITABLE, 40, INDIRECT, 0)];
    expect_err(
        parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
        RequestError::MalformedChain {
            count: 1,
            last_addr: HDR,
            next: 1,
        },
        None,
    );
    // Table too short for the chain it holds (last entry has NEXT).
    let f = parse_request(
        &chain_raw(&m, 16, &[raw(ITABLE, 32, INDIRECT, 0)], 0),
        &limits(),
    )
    .unwrap_err();
    assert!(matches!(
        f.error,
        RequestError::MalformedChain { count: 2, .. }
    ));
    // Table outside guest memory.
    expect_err(
        parse_request(
            &chain_raw(&m, 16, &[raw(MEM_END, 48, INDIRECT, 0)], 0),
            &limits(),
        ),
        RequestError::EmptyChain,
        None,
    );
}

#[test]
fn too_many_descriptors() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let n = MAX_CHAIN_DESCRIPTORS + 6;
    let mut d = vec![(HDR, 16, R)];
    d.extend((0..n - 2).map(|_| (DATA, 512, W)));
    d.push((STATUS, 1, W));
    for (i, x) in linked(&d).iter().enumerate() {
        m.write_obj(*x, GuestAddress(ITABLE + 16 * i as u64))
            .unwrap();
    }
    let mut l = limits();
    l.seg_max = 0;
    l.capacity_sectors = u64::MAX;
    expect_status_err(
        parse_request(
            &chain_raw(
                &m,
                16,
                &[raw(ITABLE, 16 * u32::try_from(n).unwrap(), INDIRECT, 0)],
                0,
            ),
            &l,
        ),
        RequestError::TooManyDescriptors {
            count: n,
            max: MAX_CHAIN_DESCRIPTORS,
        },
        STATUS_IOERR,
    );
}

#[test]
fn more_segments_than_seg_max() {
    let m = mem();
    let mut l = limits();
    l.seg_max = 4;
    for (t, w) in [(T_IN, W), (T_OUT, R)] {
        header(&m, HDR, t, 0);
        let mut d = vec![(HDR, 16, R)];
        d.extend((0..4).map(|i| (DATA + 0x1000 * i, 512, w)));
        d.push((STATUS, 1, W));
        assert_eq!(parse(&m, &d, &l).unwrap().data.len(), 4);
        d.insert(1, (DATA + 0x8000, 512, w));
        expect_status_err(
            parse(&m, &d, &l),
            RequestError::TooManySegments { count: 5, max: 4 },
            STATUS_IOERR,
        );
    }
}

#[test]
fn segment_larger_than_size_max() {
    let m = mem();
    let mut l = limits();
    l.size_max = 4096;
    header(&m, HDR, T_IN, 0);
    assert!(parse(&m, &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)], &l).is_ok());
    expect_status_err(
        parse(&m, &[(HDR, 16, R), (DATA, 8192, W), (STATUS, 1, W)], &l),
        RequestError::SegmentTooLarge {
            position: 1,
            len: 8192,
            max: 4096,
        },
        STATUS_IOERR,
    );
}

// ---- discard / write zeroes ----

#[test]
fn discard_flags() {
    let m = mem();
    header(&m, HDR, T_DISCARD, 0);
    for flags in [1u32, 2, 0x8000_0000] {
        discard_seg(&m, DATA, 0, 1, 0);
        discard_seg(&m, DATA + 16, 0, 1, flags);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::UnsupportedFlags {
                req_type: RequestType::Discard,
                index: 1,
                flags,
            },
            STATUS_UNSUPP,
        );
    }
    header(&m, HDR, T_WZ, 0);
    discard_seg(&m, DATA, 0, 1, 3);
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::UnsupportedFlags {
            req_type: RequestType::WriteZeroes,
            index: 0,
            flags: 3,
        },
        STATUS_UNSUPP,
    );
    // Bad flags outrank a bad range (spec: MUST answer UNSUPP).
    discard_seg(&m, DATA, u64::MAX, 1, 4);
    let f = parse(
        &m,
        &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap_err();
    assert_eq!(f.error.status(), Some(STATUS_UNSUPP));
}

#[test]
fn discard_ranges() {
    let m = mem();
    for (t, rt) in [
        (T_DISCARD, RequestType::Discard),
        (T_WZ, RequestType::WriteZeroes),
    ] {
        header(&m, HDR, t, 0);
        let descs = [(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
        discard_seg(&m, DATA, CAP - 10, 10, 0);
        assert!(parse(&m, &descs, &limits()).is_ok());
        for sector in [CAP - 9, CAP + 1, u64::MAX] {
            discard_seg(&m, DATA, sector, 10, 0);
            expect_status_err(
                parse(&m, &descs, &limits()),
                RequestError::DiscardOutOfRange {
                    req_type: rt,
                    index: 0,
                    sector,
                    num_sectors: 10,
                    capacity: CAP,
                },
                STATUS_IOERR,
            );
        }
        let mut l = limits();
        l.capacity_sectors = u64::MAX;
        l.max_discard_sectors = 100;
        l.max_write_zeroes_sectors = 100;
        discard_seg(&m, DATA, 0, 101, 0);
        expect_status_err(
            parse(&m, &descs, &l),
            RequestError::DiscardTooLarge {
                req_type: rt,
                index: 0,
                num_sectors: 101,
                max: 100,
            },
            STATUS_IOERR,
        );
    }
}

#[test]
fn discard_payload_shape() {
    let m = mem();
    header(&m, HDR, T_DISCARD, 0);
    let rt = RequestType::Discard;
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 24, R), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::BadDiscardPayload {
            req_type: rt,
            len: 24,
        },
        STATUS_IOERR,
    );
    expect_status_err(
        parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()),
        RequestError::BadDiscardPayload {
            req_type: rt,
            len: 0,
        },
        STATUS_IOERR,
    );
    let mut l = limits();
    l.max_discard_seg = 2;
    for i in 0..3 {
        discard_seg(&m, DATA + 16 * i, 0, 1, 0);
    }
    expect_status_err(
        parse(&m, &[(HDR, 16, R), (DATA, 48, R), (STATUS, 1, W)], &l),
        RequestError::TooManyDiscardSegments {
            req_type: rt,
            count: 3,
            max: 2,
        },
        STATUS_IOERR,
    );
    // Huge payload claims are refused before anything is read.
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (DATA, 0x8000_0000, R), (STATUS, 1, W)],
            &l,
        ),
        RequestError::TooManyDiscardSegments {
            req_type: rt,
            count: 0x800_0000,
            max: 2,
        },
        STATUS_IOERR,
    );
    // Payload outside memory.
    expect_status_err(
        parse(
            &m,
            &[(HDR, 16, R), (MEM_END, 16, R), (STATUS, 1, W)],
            &limits(),
        ),
        RequestError::DescriptorOutOfMemory {
            position: 1,
            addr: MEM_END,
            len: 16,
        },
        STATUS_IOERR,
    );
}

#[test]
fn discard_not_offered_is_unsupported() {
    let m = mem();
    let mut l = limits();
    l.max_discard_seg = 0;
    l.max_write_zeroes_seg = 0;
    discard_seg(&m, DATA, 0, 1, 0);
    for t in [T_DISCARD, T_WZ] {
        header(&m, HDR, t, 0);
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)], &l),
            RequestError::UnsupportedType(t),
            STATUS_UNSUPP,
        );
    }
}

// ---- type and device state ----

#[test]
fn unknown_request_types() {
    let m = mem();
    for t in [2u32, 3, 14, 16, 99, VIRTIO_BLK_T_IN | 0x8000_0000, u32::MAX] {
        header(&m, HDR, t, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::UnsupportedType(t),
            STATUS_UNSUPP,
        );
    }
}

#[test]
fn writes_on_read_only_device() {
    let m = mem();
    let mut l = limits();
    l.read_only = true;
    discard_seg(&m, DATA, 0, 1, 0);
    for (t, rt) in [
        (T_OUT, RequestType::Out),
        (T_DISCARD, RequestType::Discard),
        (T_WZ, RequestType::WriteZeroes),
    ] {
        header(&m, HDR, t, 0);
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], &l),
            RequestError::ReadOnly { req_type: rt },
            STATUS_IOERR,
        );
    }
    for (t, w) in [(T_IN, W), (T_FLUSH, W), (T_GET_ID, W)] {
        header(&m, HDR, t, 0);
        assert!(parse(&m, &[(HDR, 16, R), (DATA, 512, w), (STATUS, 1, W)], &l).is_ok());
    }
}

#[test]
fn write_status_helper() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let f = parse(
        &m,
        &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)],
        &limits(),
    )
    .unwrap_err();
    let (addr, status) = f.status().unwrap();
    assert!(write_status(&m, addr, status));
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        STATUS_IOERR
    );
    assert!(!write_status(&m, GuestAddress(MEM_END), STATUS_OK));
}

#[test]
fn request_type_mapping() {
    assert_eq!(RequestType::from(0), RequestType::In);
    assert_eq!(RequestType::from(1), RequestType::Out);
    assert_eq!(RequestType::from(4), RequestType::Flush);
    assert_eq!(RequestType::from(8), RequestType::GetId);
    assert_eq!(RequestType::from(11), RequestType::Discard);
    assert_eq!(RequestType::from(13), RequestType::WriteZeroes);
    assert_eq!(RequestType::from(5), RequestType::Unsupported(5));
}

// ---- random chains ----

fn arb_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..0x100).prop_map(|o| HDR + o),
        (0u64..0x2000).prop_map(|o| DATA + o),
        Just(STATUS),
        Just(ITABLE),
        (0u64..0x200).prop_map(|o| REGION_B - 0x100 + o),
        (0u64..0x200).prop_map(|o| MEM_END - 0x100 + o),
        (0u64..0x20).prop_map(|o| u64::MAX - o),
        any::<u64>(),
    ]
}

fn arb_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(8),
        Just(16),
        Just(17),
        Just(32),
        Just(48),
        Just(512),
        Just(513),
        Just(4096),
        Just(4097),
        0u32..0x3000,
        any::<u32>(),
    ]
}

fn arb_desc() -> impl Strategy<Value = RawDescriptor> {
    (
        arb_addr(),
        arb_len(),
        prop_oneof![
            Just(NEXT),
            Just(NEXT | WRITE),
            Just(WRITE),
            Just(0),
            Just(INDIRECT),
            any::<u16>()
        ],
        prop_oneof![0u16..8, any::<u16>()],
    )
        .prop_map(|(a, l, f, n)| raw(a, l, f, n))
}

/// A segment must lie within one region and its host pointer must be
/// that region's mapping of its guest address.
fn check_segment(m: &Mem, s: &Segment) {
    assert!(!s.is_empty());
    let region = m
        .find_region(s.guest_addr())
        .expect("segment start in memory");
    let last = s.guest_addr().0 + s.len() as u64 - 1;
    assert!(last <= region.last_addr().0, "segment crosses region end");
    assert_eq!(s.ptr(), m.get_host_address(s.guest_addr()).unwrap());
}

fn check_outcome(m: &Mem, res: Result<BlkRequest, RequestFailure>, cap: u64) -> bool {
    match res {
        Ok(r) => {
            let sum: u64 = r.data.iter().map(|s| s.len() as u64).sum();
            assert_eq!(sum, r.data_len);
            for s in &r.data {
                check_segment(m, s);
            }
            assert!(GuestMemoryBackend::check_range(m, r.status_addr, 1));
            assert!(r.writable_len >= 1);
            if matches!(r.req_type, RequestType::In | RequestType::Out) {
                assert_eq!(r.data_len % 512, 0);
                assert!(r.sector + r.num_sectors() <= cap);
            }
            for x in &r.ranges {
                assert!(x.sector + x.num_sectors as u64 <= cap);
            }
            assert!(!matches!(r.req_type, RequestType::Unsupported(_)));
            true
        }
        Err(f) => {
            assert_eq!(f.status_addr.is_some(), f.error.status().is_some());
            if let Some(a) = f.status_addr {
                assert!(GuestMemoryBackend::check_range(m, a, 1));
            }
            assert!(!f.to_string().is_empty());
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Well-framed chains (readable header first, writable status
    /// last) with random data descriptors, so the Ok paths and the
    /// address resolution get exercised too.
    #[test]
    fn random_framed_chains(
        data in proptest::collection::vec((arb_addr(), 0u32..0x1400, any::<bool>()), 0..5),
        status in prop_oneof![Just(STATUS), arb_addr()],
        t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13)],
        sector in prop_oneof![0u64..64, any::<u64>()],
        seg_max in 0u32..6,
    ) {
        let m = mem();
        header(&m, HDR, t, sector);
        let mut d = vec![(HDR, 16, R)];
        d.extend(data.iter().map(|&(a, l, w)| (a, l & !0x1ff, w)));
        d.push((status, 1, W));
        let mut l = Limits::new(4096);
        l.seg_max = seg_max;
        check_outcome(&m, parse(&m, &d, &l), 4096);
    }

    #[test]
    fn random_chains_never_panic(
        table in proptest::collection::vec(arb_desc(), 1..12),
        itable in proptest::collection::vec(arb_desc(), 0..6),
        head in 0u16..12,
        t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in prop_oneof![0u64..64, any::<u64>()],
        payload in proptest::collection::vec(any::<u8>(), 64),
        seg_max in 0u32..6,
        size_max in prop_oneof![Just(0u32), 1u32..8192],
        read_only in any::<bool>(),
    ) {
        let m = mem();
        header(&m, HDR, t, sector);
        m.write_slice(&payload, GuestAddress(DATA)).unwrap();
        for (i, d) in itable.iter().enumerate() {
            m.write_obj(*d, GuestAddress(ITABLE + 16 * i as u64)).unwrap();
        }
        let head = head % u16::try_from(table.len()).unwrap();
        let c = chain_raw(&m, 16, &table, head);
        let mut l = Limits::new(4096);
        l.seg_max = seg_max;
        l.size_max = size_max;
        l.read_only = read_only;
        l.max_discard_seg = 2;
        l.max_write_zeroes_seg = 2;
        check_outcome(&m, parse_request(&c, &l), 4096);
    }
}
