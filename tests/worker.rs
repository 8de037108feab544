//! In-process backend tests of `Worker` (src/daemon/worker.rs), in the
//! style of rust-vmm's vhost-device crates: real guest memory, a split
//! ring laid out by hand, a real disk in a tempdir, and a fake I/O engine
//! whose completions the test orders (tests/worker_support/). Each test
//! drives the worker's steps in the order of `WorkerLoop::run`.

mod worker_support;

use std::collections::BTreeSet;

use vhost_user_cow::daemon::worker::RingMode;
use worker_support::engine::{Class, Event, Failure, OpInfo};
use worker_support::guest::{Req, FLAG_UNMAP, S_IOERR, S_OK, T_DISCARD, T_WRITE_ZEROES, UNTOUCHED};
use worker_support::{all_in_order, all_reversed, oldest, patterned, DiskKind, Harness};

const MIB: u64 = 1 << 20;
const RAW: DiskKind = DiskKind::Raw { len: 4 * MIB };
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn mode(writethrough: bool) -> RingMode {
    RingMode {
        event_idx: false,
        writethrough,
    }
}

/// Deterministic data distinct per `seed`.
fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(7).wrapping_add(seed) ^ 0xc3)
        .collect()
}

/// Pick: complete nothing, so the run stops where the loop would wait for
/// the engine and the test can look at (or complete) what is pending.
fn hold(_: &[OpInfo]) -> Vec<usize> {
    Vec::new()
}

fn position(log: &[Event], f: impl Fn(&Event) -> bool) -> Vec<usize> {
    log.iter()
        .enumerate()
        .filter(|(_, e)| f(e))
        .map(|(i, _)| i)
        .collect()
}

fn accepted(log: &[Event], class: Class) -> Vec<OpInfo> {
    log.iter()
        .filter_map(|e| match e {
            Event::Accepted(i) if i.class == class => Some(*i),
            _ => None,
        })
        .collect()
}

/// Where operation `user_data` completed in the log.
fn completed_at(log: &[Event], user_data: u64) -> usize {
    let at = position(
        log,
        |e| matches!(e, Event::Completed(i, _) if i.user_data == user_data),
    );
    assert_eq!(at.len(), 1, "op {user_data} completed {} times", at.len());
    at[0]
}

fn accepted_at(log: &[Event], user_data: u64) -> usize {
    let at = position(
        log,
        |e| matches!(e, Event::Accepted(i) if i.user_data == user_data),
    );
    assert_eq!(at.len(), 1, "op {user_data} accepted {} times", at.len());
    at[0]
}

// ---------------------------------------------------------------------
// 1. Writethrough: a request that changed data completes only after an
// fdatasync issued after its data operations completed.

/// Runs one data-changing request on a raw image, with and without
/// writethrough, and checks where the fdatasync falls. `is_data` tells
/// the request's data operations apart.
fn writethrough_case(make: impl Fn(&mut Harness) -> Req, is_data: impl Fn(&Class) -> bool) {
    for writethrough in [false, true] {
        let mut h = Harness::new(RAW, 8, mode(writethrough));
        let r = make(&mut h);
        h.kick();
        h.run(all_in_order);
        assert_eq!(h.guest.status(&r), S_OK);
        assert!(h.idle());
        let log = h.log();
        let published = h.published_at(r.head).expect("request never published");
        let data_done = position(
            &log,
            |e| matches!(e, Event::Completed(i, Ok(_)) if is_data(&i.class)),
        );
        assert!(!data_done.is_empty(), "no data operation: {log:?}");
        let syncs = accepted(&log, Class::Sync);
        if !writethrough {
            // Control: with the write cache on, nothing syncs, so the
            // sync below can only come from writethrough.
            assert!(syncs.is_empty(), "sync without writethrough: {log:?}");
            continue;
        }
        assert_eq!(syncs.len(), 1, "one flush per request: {log:?}");
        let sync = syncs[0].user_data;
        let last_data = *data_done.last().unwrap();
        assert!(
            accepted_at(&log, sync) > last_data,
            "the flush was issued before the data was written: {log:?}"
        );
        assert!(
            completed_at(&log, sync) < published,
            "the request completed before its flush did: {log:?}"
        );
    }
}

#[test]
fn writethrough_out_completes_after_a_flush_of_its_write() {
    writethrough_case(
        |h| h.guest.write(64, &data(1, 4096)),
        |c| *c == Class::GuestWrite,
    );
}

#[test]
fn writethrough_write_zeroes_completes_after_a_flush() {
    writethrough_case(
        |h| {
            h.guest
                .zeroing(T_WRITE_ZEROES, &[(64, 8, 0), (128, 8, FLAG_UNMAP)])
        },
        |c| matches!(c, Class::Fallocate { .. }),
    );
}

#[test]
fn writethrough_discard_completes_after_a_flush() {
    writethrough_case(
        |h| h.guest.zeroing(T_DISCARD, &[(64, 8, 0)]),
        |c| matches!(c, Class::Fallocate { .. }),
    );
}

// ---------------------------------------------------------------------
// 2. Short reads: the tail of the guest buffer reads zeros, not what was
// in the buffer before.

#[test]
fn read_past_a_backing_eof_inside_a_sector_reads_zeros() {
    // The backing file ends 100 bytes into the disk's last sector (4096).
    let backing_len = 2 * MIB + 100;
    let mut h = Harness::new(
        DiskKind::Cow {
            backing_len,
            sectorsize: 512,
        },
        8,
        mode(false),
    );
    assert_eq!(h.dev.sectors, 4097);
    // Sector 4094 in the COW file, so the read has a COW extent first and
    // the backing extent starts 512 bytes into the guest buffers.
    let mine = data(2, 512);
    let w = h.guest.write(4094, &mine);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&w), S_OK);
    // Three buffers, so the zeroed tail starts inside the second and
    // spans into the third.
    let r = h.guest.read(4094, &[700, 300, 536], 0xAA);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&r), S_OK);
    let got = h.guest.data(&r);
    let backing_fd = h.dev.backing_fd();
    let log = h.log();
    let short = log.iter().any(|e| {
        matches!(e, Event::Completed(i, Ok(612))
            if i.class == (Class::GuestRead { fd: backing_fd }) && i.offset == 4095 * 512)
    });
    assert!(short, "no short backing read: {log:?}");
    assert_eq!(&got[..512], &mine[..]);
    assert_eq!(&got[512..1124], &patterned(4095 * 512, 612)[..]);
    assert!(
        got[1124..].iter().all(|&b| b == 0),
        "stale bytes past the EOF from {:?}",
        got[1124..].iter().position(|&b| b != 0).map(|p| p + 1124)
    );
}

#[test]
fn short_read_from_the_engine_is_zero_filled() {
    let mut h = Harness::new(RAW, 8, mode(false));
    h.engine().short_read = Some(700);
    let r = h.guest.read(16, &[1000, 1000, 2096], 0xAA);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&r), S_OK);
    let got = h.guest.data(&r);
    assert_eq!(&got[..700], &patterned(16 * 512, 700)[..]);
    assert!(
        got[700..].iter().all(|&b| b == 0),
        "stale bytes after a short read at {:?}",
        got[700..].iter().position(|&b| b != 0).map(|p| p + 700)
    );
}

// ---------------------------------------------------------------------
// 3 and 4. Copy-up through bounce buffers.

const COW_512: DiskKind = DiskKind::Cow {
    backing_len: 2 * MIB,
    sectorsize: 512,
};
const COW_4K: DiskKind = DiskKind::Cow {
    backing_len: 2 * MIB,
    sectorsize: 4096,
};

fn expected_chunk_1(mine: &[u8]) -> Vec<u8> {
    let mut want = patterned(8 * 512, 4096);
    want[512..1024].copy_from_slice(mine);
    want
}

#[test]
fn partial_write_into_an_unset_chunk_copies_up_through_bounce_buffers() {
    let mut h = Harness::new(COW_4K, 8, mode(false));
    // Sector 9 is the second sector of chunk 1 (sectors 8..16).
    let mine = data(3, 512);
    let w = h.guest.write(9, &mine);
    h.kick();
    h.run(hold);
    let pending: Vec<(Class, u64, u64)> = h
        .engine()
        .pending()
        .iter()
        .map(|i| (i.class, i.offset, i.len))
        .collect();
    let reads: Vec<(u64, u64)> = pending
        .iter()
        .filter(|p| p.0 == Class::CopyRead)
        .map(|p| (p.1, p.2))
        .collect();
    assert_eq!(reads, vec![(8 * 512, 512), (10 * 512, 3072)], "{pending:?}");
    assert_eq!(h.worker.bounce_buffers(), 2);
    // Out of order: the guest write and the second copy first.
    h.run(all_reversed);
    assert_eq!(h.guest.status(&w), S_OK);
    assert!(h.idle());
    assert_eq!(h.worker.bounce_buffers(), 0);
    assert_eq!(h.dev.sched().copy_up_records(), 0);
    let log = h.log();
    let copy_reads = accepted(&log, Class::CopyRead);
    let copy_writes = accepted(&log, Class::CopyWrite);
    assert_eq!(copy_writes.len(), 2, "{log:?}");
    let guest_write = accepted(&log, Class::GuestWrite);
    assert_eq!(guest_write.len(), 1);
    let data_offset = guest_write[0].offset - 9 * 512;
    // Each copy is written where it belongs, only after it was read.
    let mut pairs = Vec::new();
    for w in &copy_writes {
        let r = copy_reads
            .iter()
            .find(|r| data_offset + r.offset == w.offset)
            .expect("a copy write without its read");
        assert_eq!(w.len, r.len);
        assert!(accepted_at(&log, w.user_data) > completed_at(&log, r.user_data));
        pairs.push((r.offset / 512, r.len));
    }
    pairs.sort();
    assert_eq!(pairs, vec![(8, 512), (10, 3072)]);
    // Rule 1 with copy-up: the bit goes out after the whole chunk's data.
    let bitmap = accepted(&log, Class::BitmapWrite);
    assert_eq!(bitmap.len(), 1);
    let bitmap_at = accepted_at(&log, bitmap[0].user_data);
    for op in copy_writes.iter().chain(&guest_write) {
        assert!(completed_at(&log, op.user_data) < bitmap_at, "{log:?}");
    }
    assert_eq!(h.read_back(8, 8), expected_chunk_1(&mine));
    // The chunk is in the COW file now, its neighbours are not.
    let back = h.read_back(0, 24);
    assert_eq!(&back[..4096], &patterned(0, 4096)[..]);
    assert_eq!(&back[8192..], &patterned(8192, 4096)[..]);
}

/// A copy-up operation whose submission fails (not Full) fails its request
/// and frees its bounce buffer; the chunk can be written afterwards.
fn copy_up_submit_error(class: Class, failure: Failure) {
    let mut h = Harness::new(COW_4K, 8, mode(false));
    h.engine().fail.push((class, failure));
    let w = h.guest.write(9, &data(4, 512));
    h.kick();
    h.run(all_in_order);
    let log = h.log();
    assert!(
        log.iter()
            .any(|e| matches!(e, Event::Failed(i) if i.class == class)),
        "the failure was not injected: {log:?}"
    );
    assert_eq!(h.guest.status(&w), S_IOERR);
    assert!(h.idle());
    assert_eq!(
        h.worker.bounce_buffers(),
        0,
        "a bounce buffer outlived its failed submission"
    );
    assert_eq!(h.dev.sched().copy_up_records(), 0);
    // The failed write left no record behind: the same chunk copies up.
    let mine = data(5, 512);
    let again = h.guest.write(9, &mine);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&again), S_OK);
    assert_eq!(h.worker.bounce_buffers(), 0);
    assert_eq!(h.read_back(8, 8), expected_chunk_1(&mine));
}

#[test]
fn copy_read_submit_error_frees_its_bounce_buffer() {
    copy_up_submit_error(Class::CopyRead, Failure::Invalid);
}

#[test]
fn copy_write_submit_error_frees_its_bounce_buffer() {
    copy_up_submit_error(Class::CopyWrite, Failure::Io);
}

// ---------------------------------------------------------------------
// 5. WRITE_ZEROES: each range's own UNMAP flag chooses how it is zeroed.

#[test]
fn write_zeroes_ranges_on_a_raw_image_use_their_own_unmap_flag() {
    let mut h = Harness::new(RAW, 8, mode(false));
    // Both orders: the flag of neither the first nor the last range may
    // leak onto the other.
    let a = h
        .guest
        .zeroing(T_WRITE_ZEROES, &[(100, 8, 0), (200, 8, FLAG_UNMAP)]);
    let b = h
        .guest
        .zeroing(T_WRITE_ZEROES, &[(300, 8, FLAG_UNMAP), (400, 8, 0)]);
    let d = h.guest.zeroing(T_DISCARD, &[(500, 8, 0)]);
    h.kick();
    h.run(all_in_order);
    for r in [&a, &b, &d] {
        assert_eq!(h.guest.status(r), S_OK);
    }
    let modes: BTreeSet<(u64, i32, u64)> = h
        .log()
        .iter()
        .filter_map(|e| match e {
            Event::Accepted(OpInfo {
                class: Class::Fallocate { mode },
                offset,
                len,
                ..
            }) => Some((offset / 512, *mode, *len)),
            _ => None,
        })
        .collect();
    let want = BTreeSet::from([
        (100, ZERO_RANGE, 4096),
        (200, PUNCH, 4096),
        (300, PUNCH, 4096),
        (400, ZERO_RANGE, 4096),
        (500, PUNCH, 4096),
    ]);
    assert_eq!(modes, want);
    for s in [100, 200, 300, 400, 500] {
        assert_eq!(h.read_back(s, 8), vec![0u8; 4096], "sector {s}");
        assert_eq!(h.read_back(s - 1, 1), patterned((s - 1) * 512, 512));
        assert_eq!(h.read_back(s + 8, 1), patterned((s + 8) * 512, 512));
    }
}

// ---------------------------------------------------------------------
// 6. Backpressure: a capacity-1 engine, more requests than the worker
// takes at once.

#[test]
fn backpressure_leaves_descriptors_in_the_ring_and_takes_them_later() {
    // COW writes need two operations each (data, then its bitmap write),
    // so with room for one operation the engine keeps refusing: refused
    // data operations and parked bitmap writes both come back.
    let mut h = Harness::new(COW_512, 1, mode(false));
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for i in 0..16u64 {
        let bytes = data(i.to_le_bytes()[0], 4096);
        // Each write's bits in a bitmap byte of its own (no waiting).
        writes.push((64 + 8 * i, h.guest.write(64 + 8 * i, &bytes), bytes));
        reads.push((2048 + 8 * i, h.guest.read(2048 + 8 * i, &[4096], 0xAA)));
    }
    let all = h.guest.avail_idx();
    assert_eq!(all, 32);
    h.kick();
    h.iterate();
    // max_inflight = 2 x capacity: two taken, the rest left in the ring.
    assert_eq!(h.worker.requests_in_flight(), 2);
    assert_eq!(h.guest.taken(), 2);
    assert!(!h.worker.should_retake());
    assert_eq!(h.worker.ops_in_flight(), 1);
    let refused = |h: &Harness| {
        h.log()
            .iter()
            .filter(|e| matches!(e, Event::Refused(_)))
            .count()
    };
    assert_eq!(refused(&h), 1, "the second request's op must be refused");

    // Only the one kick above: every later take is a retake.
    let mut retakes = 0;
    let mut last_taken = h.guest.taken();
    h.run_observed(oldest, |h| {
        assert!(h.worker.requests_in_flight() <= 2);
        let t = h.guest.taken();
        if t > last_taken {
            retakes += 1;
        }
        last_taken = t;
    });
    assert_eq!(h.guest.taken(), all, "descriptors never taken");
    assert!(retakes >= 15, "only {retakes} retakes");
    assert!(h.idle());
    assert_eq!(h.published.len(), 32);
    assert_eq!(h.engine().max_in_flight, 1);
    // Each write's bitmap write found the engine busy with the next
    // request's data and was parked (rule 5), then issued.
    let parked = h
        .log()
        .iter()
        .filter(|e| matches!(e, Event::Refused(i) if i.class == Class::BitmapWrite))
        .count();
    assert_eq!(parked, 16);
    assert_eq!(h.dev.sched().stats().bitmap_writes_parked, 16);
    assert_eq!(accepted(&h.log(), Class::BitmapWrite).len(), 16);
    assert!(refused(&h) > parked, "no data operation refused");
    for (sector, w, bytes) in &writes {
        assert_eq!(h.guest.status(w), S_OK);
        assert_eq!(&h.read_back(*sector, 8), bytes);
    }
    for (sector, r) in &reads {
        assert_eq!(h.guest.status(r), S_OK);
        assert_eq!(h.guest.data(r), patterned(sector * 512, 4096));
    }
}

// ---------------------------------------------------------------------
// 7. Out-of-order completions across writes and an overlapping read.

#[test]
fn read_never_returns_older_data_than_a_landed_overlapping_write() {
    for w2_first in [false, true] {
        let mut h = Harness::new(COW_512, 8, mode(false));
        // Two writes whose bits share bitmap byte 1 (sectors 8..16).
        let (d1, d2) = (data(6, 2048), data(7, 2048));
        let w1 = h.guest.write(8, &d1);
        let w2 = h.guest.write(12, &d2);
        h.kick();
        h.run(hold);
        let mut ops = h.engine().pending();
        assert!(ops.iter().all(|i| i.class == Class::GuestWrite), "{ops:?}");
        // Sector 8 lies below sector 12 in the COW data area.
        ops.sort_by_key(|i| i.offset);
        let [op1, op2] = ops[..] else {
            panic!("two writes wanted: {ops:?}")
        };
        let order = if w2_first { [op2, op1] } else { [op1, op2] };
        for op in order {
            h.engine()
                .complete_matching(|i| i.user_data == op.user_data);
            h.run(hold);
        }
        // One bitmap write out, the other write waits for it (rule 2).
        let pending = h.engine().pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].class, Class::BitmapWrite);
        // Both writes' data has landed: a read of the second's sectors
        // must return its data whatever completes in which order.
        let r = h.guest.read(12, &[2048], 0xAA);
        h.kick();
        h.run(hold);
        h.run(all_reversed);
        assert!(h.idle());
        for req in [&w1, &w2, &r] {
            assert_eq!(h.guest.status(req), S_OK);
        }
        assert!(
            h.guest.data(&r) == d2,
            "the read returned older data (w2_first {w2_first})"
        );
        let log = h.log();
        let cow_fd = h.dev.cow_fd();
        let reads: Vec<OpInfo> = log
            .iter()
            .filter_map(|e| match e {
                Event::Accepted(i) if matches!(i.class, Class::GuestRead { .. }) => Some(*i),
                _ => None,
            })
            .collect();
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].class, Class::GuestRead { fd: cow_fd });
        assert_eq!(reads[0].offset, op2.offset);
        // And afterwards, through the format code as well.
        let mut both = d1.clone();
        both.extend_from_slice(&d2);
        assert_eq!(h.read_back(8, 8), both);
    }
}

// ---------------------------------------------------------------------
// 8. Stop/drain: run the steps until the loop's idle condition holds.

#[test]
fn draining_publishes_every_request_exactly_once() {
    let mut h = Harness::new(COW_4K, 4, mode(true));
    let reqs = [
        h.guest.write(9, &data(8, 512)),   // copy-up, bitmap write
        h.guest.read(8, &[4096], 0xAA),    // overlaps the copy-up
        h.guest.flush(),                   // a barrier
        h.guest.write(40, &data(9, 4096)), // a whole chunk
        h.guest
            .zeroing(T_WRITE_ZEROES, &[(64, 8, 0), (80, 8, FLAG_UNMAP)]),
        h.guest.zeroing(T_DISCARD, &[(96, 16, 0)]),
        h.guest.read(200, &[512, 512], 0xAA), // backing only
        h.guest.get_id(),                     // no I/O at all
    ];
    let n = reqs.len();
    h.kick();
    h.iterate();
    assert_eq!(h.guest.taken() as usize, n);
    assert!(h.worker.ops_in_flight() > 0);
    assert!(!h.idle());
    // From here on only completions wake the loop, out of order, one
    // batch at a time.
    h.run_observed(all_reversed, |h| {
        let used = h.guest.used().len();
        // A request is in flight until published, then never again.
        assert_eq!(h.worker.requests_in_flight() + used, n);
        if h.idle() {
            assert_eq!(used, n, "idle with requests unpublished");
        }
        assert_eq!(h.worker.has_requests_on(0), used < n);
    });
    assert!(h.idle());
    assert!(!h.worker.has_sched_input());
    assert!(!h.dev.sched().has_ops(0));
    assert!(h.dev.sched().is_idle());
    assert_eq!(h.worker.bounce_buffers(), 0);
    let used = h.guest.used();
    let heads: BTreeSet<u16> = used.iter().map(|&(head, _)| head).collect();
    let want: BTreeSet<u16> = reqs.iter().map(|r| r.head).collect();
    assert_eq!(used.len(), n);
    assert_eq!(heads, want);
    for r in &reqs {
        let s = h.guest.status(r);
        assert_ne!(s, UNTOUCHED);
        assert_eq!(s, S_OK, "request {}", r.head);
    }
}

// ---------------------------------------------------------------------
// Found while writing these: a throttled ring is not looked at again when
// every request in flight finishes in one iteration.

#[test]
fn throttled_ring_is_taken_again_when_all_requests_finish_at_once() {
    // Capacity 1: the worker takes two requests at most. GET_ID needs no
    // I/O, so both finish and are published in the iteration that took
    // them; the third request is left in the ring with no kick to come.
    let mut h = Harness::new(RAW, 1, mode(false));
    let reqs = [h.guest.get_id(), h.guest.get_id(), h.guest.get_id()];
    h.kick();
    h.run(all_in_order);
    assert_eq!(
        h.guest.taken(),
        3,
        "the loop would sleep with a request left in the ring (should_retake = {})",
        h.worker.should_retake()
    );
    for r in &reqs {
        assert_eq!(h.guest.status(r), S_OK);
    }
}

// ---------------------------------------------------------------------
// Reads off the scheduler's lock (docs/design.md): raw reads and COW
// reads of allocated chunks go straight to the engine.

fn sched_locks(h: &Harness) -> u64 {
    h.dev
        .lock_counts(0)
        .sched_locks
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn off_lock_reads(h: &Harness) -> u64 {
    h.dev
        .lock_counts(0)
        .off_lock_reads
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn raw_reads_take_no_scheduler_lock() {
    // Room for every read in the engine.
    let mut h = Harness::new(RAW, 16, mode(false));
    let reads: Vec<(u64, Req)> = (0..12u64)
        .map(|i| {
            let sector = i * 37;
            (sector, h.guest.read(sector, &[512, 1536, 2048], 0xAA))
        })
        .collect();
    h.kick();
    // Out of order: completions are matched to their requests.
    h.run(all_reversed);
    for (sector, r) in &reads {
        assert_eq!(h.guest.status(r), S_OK);
        assert_eq!(
            h.guest.data(r),
            patterned(sector * 512, 4096),
            "sector {sector}"
        );
    }
    assert_eq!(sched_locks(&h), 0);
    assert_eq!(off_lock_reads(&h), 12);
    assert_eq!(h.dev.sched().stats().reads, 0);
    // A write still goes through the scheduler.
    let w = h.guest.write(3, &data(1, 512));
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&w), S_OK);
    assert!(sched_locks(&h) > 0);
}

fn allocated_cow_reads(disk: DiskKind) {
    let mut h = Harness::new(disk, 8, mode(false));
    let mine = data(3, 64 * 512);
    let w = h.guest.write(0, &mine);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&w), S_OK);
    let locks = sched_locks(&h);
    let views = h
        .dev
        .lock_counts(0)
        .view_read_locks
        .load(std::sync::atomic::Ordering::Relaxed);
    // Every chunk of these is allocated: no scheduler lock.
    let reads: Vec<(u64, Req)> = [0u64, 5, 17, 40, 56]
        .iter()
        .map(|&s| (s, h.guest.read(s, &[1024, 3072], 0xAA)))
        .collect();
    h.kick();
    h.run(all_reversed);
    for (s, r) in &reads {
        assert_eq!(h.guest.status(r), S_OK);
        let at = usize::try_from(s * 512).unwrap();
        assert_eq!(h.guest.data(r), &mine[at..at + 4096], "sector {s}");
    }
    assert_eq!(
        sched_locks(&h),
        locks,
        "an allocated read took the scheduler's lock"
    );
    assert_eq!(off_lock_reads(&h), 5);
    let views_now = h
        .dev
        .lock_counts(0)
        .view_read_locks
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(views_now - views, 5);
    // Half over the backing file: through the scheduler (rule 4).
    let r = h.guest.read(60, &[4096], 0xAA);
    h.kick();
    h.run(all_in_order);
    assert_eq!(h.guest.status(&r), S_OK);
    let got = h.guest.data(&r);
    assert_eq!(&got[..2048], &mine[60 * 512..]);
    assert_eq!(&got[2048..], &patterned(64 * 512, 2048)[..]);
    assert!(sched_locks(&h) > locks);
    assert_eq!(off_lock_reads(&h), 5);
}

#[test]
fn allocated_cow_reads_take_no_scheduler_lock() {
    allocated_cow_reads(COW_512);
}

#[test]
fn allocated_cow_reads_take_no_scheduler_lock_4k_chunks() {
    allocated_cow_reads(COW_4K);
}

#[test]
fn off_lock_reads_the_engine_has_no_room_for_wait_in_the_scheduler() {
    // Capacity 1: the second read taken finds the engine full (rule 5).
    let mut h = Harness::new(RAW, 1, mode(false));
    let reads: Vec<(u64, Req)> = (0..6u64)
        .map(|i| (i * 8, h.guest.read(i * 8, &[4096], 0xAA)))
        .collect();
    h.kick();
    h.run(oldest);
    for (sector, r) in &reads {
        assert_eq!(h.guest.status(r), S_OK);
        assert_eq!(h.guest.data(r), patterned(sector * 512, 4096));
    }
    assert!(sched_locks(&h) > 0, "no read was parked");
    assert!(off_lock_reads(&h) > 0);
    assert_eq!(off_lock_reads(&h) + h.dev.sched().stats().reads, 6);
}

/// Rule 10 on the real worker: a backup of a raw image started before a
/// guest write over its last cluster; the operations complete newest
/// first. The target is the image as it was, the write waited for its
/// cluster's read and then landed, and the target was synced.
#[test]
fn a_backup_copies_the_disk_as_it_was_while_a_write_waits_for_its_cluster() {
    const LEN: u64 = 256 << 10; // four clusters of 64 KiB
    let mut h = Harness::new(DiskKind::Raw { len: LEN }, 8, RingMode::default());
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backup.img");
    let file = std::fs::File::create(&target).unwrap();
    let id = h.dev.start_backup(file, "backup.img".into()).unwrap();
    h.wake();
    let new = vec![0xeeu8; 4096];
    let w = h.guest.write(400, &new); // bytes 204800.., the last cluster
    h.kick();
    h.run(all_reversed);
    assert_eq!(h.guest.status(&w), S_OK);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        patterned(0, vhost_user_cow::units::to_usize(LEN)),
        "the target is not the image at the start"
    );
    assert_eq!(h.read_back(400, 8), new, "the guest's write was lost");
    // The write reached the image only after the last cluster was read.
    let log = h.log();
    let pos = |f: &dyn Fn(&Event) -> bool| log.iter().position(f).unwrap();
    let cluster_read = pos(&|e| {
        matches!(
            e,
            Event::Completed(
                OpInfo {
                    class: Class::CopyRead,
                    offset: 196608,
                    ..
                },
                Ok(_)
            )
        )
    });
    let write = pos(&|e| {
        matches!(
            e,
            Event::Accepted(OpInfo {
                class: Class::GuestWrite,
                ..
            })
        )
    });
    assert!(cluster_read < write, "{log:#?}");
    // The worker's step reported the end (JOB_COMPLETED) to the jobs.
    let jobs = h.dev.list_jobs();
    let end = &jobs[0];
    assert_eq!(end["id"], id, "{jobs}");
    assert_eq!(end["status"], "completed", "{jobs}");
    assert_eq!(end["bytes_written"], LEN, "{jobs}");
    assert_eq!(end["writes_waited"], 1, "{jobs}");
    assert_eq!(h.worker.bounce_buffers(), 0, "bounce buffers leaked");
}
