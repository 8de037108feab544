//! The scheduler driven by a fake engine, in adversarial orders: every
//! interleaving of small scripts, and long random schedules. After every
//! step the harness (`sched_model/`) checks the ordering rules of
//! docs/design.md from the outside, against a model of the files; with
//! small bitmap pages and a cap, also across page boundaries, with pages
//! dropped and read again while requests race for them.

mod sched_model;

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use sched_model::{
    Action, BackupPlan, Config, Harness, BITMAP_OFFSET, DATA_OFFSET, QUEUES, SECTORS,
};
use vhost_user_cow::daemon::copy_before_write::JobState;
use vhost_user_cow::daemon::scheduler::{
    CowLayout, DiskRequest, Done, Op, OpKind, ReqKind, Scheduler, Status, Target, ThreadId,
};
use vhost_user_cow::format::bitmap::Bitmap;

/// Every interleaving of a script, depth first.
fn explore(script: &[(ReqKind, u64, u64, ThreadId)], capacity: usize, inject: bool) -> u64 {
    explore_chunked(script, capacity, inject, 1)
}

fn explore_chunked(
    script: &[(ReqKind, u64, u64, ThreadId)],
    capacity: usize,
    inject: bool,
    spc: u64,
) -> u64 {
    explore_with(script, Config::new(capacity, 1, spc), inject)
}

fn explore_with(script: &[(ReqKind, u64, u64, ThreadId)], config: Config, inject: bool) -> u64 {
    explore_backup(script, config, inject, None)
}

/// Every interleaving, with a backup that may start at any point once
/// `plan.after` requests were submitted.
fn explore_backup(
    script: &[(ReqKind, u64, u64, ThreadId)],
    config: Config,
    inject: bool,
    plan: Option<BackupPlan>,
) -> u64 {
    fn go(h: Harness, script: &[(ReqKind, u64, u64, ThreadId)], inject: bool, paths: &mut u64) {
        let actions = h.actions(script, inject);
        if actions.is_empty() {
            let mut h = h;
            h.finish();
            *paths += 1;
            return;
        }
        for a in actions {
            let mut next = h.clone();
            next.apply(a);
            go(next, script, inject, paths);
        }
    }
    let mut paths = 0;
    let mut h = Harness::with(config);
    h.auto_issue = true;
    h.backup_plan = plan;
    go(h, script, inject, &mut paths);
    paths
}

/// A disk of `sectors` sectors in one bitmap page.
fn small(capacity: usize, spc: u64, sectors: u64) -> Config {
    let mut c = Config::new(capacity, 1, spc);
    c.sectors = sectors;
    c
}

fn plan(after: usize, cluster_sectors: u64, cancel: bool) -> Option<BackupPlan> {
    Some(BackupPlan {
        after,
        cluster_sectors,
        cancel,
        thread: 0,
    })
}

/// 128 sectors in 8-byte bitmap pages (64 chunks each): two pages, at
/// most one resident when unpinned, both on file.
fn two_pages(capacity: usize, spc: u64) -> Config {
    Config::new(capacity, 1, spc).paged(128, 8, 1)
}

use ReqKind::{Flush, Read, Write, Zero};

#[test]
fn exhaustive_two_writes_same_bitmap_byte_and_a_read() {
    let paths = explore(
        &[(Write, 0, 1, 0), (Write, 1, 2, 1), (Read, 1, 2, 0)],
        8,
        false,
    );
    assert!(paths > 50, "{paths}");
}

#[test]
fn exhaustive_same_sector_writes_and_flush() {
    explore(
        &[(Write, 3, 1, 0), (Write, 3, 1, 1), (Flush, 0, 0, 0)],
        8,
        false,
    );
}

#[test]
fn exhaustive_waiters_merge_and_read_spans_bytes() {
    explore(
        &[
            (Write, 0, 1, 0),
            (Write, 2, 1, 1),
            (Zero, 4, 1, 0),
            (Read, 0, 12, 1),
        ],
        8,
        false,
    );
}

#[test]
fn exhaustive_queue_full() {
    // Capacity 1: every second issue is refused and must be retried.
    explore(
        &[(Write, 0, 1, 0), (Write, 1, 1, 1), (Read, 0, 2, 1)],
        1,
        false,
    );
}

#[test]
fn exhaustive_bitmap_write_error() {
    explore(
        &[
            (Write, 0, 1, 0),
            (Write, 1, 1, 1),
            (Read, 0, 2, 0),
            (Write, 9, 1, 0),
        ],
        8,
        true,
    );
}

#[test]
fn waiters_over_the_same_bytes_merge_into_one_write() {
    let mut h = Harness::new(16, 1);
    for (s, q) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        h.apply(Action::Submit(Write, s, 1, q));
    }
    // Issue and complete all four data writes: the first goes out, three wait.
    for q in [0, 1, 0, 1] {
        h.apply(Action::Issue(q));
    }
    for _ in 0..4 {
        h.apply(Action::Complete(0));
    }
    assert_eq!(h.sched.stats().bitmap_writes_waited, 3);
    h.finish();
    let st = h.sched.stats();
    assert_eq!(st.bitmap_writes_issued, 2, "{st:?}");
    assert_eq!(st.bitmap_writes_merged, 2, "{st:?}");
}

#[test]
fn read_over_waiting_write_is_deferred_then_sees_new_data() {
    let mut h = Harness::new(16, 1);
    h.apply(Action::Submit(Write, 0, 1, 0));
    h.apply(Action::Submit(Write, 1, 1, 0));
    h.apply(Action::Issue(0));
    h.apply(Action::Issue(0));
    h.apply(Action::Complete(0)); // data of write 1 -> bitmap write issued
    h.apply(Action::Complete(0)); // data of write 2 -> waits
    h.apply(Action::Submit(Read, 1, 1, 1));
    assert_eq!(h.sched.stats().reads_deferred, 1);
    assert!(!h.sched.has_ops(1));
    h.finish();
    assert_eq!(h.reqs[&3].seen, vec![2]);
}

#[test]
fn direct_mode_widens_bitmap_writes_to_blocks() {
    let mut h = Harness::new(16, 512);
    h.apply(Action::Submit(Write, 0, 1, 0));
    h.apply(Action::Issue(0));
    h.apply(Action::Complete(0));
    h.apply(Action::Issue(0));
    match h.in_flight[0].op.kind {
        OpKind::BitmapWrite { start, len, .. } => assert_eq!((start, len), (0, 512)),
        k => panic!("{k:?}"),
    }
    // A write to chunk 39 (byte 4) now overlaps the widened pending block.
    h.apply(Action::Submit(Write, 39, 1, 1));
    h.apply(Action::Issue(1));
    h.apply(Action::Complete(1));
    assert_eq!(h.sched.stats().bitmap_writes_waited, 1);
    h.finish();
}

#[test]
fn exhaustive_partial_writes_race_on_one_unset_chunk() {
    // Two writes to different sectors of one 4-sector chunk, and a read of
    // the whole chunk: the copy-ups must not undo either write.
    let paths = explore_chunked(
        &[(Write, 0, 1, 0), (Write, 2, 1, 1), (Read, 0, 4, 0)],
        8,
        false,
        4,
    );
    assert!(paths > 50, "{paths}");
}

#[test]
fn exhaustive_copy_up_then_whole_chunk_write() {
    explore_chunked(
        &[(Write, 1, 2, 0), (Write, 0, 4, 1), (Read, 0, 8, 1)],
        8,
        false,
        4,
    );
}

#[test]
fn exhaustive_copy_up_spanning_chunks_and_zero() {
    explore_chunked(
        &[(Write, 3, 3, 0), (Zero, 5, 1, 1), (Read, 2, 5, 0)],
        8,
        false,
        4,
    );
}

#[test]
fn exhaustive_copy_up_queue_full_and_error() {
    explore_chunked(
        &[(Write, 1, 1, 0), (Write, 2, 1, 1), (Read, 0, 4, 1)],
        1,
        true,
        4,
    );
}

#[test]
fn queued_write_waits_for_copy_up_and_reads_of_old_data() {
    let spc = 4;
    let layout = CowLayout {
        bitmap_offset: BITMAP_OFFSET,
        data_offset: DATA_OFFSET,
        bitmap_block: 1,
        storable_chunks: SECTORS / spc,
    };
    let bitmap = Bitmap::new(SECTORS / spc, 512 * spc);
    let mut s = Scheduler::new_cow(SECTORS, bitmap, layout, 1, false);
    let req = |id, kind, sector, count| DiskRequest {
        id,
        thread: 0,
        kind,
        sector,
        count,
    };
    let drain = |s: &mut Scheduler| std::iter::from_fn(|| s.pop_op(0)).collect::<Vec<Op>>();
    // Write 1 covers sector 0 of chunk 0: copy-up of sectors 1..4.
    s.submit(req(1, Write, 0, 1));
    let w1 = drain(&mut s);
    assert!(
        matches!(
            w1[0].kind,
            OpKind::CopyRead {
                offset: 512,
                len: 1536,
                ..
            }
        ),
        "{w1:?}"
    );
    assert!(matches!(w1[1].kind, OpKind::Write { .. }));
    // A read of the chunk's old data counts on the record; write 3 queues.
    s.submit(req(2, Read, 2, 2));
    let r = drain(&mut s);
    assert!(matches!(
        r[0].kind,
        OpKind::Read {
            target: Target::Backing,
            ..
        }
    ));
    s.submit(req(3, Write, 3, 1));
    assert!(
        drain(&mut s).is_empty(),
        "write 3 must wait for the copy-up"
    );
    assert_eq!(s.stats().writes_queued_on_copy_up, 1);
    // The copy-up and write 1 finish; the read of old data is still in flight.
    s.op_done(w1[0].id, Ok(()));
    let copy_write = drain(&mut s);
    assert!(
        matches!(copy_write[0].kind, OpKind::CopyWrite { offset, .. } if offset == DATA_OFFSET + 512)
    );
    s.op_done(copy_write[0].id, Ok(()));
    s.op_done(w1[1].id, Ok(()));
    let ops = drain(&mut s);
    assert!(
        ops.iter()
            .all(|o| matches!(o.kind, OpKind::BitmapWrite { .. })),
        "write 3 issued while a read of the old data is in flight: {ops:?}"
    );
    for o in ops {
        s.op_done(o.id, Ok(()));
    }
    assert_eq!(
        s.pop_done(0),
        Some(Done {
            id: 1,
            status: Status::Ok
        })
    );
    assert_eq!(
        s.copy_up_records(),
        1,
        "the read still refers to the record"
    );
    // The read finishes: write 3 goes straight to the COW data, no copy-up.
    s.op_done(r[0].id, Ok(()));
    assert_eq!(
        s.pop_done(0),
        Some(Done {
            id: 2,
            status: Status::Ok
        })
    );
    let w3 = drain(&mut s);
    assert_eq!(w3.len(), 1, "{w3:?}");
    assert!(matches!(w3[0].kind, OpKind::Write { offset, .. } if offset == DATA_OFFSET + 3 * 512));
    assert_eq!(
        s.copy_up_records(),
        0,
        "record freed once nothing refers to it"
    );
    s.op_done(w3[0].id, Ok(()));
    // Chunk 0's bit is set already: write 3 completes without a bitmap write.
    assert_eq!(
        s.pop_done(0),
        Some(Done {
            id: 3,
            status: Status::Ok
        })
    );
    assert_eq!(s.stats().copy_ups, 1);
    assert!(s.is_idle());
}

#[test]
fn exhaustive_write_across_a_page_boundary_and_reads_of_both_pages() {
    // Write 2 and the reads each need both pages: every order of the two
    // loads, the data and the bitmap write (one write from two pages).
    let paths = explore_with(
        &[(Write, 62, 4, 0), (Read, 60, 8, 1), (Write, 64, 1, 1)],
        two_pages(8, 1),
        false,
    );
    assert!(paths > 50, "{paths}");
}

#[test]
fn exhaustive_page_dropped_and_read_again_while_a_read_races() {
    // Write 1 sets a bit of page 0; the read of page 1 drops page 0 (cap
    // one page); the read and the write of page 0 race for its reload.
    let paths = explore_with(
        &[
            (Write, 0, 1, 0),
            (Read, 64, 1, 1),
            (Read, 0, 2, 0),
            (Write, 1, 1, 1),
        ],
        two_pages(8, 1),
        false,
    );
    assert!(paths > 50, "{paths}");
}

#[test]
fn exhaustive_page_loads_and_bitmap_writes_fail() {
    // A failed load fails its waiters only; a failed bitmap write freezes
    // the pages: nothing is dropped or read back after it.
    explore_with(
        &[(Write, 63, 2, 0), (Read, 0, 1, 1), (Write, 70, 1, 1)],
        two_pages(8, 1),
        true,
    );
}

#[test]
fn exhaustive_copy_up_across_a_page_boundary() {
    // 4-sector chunks: 64 chunks (256 sectors) per page; a partial write
    // of the last chunk of page 0 and the first of page 1.
    explore_with(
        &[(Write, 254, 3, 0), (Read, 252, 8, 1)],
        Config::new(8, 1, 4).paged(512, 8, 1),
        true,
    );
}

#[test]
fn queue_full_with_page_loads() {
    // Capacity 1: loads are refused and retried like any operation.
    explore_with(
        &[(Write, 63, 2, 0), (Read, 64, 1, 1)],
        two_pages(1, 1),
        false,
    );
}

#[test]
fn one_load_serves_every_request_waiting_for_a_page() {
    let mut h = Harness::with(two_pages(16, 1));
    h.apply(Action::Submit(Read, 0, 1, 0));
    h.apply(Action::Submit(Write, 1, 1, 1));
    h.apply(Action::Submit(Read, 2, 1, 1));
    let st = h.sched.stats().clone();
    assert_eq!(st.requests_waited_for_pages, 3);
    assert!(
        !h.sched.has_ops(1),
        "only the first requester's thread loads"
    );
    h.apply(Action::Issue(0));
    assert!(matches!(
        h.in_flight[0].op.kind,
        OpKind::BitmapLoad {
            offset: BITMAP_OFFSET,
            page: 0,
            len: 8
        }
    ));
    h.finish();
    assert_eq!(h.sched.stats().bitmap_page_loads, 1);
}

#[test]
fn direct_mode_loads_whole_blocks() {
    // 512-byte pages (the block divides the page); the last page is short
    // in the bitmap but read as a whole block.
    let mut h = Harness::with(Config::new(16, 512, 1).paged(4096 + 64, 512, 1));
    h.apply(Action::Submit(Read, 4096 + 3, 1, 0));
    h.apply(Action::Issue(0));
    match h.in_flight[0].op.kind {
        OpKind::BitmapLoad { offset, page, len } => {
            assert_eq!((offset, page, len), (BITMAP_OFFSET + 512, 1, 512))
        }
        k => panic!("{k:?}"),
    }
    h.finish();
}

// Rule 10, copy-before-write: the target holds the disk as it was when
// the backup started, whatever the guest writes meanwhile.

#[test]
fn exhaustive_backup_starting_among_overlapping_writes() {
    let paths = explore_backup(
        &[(Write, 1, 2, 0), (Write, 2, 2, 1)],
        small(2, 1, 4),
        false,
        plan(0, 2, false),
    );
    assert!(paths > 100, "{paths}");
}

#[test]
fn exhaustive_backup_with_a_write_and_a_read() {
    explore_backup(
        &[(Write, 1, 2, 0), (Read, 0, 4, 1)],
        small(2, 1, 4),
        false,
        plan(0, 2, false),
    );
}

#[test]
fn exhaustive_backup_with_copy_ups_and_zeroing() {
    explore_backup(
        &[(Write, 1, 1, 0), (Zero, 2, 2, 1)],
        small(2, 2, 4),
        false,
        plan(0, 2, false),
    );
}

#[test]
fn exhaustive_backup_queue_full_errors_and_cancel() {
    explore_backup(
        &[(Write, 0, 1, 0), (Write, 6, 2, 1)],
        small(1, 1, 8),
        true,
        plan(0, 4, true),
    );
}

#[test]
fn exhaustive_backup_across_a_page_boundary() {
    // Two 8-byte pages of 64 chunks, one resident when unpinned.
    explore_backup(
        &[(Write, 62, 4, 0)],
        two_pages(8, 1),
        false,
        plan(0, 64, false),
    );
}

#[test]
fn a_write_waits_for_its_cluster_which_is_copied_first() {
    let mut h = Harness::new(16, 1);
    h.backup_plan = plan(0, 8, false);
    h.apply(Action::StartBackup);
    h.apply(Action::Submit(Write, 33, 2, 1));
    assert!(!h.sched.has_ops(1), "the write went out before its cluster");
    assert_eq!(h.sched.stats().writes_waited_on_backup, 1);
    // Clusters 0..4 are copied from the start; cluster 4 (sectors 32..40)
    // joins them at once, before cluster 5 and whatever the cursor reaches.
    while h.sched.has_ops(0) {
        h.apply(Action::Issue(0));
    }
    let reads: Vec<u64> = h
        .in_flight
        .iter()
        .filter_map(|f| match f.op.kind {
            OpKind::BackupRead { offset, .. } => Some(offset / 512),
            _ => None,
        })
        .collect();
    assert!(!reads.contains(&40), "{reads:?}");
    assert!(reads.contains(&32), "{reads:?}");
    h.finish();
    let b = h.backup.as_ref().unwrap();
    assert_eq!(b.ended.as_ref().unwrap().state, JobState::Completed);
    assert_eq!(b.target[33], 1_000_033, "the write reached the copy");
}

#[test]
fn a_second_backup_is_refused_while_one_runs_and_cancel_frees_waiters() {
    let mut h = Harness::new(16, 1);
    h.backup_plan = plan(0, 8, true);
    h.apply(Action::StartBackup);
    assert!(h.sched.start_backup(2, 0, 8).is_err());
    h.apply(Action::Submit(Write, 20, 1, 1));
    assert!(!h.sched.has_ops(1));
    h.apply(Action::CancelBackup);
    assert!(h.sched.has_ops(1), "cancel leaves the write waiting");
    h.finish();
    let end = h.backup.as_ref().unwrap().ended.as_ref().unwrap();
    assert_eq!(end.state, JobState::Cancelled);
    assert!(
        h.sched.start_backup(3, 0, 8).is_ok(),
        "refused after the end"
    );
}

#[test]
fn raw_disk_backup_reads_the_image_and_writes_the_target() {
    let mut s = Scheduler::new_raw(16, 1, false);
    s.start_backup(1, 0, 8).unwrap();
    let mut writes = 0;
    let mut synced = false;
    while let Some(op) = s.pop_op(0) {
        match op.kind {
            OpKind::BackupRead {
                target,
                offset,
                len,
                ..
            } => {
                assert_eq!((target, len), (Target::Cow, 4096));
                assert_eq!(offset % 4096, 0);
                s.op_done(op.id, Ok(()));
            }
            OpKind::BackupWrite { offset, len, .. } => {
                assert_eq!((offset % 4096, len), (0, 4096));
                writes += 1;
                s.backup_io_done(op.id, Ok(if offset == 0 { 0 } else { len }));
            }
            OpKind::BackupSync { .. } => {
                synced = true;
                s.backup_io_done(op.id, Ok(0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(writes, 2);
    assert!(synced);
    let end = s.take_backup_ended().expect("the job ended");
    assert_eq!(end.state, JobState::Completed);
    assert_eq!(end.bytes_written, 4096, "the all-zero cluster skipped");
    assert!(s.is_idle());
}

#[test]
fn a_failed_target_write_fails_the_job_not_the_guest() {
    let mut s = Scheduler::new_raw(16, 2, false);
    s.start_backup(1, 0, 8).unwrap();
    s.submit(DiskRequest {
        id: 7,
        thread: 1,
        kind: Write,
        sector: 9,
        count: 1,
    });
    assert!(!s.has_ops(1));
    while let Some(op) = s.pop_op(0) {
        match op.kind {
            OpKind::BackupRead { .. } => s.op_done(op.id, Ok(())),
            OpKind::BackupWrite { .. } => s.backup_io_done(op.id, Err(libc::ENOSPC)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let end = s.take_backup_ended().expect("the job ended");
    assert_eq!(end.state, JobState::Failed);
    assert!(end.error.as_deref().unwrap().contains("offset"), "{end:?}");
    let op = s.pop_op(1).expect("the write goes on");
    s.op_done(op.id, Ok(()));
    assert_eq!(
        s.pop_done(1),
        Some(Done {
            id: 7,
            status: Status::Ok
        })
    );
    assert!(s.is_idle());
}

fn arb_plan() -> impl Strategy<Value = Option<BackupPlan>> {
    proptest::option::weighted(
        0.9,
        (
            0usize..30,
            1u64..12,
            proptest::bool::weighted(0.2),
            0..QUEUES,
        )
            .prop_map(|(after, cluster_sectors, cancel, thread)| BackupPlan {
                after,
                cluster_sectors,
                cancel,
                thread,
            }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random schedules with a backup starting among them (rule 10):
    /// chunk sizes, cluster sizes, refusals, injected errors, cancels.
    #[test]
    fn random_schedules_with_a_backup(
        script in proptest::collection::vec(arb_request(), 30..60),
        choices in proptest::collection::vec(any::<u32>(), 300..500),
        capacity in 1usize..6,
        inject in proptest::bool::weighted(0.2),
        plan in arb_plan(),
        spc_shift in prop_oneof![2 => Just(0u32), 1 => Just(1u32), 1 => Just(2u32)],
    ) {
        let mut h = Harness::chunked(capacity, 1, 1 << spc_shift);
        h.backup_plan = plan;
        h.run_random(&script, &choices, inject);
        RANDOM_STEPS.fetch_add(h.steps, Ordering::Relaxed);
    }

    /// The same over small bitmap pages that are dropped and read again.
    #[test]
    fn random_schedules_with_a_backup_over_pages(
        script in proptest::collection::vec(arb_paged_request(256), 30..60),
        choices in proptest::collection::vec(any::<u32>(), 300..600),
        capacity in 1usize..6,
        inject in proptest::bool::weighted(0.2),
        plan in arb_plan(),
        cap in 1u64..4,
    ) {
        let mut h = Harness::with(Config::new(capacity, 1, 1).paged(256, 8, cap));
        h.backup_plan = plan.map(|p| BackupPlan { cluster_sectors: p.cluster_sectors * 8, ..p });
        h.run_random(&script, &choices, inject);
        RANDOM_STEPS.fetch_add(h.steps, Ordering::Relaxed);
    }
}

/// 0-3 write, 4-7 read, 8 zero, 9 flush.
fn kind_of(k: u8) -> ReqKind {
    match k {
        0..=3 => Write,
        4..=7 => Read,
        8 => Zero,
        _ => Flush,
    }
}

fn arb_request() -> impl Strategy<Value = (ReqKind, u64, u64, ThreadId)> {
    (0u8..10, 0..SECTORS, 1u64..6, 0..QUEUES).prop_map(|(k, s, c, q)| {
        let kind = kind_of(k);
        let c = c.min(SECTORS - s);
        (kind, s, c, q)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Random schedules: 500 cases of 300 to 500 steps: over 100k steps a run.
    #[test]
    fn random_schedules(
        script in proptest::collection::vec(arb_request(), 40..80),
        choices in proptest::collection::vec(any::<u32>(), 300..500),
        capacity in 1usize..6,
        inject in proptest::bool::weighted(0.2),
        direct in any::<bool>(),
        spc_shift in prop_oneof![3 => Just(0u32), 1 => Just(1u32), 1 => Just(2u32), 1 => Just(3u32)],
    ) {
        let mut h = Harness::chunked(capacity, if direct { 512 } else { 1 }, 1 << spc_shift);
        h.run_random(&script, &choices, inject);
        let total = RANDOM_STEPS.fetch_add(h.steps, Ordering::Relaxed) + h.steps;
        if std::env::var_os("SCHED_STEPS").is_some() {
            eprintln!("random schedule steps so far: {total}");
        }
    }
}

static RANDOM_STEPS: AtomicU64 = AtomicU64::new(0);

fn arb_paged_request(sectors: u64) -> impl Strategy<Value = (ReqKind, u64, u64, ThreadId)> {
    // Requests cluster around the page boundaries (every 64 chunks).
    (0u8..10, 0..sectors, 1u64..10, 0..QUEUES, any::<bool>()).prop_map(move |(k, s, c, q, near)| {
        let kind = kind_of(k);
        let s = if near {
            (s / 64 * 64 + sectors - 4 + s % 8) % sectors
        } else {
            s
        };
        (kind, s, c.min(sectors - s), q)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random schedules over small pages, a cap of one to three pages,
    /// pages on file or holes, loads refused, failed and racing requests.
    #[test]
    fn random_schedules_over_pages(
        script in proptest::collection::vec(arb_paged_request(256), 40..80),
        choices in proptest::collection::vec(any::<u32>(), 300..600),
        capacity in 1usize..6,
        inject in proptest::bool::weighted(0.2),
        cap in 1u64..4,
        on_file in any::<bool>(),
        spc_shift in prop_oneof![3 => Just(0u32), 1 => Just(1u32), 1 => Just(2u32)],
    ) {
        let mut config = Config::new(capacity, 1, 1 << spc_shift).paged(256, 8, cap);
        config.on_file = on_file;
        let mut h = Harness::with(config);
        h.run_random(&script, &choices, inject);
        RANDOM_STEPS.fetch_add(h.steps, Ordering::Relaxed);
    }
}

/// A raw image: no bitmap, every request is one data operation.
#[test]
fn raw_disk_requests_are_single_operations() {
    let mut s = Scheduler::new_raw(SECTORS, 1, false);
    for (id, kind) in [(1, Write), (2, Read), (3, Zero), (4, Flush)] {
        s.submit(DiskRequest {
            id,
            thread: 0,
            kind,
            sector: 8,
            count: if kind == Flush { 0 } else { 4 },
        });
        let op = s.pop_op(0).expect("an operation");
        assert!(s.pop_op(0).is_none(), "{kind:?}: more than one operation");
        match (kind, op.kind) {
            (Write, OpKind::Write { offset, len, .. }) => assert_eq!((offset, len), (4096, 2048)),
            (Read, OpKind::Read { target, offset, .. }) => {
                assert_eq!((target, offset), (Target::Cow, 4096))
            }
            (Zero, OpKind::Zero { offset, len }) => assert_eq!((offset, len), (4096, 2048)),
            (Flush, OpKind::Sync) => {}
            other => panic!("unexpected {other:?}"),
        }
        s.op_done(op.id, Ok(()));
        assert_eq!(
            s.pop_done(0),
            Some(Done {
                id,
                status: Status::Ok
            })
        );
    }
    assert!(s.is_idle());
}
