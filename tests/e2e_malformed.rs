//! A catalogue of malformed virtio-blk requests sent over the real socket.
//!
//! For each request: the status (or the absence of one) must be what the
//! spec says, or, where the spec leaves room, what qemu-storage-daemon
//! answers (the reference, recorded in the table); the malformed request
//! must change no byte of the disk files; and the device must keep
//! serving: a write and a read on the same connection afterwards work.
//!
//! qemu-storage-daemon 10.0 (libvhost-user) treats the requests it cannot
//! frame in two ways: a bad header or a missing status is logged and
//! dropped (never completed; the queue goes on), and a chain it cannot map
//! (loop, bad indirect table, address outside guest memory, status not
//! writable) makes it `vu_panic` and close the connection, which virtio 1.2
//! §2.1.2 allows (DEVICE_NEEDS_RESET). The table records that as `Dropped`
//! and `HungUp`; after a hang-up the test goes on over a new connection.
//! Our daemon must do neither: it answers with a status when it has a
//! place for one, otherwise gives the chain back with used length 0, and
//! goes on serving the same connection.
//!
//! Run with `--nocapture` to see what each peer answered.

mod common;

use std::path::PathBuf;
use std::time::Duration;
use vhost_user_cow::units::to_usize;

use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::{assert_changes_within, make_cow, write_footprint, Model, SECTOR};
use common::vhost_frontend::*;

const SECTORS: u64 = 4096;

/// How long to wait before calling a request dropped. Only reached when a
/// device stops answering (qsd's broken device, or a bug in ours).
const DROP_WAIT: Duration = Duration::from_secs(3);

crate::per_peer!(malformed_catalogue);

/// What happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// In the used ring; the status byte if the device wrote it.
    Done { status: Option<u8>, used_len: u32 },
    /// Never completed (the device stopped processing the queue).
    NoCompletion,
    /// The backend closed the connection.
    Disconnected,
}

/// An accepted outcome.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// This status, with this used length (None: any).
    Status(u8, Option<u32>),
    /// Completed without a status byte and with used length 0: there was
    /// nowhere valid to put a status (the request is dropped but the chain
    /// given back, so the driver and the queue are not stuck).
    Returned,
    /// Never completed, but the device goes on serving the queue.
    Dropped,
    /// The device closed the connection (it stopped serving it: virtio's
    /// DEVICE_NEEDS_RESET).
    HungUp,
}

impl Want {
    fn accepts(self, o: Outcome) -> bool {
        match (self, o) {
            (Want::Status(s, len), Outcome::Done { status, used_len }) => {
                status == Some(s) && len.is_none_or(|l| l == used_len)
            }
            (
                Want::Returned,
                Outcome::Done {
                    status: None,
                    used_len: 0,
                },
            ) => true,
            (Want::Dropped, Outcome::NoCompletion) => true,
            (Want::HungUp, Outcome::Disconnected) => true,
            _ => false,
        }
    }
}

const OK1: Want = Want::Status(S_OK, Some(1));
const IOERR: Want = Want::Status(S_IOERR, Some(1));
const UNSUPP: Want = Want::Status(S_UNSUPP, Some(1));

struct Ctx {
    capacity: u64,
    seg_max: u32,
    max_discard_seg: u32,
    queue_size: u16,
    /// One past the last byte of guest memory (all regions).
    mem_end: u64,
    /// Start of the second region, adjacent to the main one (its end).
    adjacent: u64,
    /// Start of the hole after the second region.
    hole: u64,
    /// Start of the third region, after the hole.
    far: u64,
}

/// Guest memory of the catalogue's frontend: the main region (rings and
/// buffers), a second one right after it, a hole, a third one.
const REGION: u64 = 1 << 20;
const EXTRA_REGIONS: [(u64, u64); 2] = [(0, REGION), (REGION, REGION)];

struct Case {
    name: &'static str,
    submit: fn(&mut VhostUserBlk, &Ctx) -> Pending,
    /// qemu-storage-daemon 10.0's answer (the reference).
    qsd: Want,
    /// What ours may answer.
    ours: &'static [Want],
    /// Why: the spec clause, or "qsd reference" where the spec leaves room.
    why: &'static str,
}

fn catalogue() -> Vec<Case> {
    vec![
        Case {
            name: "header shorter than 16 bytes",
            submit: |d, _| {
                d.chain()
                    .readable(&header(T_IN, 0)[..8])
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::Dropped,
            ours: &[IOERR],
            why: "virtio 1.2 §5.2.6.1: a 16-byte device-readable header; qsd logs \"outhdr too short\" and drops it (no used entry) but goes on; ours: IOERR",
        },
        Case {
            name: "header in a write-only descriptor",
            submit: |d, _| {
                let h = d.place(&header(T_IN, 0));
                d.chain().desc(h, 16, true).writable(512).status().submit(0)
            },
            qsd: Want::Dropped,
            ours: &[IOERR],
            why: "virtio 1.2 §5.2.6.1: the header is device-readable; qsd drops it as outhdr too short; ours: IOERR",
        },
        Case {
            name: "no status descriptor (all device-readable)",
            submit: |d, _| {
                d.chain()
                    .header(T_OUT, 0)
                    .readable(&[0x11; 512])
                    .submit(0)
            },
            qsd: Want::Dropped,
            ours: &[Want::Returned],
            why: "virtio 1.2 §5.2.6: the status is the last, device-writable byte; there is none, so no status can be given; qsd drops it; ours gives the chain back with used len 0",
        },
        Case {
            name: "status in a device-readable descriptor",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .status_with(0)
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.4.2: the device must not write a device-readable buffer; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "status descriptor of length 0",
            submit: |d, _| {
                let s = d.place(&[STATUS_UNTOUCHED]);
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .desc(s, 0, true)
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "no status byte exists; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "zero-length data (read)",
            submit: |d, _| d.chain().header(T_IN, 0).status().submit(0),
            qsd: OK1,
            ours: &[OK1],
            why: "spec silent; qsd reference: a no-op, OK",
        },
        Case {
            name: "zero-length data (write)",
            submit: |d, c| d.chain().header(T_OUT, c.capacity).status().submit(0),
            qsd: OK1,
            ours: &[OK1],
            why: "spec silent; qsd reference: a no-op, OK (even at sector = capacity)",
        },
        Case {
            name: "length not a multiple of 512",
            submit: |d, _| {
                d.chain()
                    .header(T_OUT, 8)
                    .readable(&[0x22; 100])
                    .status()
                    .submit(0)
            },
            qsd: IOERR,
            ours: &[IOERR],
            why: "virtio 1.2 §5.2.6.1 (multiples of 512); qsd reference: IOERR, nothing written",
        },
        Case {
            name: "sector beyond capacity",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, c.capacity)
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::Status(S_IOERR, Some(513)),
            ours: &[Want::Status(S_IOERR, None)],
            why: "virtio 1.2 §5.2.6.1 (the driver must not go past capacity); qsd reference: IOERR (its used len counts the whole writable buffer; ours may say 1)",
        },
        Case {
            name: "write straddling the end of the disk",
            submit: |d, c| {
                d.chain()
                    .header(T_OUT, c.capacity - 1)
                    .readable(&[0x33; 1024])
                    .status()
                    .submit(0)
            },
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR and the last sector is not written",
        },
        Case {
            name: "sector + length overflowing u64",
            submit: |d, _| {
                d.chain()
                    .header(T_OUT, u64::MAX - 1)
                    .readable(&[0x44; 1024])
                    .status()
                    .submit(0)
            },
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR",
        },
        Case {
            name: "data descriptor outside guest memory",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.mem_end + 0x1000, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "virtio 1.2 §2.1.2 lets the device need a reset; qsd: vu_panic, hangs up; ours: keep serving (IOERR, or chain back)",
        },
        Case {
            name: "descriptor loop",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .link_last_to(Next::Chain(0))
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.5.2: no chain longer than the queue; qsd: vu_panic \"Looped descriptor\", hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "indirect table of bad length (24 bytes)",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .status()
                    .into_indirect(Some(24))
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.5.3.1: the table length is a multiple of 16; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "more data segments than seg_max",
            submit: |d, c| {
                let mut ch = d.chain().header(T_IN, 0);
                for _ in 0..=c.seg_max {
                    ch = ch.writable(512);
                }
                ch.status().into_indirect(None).submit(0)
            },
            qsd: Want::Status(S_OK, Some(127 * 512 + 1)),
            ours: &[IOERR],
            why: "virtio 1.2 §5.2.3 (seg_max is a limit for the driver); qsd (seg_max 126) serves it anyway; ours enforces its seg_max: IOERR",
        },
        Case {
            name: "discard with unknown flags",
            submit: |d, _| d.submit_discard(0, &[(0, 8, 0x2)]),
            qsd: UNSUPP,
            ours: &[UNSUPP],
            why: "virtio 1.2 §5.2.6.2: UNSUPP for discard/write zeroes with unknown flags",
        },
        Case {
            name: "discard with the unmap flag",
            submit: |d, _| d.submit_discard(0, &[(0, 8, WRITE_ZEROES_FLAG_UNMAP)]),
            qsd: UNSUPP,
            ours: &[UNSUPP],
            why: "virtio 1.2 §5.2.6.2: UNSUPP for a discard with the unmap flag set",
        },
        Case {
            name: "write zeroes with unknown flags",
            submit: |d, _| {
                let seg = dwz_segment(0, 8, 0x4);
                d.chain()
                    .header(T_WRITE_ZEROES, 0)
                    .readable(&seg)
                    .status()
                    .submit(0)
            },
            qsd: UNSUPP,
            ours: &[UNSUPP],
            why: "virtio 1.2 §5.2.6.2: UNSUPP for unknown flags",
        },
        Case {
            name: "discard beyond capacity",
            submit: |d, c| d.submit_discard(0, &[(c.capacity - 4, 8, 0)]),
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR",
        },
        Case {
            name: "discard payload not a multiple of 16 bytes",
            submit: |d, _| {
                d.chain()
                    .header(T_DISCARD, 0)
                    .readable(&dwz_segment(0, 8, 0)[..10])
                    .status()
                    .submit(0)
            },
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR",
        },
        Case {
            name: "GET_ID with a 1-byte buffer",
            submit: |d, _| d.submit_get_id(0, 1),
            qsd: Want::Status(S_OK, Some(2)),
            ours: &[Want::Status(S_OK, Some(2))],
            why: "virtio 1.2 §5.2.6: the id is up to 20 bytes; qsd reference: OK, 1 byte written",
        },
        Case {
            name: "unknown request type",
            submit: |d, _| d.chain().header(0x99, 0).status().submit(0),
            qsd: UNSUPP,
            ours: &[UNSUPP],
            why: "virtio 1.2 §5.2.6: UNSUPP for an unsupported request",
        },
        Case {
            name: "read with a device-readable data buffer",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .readable(&[0x55; 512])
                    .status()
                    .submit(0)
            },
            qsd: OK1,
            ours: &[IOERR, OK1],
            why: "virtio 1.2 §2.7.4 (device must not write it); qsd reference: ignores it, OK",
        },
        // Guest memory: outside it, and across region boundaries.
        Case {
            name: "data descriptor at guest address 0",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(0, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "below guest memory (it starts at 1 MiB); qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "data descriptor straddling the end of guest memory",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.mem_end - 256, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "the last 256 bytes are memory, the rest is not; qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "data descriptor straddling two adjacent regions",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.adjacent - 256, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[Want::Status(S_OK, Some(513))],
            why: "guest-physically contiguous, so valid (virtio has no notion of regions); both split it at the boundary: OK",
        },
        Case {
            name: "data descriptor straddling a region and a hole",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.hole - 256, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "the second half is in no region; qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "data descriptor in the hole between regions",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.hole + 0x1000, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "between two regions; qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "data descriptor in the region after the hole",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(c.far, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[Want::Status(S_OK, Some(513))],
            why: "valid: memory above a hole is memory; OK on both",
        },
        Case {
            name: "descriptor whose address + length wraps",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .desc(u64::MAX - 255, 512, true)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "addr + len overflows u64; qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "header outside guest memory",
            submit: |d, c| {
                d.chain()
                    .desc(c.mem_end + 0x1000, 16, false)
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "qsd: vu_panic, hangs up; ours: keep serving",
        },
        Case {
            name: "status byte outside guest memory",
            submit: |d, c| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .desc(c.mem_end + 0x10, 1, true)
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "nowhere to put the status; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        // Chains: order, links, length.
        Case {
            name: "NEXT pointing past the descriptor table",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .link_last_to(Next::Table(1000))
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.5: next must be a table index; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "device-readable descriptor after a writable one",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .readable(&[0x66; 512])
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[IOERR, Want::Returned],
            why: "virtio 1.2 §2.7.4.2: readable descriptors come first; qsd: vu_panic (incorrect order), hangs up; ours: keep serving",
        },
        Case {
            name: "empty descriptor between data descriptors",
            submit: |d, _| {
                let z = d.place_zeroed(16);
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .desc(z, 0, true)
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Status(S_OK, Some(1025))],
            why: "spec silent; qsd: vu_panic (zero-sized buffer), hangs up; ours: a zero-length buffer holds nothing, OK",
        },
        Case {
            name: "chain longer than the queue size (indirect)",
            submit: |d, c| {
                let mut ch = d.chain().header(T_IN, 0);
                for _ in 0..c.queue_size {
                    ch = ch.writable(512);
                }
                ch.status().into_indirect(None).submit(0)
            },
            qsd: Want::Status(S_OK, Some(256 * 512 + 1)),
            ours: &[IOERR, Want::Returned],
            why: "virtio 1.2 §2.7.5.3.1: no chain longer than the queue size (257 descriptors in a table, queue size 256); qsd serves it: OK; ours: IOERR (its seg_max)",
        },
        // Indirect tables.
        Case {
            name: "indirect table of length 0",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .status()
                    .into_indirect(Some(0))
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.5.3.1: a table of at least one descriptor; qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "indirect table outside guest memory",
            submit: |d, c| {
                d.chain()
                    .raw(RawDesc {
                        addr: c.mem_end + 0x1000,
                        len: 48,
                        flags: VIRTQ_DESC_F_INDIRECT,
                        next: Next::Table(0),
                    })
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "qsd: vu_panic, hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "indirect table inside an indirect table",
            submit: |d, _| {
                let (t, inner, st) = read_as_indirect_table(d);
                d.chain()
                    .raw(RawDesc {
                        addr: t,
                        len: u32::try_from(inner.len()).unwrap(),
                        flags: VIRTQ_DESC_F_INDIRECT,
                        next: Next::Table(0),
                    })
                    .into_indirect(None)
                    .status_at(st)
                    .submit(0)
            },
            qsd: Want::Dropped,
            ours: &[Want::Returned],
            why: "virtio 1.2 §2.7.5.3.1: no INDIRECT flag inside a table; qsd drops it (no used entry) and goes on; ours: chain back, used len 0",
        },
        Case {
            name: "loop inside an indirect table",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .status()
                    .link_last_to(Next::Chain(0))
                    .into_indirect(None)
                    .submit(0)
            },
            qsd: Want::HungUp,
            ours: &[Want::Returned],
            why: "qsd: vu_panic (loop), hangs up; ours: chain back, used len 0",
        },
        Case {
            name: "indirect descriptor with NEXT set too",
            submit: |d, _| {
                d.chain()
                    .header(T_IN, 0)
                    .writable(512)
                    .status()
                    .into_indirect(None)
                    .writable(512)
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[Want::Status(S_OK, Some(513))],
            why: "virtio 1.2 §2.7.5.3.1: the driver must not set both; both serve the table and ignore NEXT: OK",
        },
        Case {
            name: "indirect descriptor marked device-writable",
            submit: |d, _| {
                let (t, table, st) = read_as_indirect_table(d);
                d.chain()
                    .raw(RawDesc {
                        addr: t,
                        len: u32::try_from(table.len()).unwrap(),
                        flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE,
                        next: Next::Table(0),
                    })
                    .status_at(st)
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[Want::Status(S_OK, Some(513))],
            why: "virtio 1.2 §2.7.5.3.2: the device ignores the write flag of an INDIRECT descriptor; both: OK",
        },
        // Request types with the wrong buffers.
        Case {
            name: "flush with a sector number",
            submit: |d, _| d.chain().header(T_FLUSH, 77).status().submit(0),
            qsd: OK1,
            ours: &[OK1],
            why: "virtio 1.2 §5.2.6.1: sector is reserved for flush (ignored); both: OK",
        },
        Case {
            name: "flush carrying a data buffer",
            submit: |d, _| {
                d.chain()
                    .header(T_FLUSH, 0)
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[OK1, IOERR],
            why: "spec silent; qsd: OK, used len counts the buffer; ours: OK, used len 1",
        },
        Case {
            name: "write whose data is device-writable",
            submit: |d, _| {
                d.chain()
                    .header(T_OUT, 8)
                    .writable(512)
                    .status()
                    .submit(0)
            },
            qsd: Want::Status(S_OK, Some(513)),
            ours: &[IOERR],
            why: "virtio 1.2 §5.2.6: OUT data is device-readable; qsd writes nothing and says OK; ours: IOERR; either way no byte written",
        },
        Case {
            name: "GET_ID with no buffer",
            submit: |d, _| d.chain().header(T_GET_ID, 0).status().submit(0),
            qsd: OK1,
            ours: &[OK1, IOERR],
            why: "no room for the id; qsd and ours: OK, nothing written",
        },
        Case {
            name: "GET_ID with a device-readable buffer",
            submit: |d, _| {
                d.chain()
                    .header(T_GET_ID, 0)
                    .readable(&[0; 20])
                    .status()
                    .submit(0)
            },
            qsd: OK1,
            ours: &[OK1, IOERR],
            why: "the id buffer must be device-writable; qsd and ours: OK, the readable buffer ignored",
        },
        Case {
            name: "discard of 0 sectors",
            submit: |d, _| d.submit_discard(0, &[(8, 0, 0)]),
            qsd: OK1,
            ours: &[OK1],
            why: "spec silent; a no-op",
        },
        Case {
            name: "more discard segments than max_discard_seg",
            submit: |d, c| {
                let ranges: Vec<(u64, u32, u32)> =
                    (0..=c.max_discard_seg).map(|i| (8 * u64::from(i), 8, 0)).collect();
                d.submit_discard(0, &ranges)
            },
            qsd: UNSUPP,
            ours: &[IOERR, UNSUPP],
            why: "virtio 1.2 §5.2.6.2 (max_discard_seg: qsd 1, ours 32); qsd: UNSUPP; ours: IOERR; nothing discarded",
        },
        Case {
            name: "write zeroes beyond capacity",
            submit: |d, c| d.submit_write_zeroes(0, &[(c.capacity - 4, 8)], false),
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR, nothing zeroed",
        },
        Case {
            name: "write zeroes payload not a multiple of 16 bytes",
            submit: |d, _| {
                d.chain()
                    .header(T_WRITE_ZEROES, 0)
                    .readable(&dwz_segment(0, 8, 0)[..12])
                    .status()
                    .submit(0)
            },
            qsd: IOERR,
            ours: &[IOERR],
            why: "qsd reference: IOERR",
        },
    ]
}

/// A one-sector read (header, data, status) placed as an indirect table:
/// its guest address, its bytes, and the status byte's address.
fn read_as_indirect_table(d: &mut VhostUserBlk) -> (u64, Vec<u8>, u64) {
    let h = d.place(&header(T_IN, 0));
    let data = d.place_zeroed(512);
    let st = d.place(&[STATUS_UNTOUCHED]);
    let table = indirect_table(&[
        RawDesc {
            addr: h,
            len: 16,
            flags: VIRTQ_DESC_F_NEXT,
            next: Next::Chain(1),
        },
        RawDesc {
            addr: data,
            len: 512,
            flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            next: Next::Chain(2),
        },
        RawDesc {
            addr: st,
            len: 1,
            flags: VIRTQ_DESC_F_WRITE,
            next: Next::Table(0),
        },
    ]);
    (d.place(&table), table, st)
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn outcome(r: Result<Completion, WaitError>) -> Outcome {
    match r {
        Ok(c) => Outcome::Done {
            status: c.status,
            used_len: c.used_len,
        },
        Err(WaitError::Timeout { .. }) => Outcome::NoCompletion,
        Err(WaitError::Disconnected { .. }) => Outcome::Disconnected,
    }
}

fn connect(d: &Daemon) -> VhostUserBlk {
    d.connect_with(FrontendOptions {
        timeout: DROP_WAIT,
        extra_regions: EXTRA_REGIONS.to_vec(),
        ..FrontendOptions::default()
    })
}

/// A one-sector write and its read-back through `dev`; the files may
/// change only in that sector's footprint.
fn canary(
    d: &Daemon,
    dev: &mut VhostUserBlk,
    model: &mut Model,
    sector: u64,
    byte: u8,
) -> Result<(), String> {
    let files = d.writable_files();
    let before = snapshot(&files);
    let data = vec![byte; SECTOR];
    let w = dev.submit_write(0, sector, &data);
    match dev.wait(&w).map_err(|e| format!("canary write: {e}"))? {
        c if c.status == Some(S_OK) => {}
        c => return Err(format!("canary write: {c:?}")),
    }
    model.write(sector, &data);
    let r = dev.submit_read(0, sector, SECTOR);
    let c = dev.wait(&r).map_err(|e| format!("canary read: {e}"))?;
    if c.status != Some(S_OK) || c.data != data {
        return Err(format!("canary read: status {:?}, data differs", c.status));
    }
    let allowed = write_footprint(&d.image, d.peer, sector, 1);
    for (f, (b, a)) in files.iter().zip(before.iter().zip(snapshot(&files))) {
        assert_changes_within(b, &a, &allowed, &format!("canary write to {}", f.display()));
    }
    Ok(())
}

fn malformed_catalogue(peer: Peer) {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-malformed-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0xbad);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let files: Vec<PathBuf> = [d.writable_files(), d.read_only_files()].concat();
    let mut failures = Vec::new();
    let mut table = String::new();
    let mut dev = connect(&d);
    for (i, case) in catalogue().iter().enumerate() {
        let ctx = Ctx {
            capacity: dev.config.capacity,
            seg_max: dev.config.seg_max,
            max_discard_seg: dev.config.max_discard_seg,
            queue_size: dev.opts.queue_size,
            mem_end: dev.mem().end(),
            adjacent: dev.mem().main_end(),
            hole: dev.mem().main_end() + REGION,
            far: dev.mem().main_end() + 2 * REGION,
        };
        assert_eq!(ctx.capacity, SECTORS);
        let before = snapshot(&files);
        let p = (case.submit)(&mut dev, &ctx);
        let got = outcome(dev.wait(&p));
        let ok = match peer {
            Peer::Ours => case.ours.iter().any(|w| w.accepts(got)),
            Peer::Qsd => case.qsd.accepts(got),
        };
        table.push_str(&format!("{:<45} {:?}\n", case.name, got));
        if !ok {
            let want = match peer {
                Peer::Ours => format!("{:?}", case.ours),
                Peer::Qsd => format!("{:?}", case.qsd),
            };
            failures.push(format!(
                "{}: got {got:?}, want {want} ({})",
                case.name, case.why
            ));
        }
        if snapshot(&files) != before {
            failures.push(format!("{}: the disk files changed", case.name));
        }
        // Keep serving: on the same connection unless the device broke (qsd).
        if got == Outcome::Disconnected {
            // qsd serves one connection at a time: hang up first.
            drop(dev);
            dev = connect(&d);
        }
        let sector = 64 + 8 * i as u64;
        if let Err(e) = canary(
            &d,
            &mut dev,
            &mut model,
            sector,
            u8::try_from(i + 1).unwrap(),
        ) {
            failures.push(format!("{}: afterwards, {e}", case.name));
            drop(dev);
            dev = connect(&d);
        }
    }
    eprintln!("{peer:?} answers:\n{table}");
    drop(dev);
    // A fresh connection sees every canary and the untouched rest.
    let mut dev = connect(&d);
    let all = dev
        .read(0, 0, to_usize(SECTORS) * SECTOR)
        .ok("whole disk after the catalogue");
    model.check(0, &all, "whole disk after the catalogue");
    d.terminate_ok();
    assert!(
        failures.is_empty(),
        "{peer:?}:\n{}\n\nall answers:\n{table}",
        failures.join("\n")
    );
}
