//! The scheduler driven by a fake engine, in adversarial orders: every
//! interleaving of small scripts, and long random schedules. After every
//! step the harness checks the ordering rules of docs/design.md from the
//! outside, against a model of the files.
//!
//! The fake engine performs reads at the moment it accepts them (as early
//! as a kernel could) and writes at the moment they complete (as late as a
//! kernel could), which is the order that exposes a bit set too early.

use std::collections::{BTreeSet, HashMap};

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use vhost_user_cow::daemon::scheduler::{
    CowLayout, DiskRequest, Done, Op, OpKind, ReqKind, Scheduler, Status, Target, ThreadId,
};
use vhost_user_cow::format::bitmap::Bitmap;
use vhost_user_cow::units::to_usize;

const SECTORS: u64 = 40;
const QUEUES: usize = 2;
const DATA_OFFSET: u64 = 1 << 20;
const BITMAP_OFFSET: u64 = 4096;
/// Never-written COW data reads as this: seeing it is rule 1 broken.
const UNWRITTEN: u64 = u64::MAX;

fn backing_tag(sector: u64) -> u64 {
    1_000_000 + sector
}

#[derive(Clone, Debug)]
struct InFlight {
    op: Op,
    /// For bitmap writes: the bytes as they were when issued.
    snapshot: Vec<u8>,
}

#[derive(Clone, Debug)]
struct ReqModel {
    req: DiskRequest,
    /// Read: values seen per sector. Write: its tag.
    seen: Vec<u64>,
    /// Read: tags acceptable per sector (grows while the read is in flight).
    acceptable: Vec<BTreeSet<u64>>,
    /// Write: the acceptable sets before its data landed (restored if it fails).
    before: Vec<BTreeSet<u64>>,
    /// Flush: writes completed before it was submitted.
    completed_before: Vec<u64>,
    /// Write: overlapping writes that completed while it was in flight.
    concurrent: BTreeSet<u64>,
    /// Flush: bitmap writes in the engine when it was submitted.
    bitmap_ops_before: BTreeSet<u64>,
    done: Option<Status>,
}

#[derive(Clone)]
struct Harness {
    sched: Scheduler,
    reqs: HashMap<u64, ReqModel>,
    next_req: u64,
    in_flight: Vec<InFlight>,
    capacity: usize,
    cow_data: Vec<u64>,
    disk_bitmap: Vec<u8>,
    /// The files as of the last completed fdatasync.
    durable_data: Vec<u64>,
    durable_bitmap: Vec<u8>,
    /// Per sector, the values a read submitted now may return.
    possible: Vec<BTreeSet<u64>>,
    /// Write requests completed OK, in order.
    completed_writes: Vec<u64>,
    /// Bitmap write ops issued by the engine and not yet completed.
    bitmap_ops_in_flight: BTreeSet<u64>,
    failed_device: bool,
    /// Sectors per chunk.
    spc: u64,
    /// Copy-up bounce buffers: what the fake engine read into them.
    bounces: HashMap<u64, Vec<u64>>,
    /// Per thread: an issue was refused and no completion has freed room since.
    refused: [bool; QUEUES],
    /// Issue every operation as soon as the engine has room (exhaustive
    /// runs branch only on submissions and completion order).
    auto_issue: bool,
    steps: u64,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Submit(ReqKind, u64, u64, ThreadId),
    Issue(ThreadId),
    Complete(usize),
    Fail(usize),
}

impl Harness {
    fn new(capacity: usize, bitmap_block: u64) -> Harness {
        Harness::chunked(capacity, bitmap_block, 1)
    }

    /// A COW file whose bits cover `spc` sectors each (rule 9).
    fn chunked(capacity: usize, bitmap_block: u64, spc: u64) -> Harness {
        let bitmap = Bitmap::new(SECTORS / spc, 512 * spc);
        let layout = CowLayout {
            bitmap_offset: BITMAP_OFFSET,
            data_offset: DATA_OFFSET,
            bitmap_block,
            storable_chunks: SECTORS / spc,
        };
        let bytes = bitmap.alloc_len();
        Harness {
            sched: Scheduler::new_cow(SECTORS, bitmap, layout, QUEUES, false),
            reqs: HashMap::new(),
            next_req: 1,
            in_flight: Vec::new(),
            capacity,
            cow_data: vec![UNWRITTEN; to_usize(SECTORS)],
            disk_bitmap: vec![0; bytes],
            durable_data: vec![UNWRITTEN; to_usize(SECTORS)],
            durable_bitmap: vec![0; bytes],
            possible: (0..SECTORS)
                .map(|s| BTreeSet::from([backing_tag(s)]))
                .collect(),
            completed_writes: Vec::new(),
            bitmap_ops_in_flight: BTreeSet::new(),
            failed_device: false,
            spc,
            bounces: HashMap::new(),
            refused: [false; QUEUES],
            auto_issue: false,
            steps: 0,
        }
    }

    fn mem_bit(&self, sector: u64) -> bool {
        self.sched.bitmap().unwrap().get(sector / self.spc)
    }

    fn disk_bit(&self, bitmap: &[u8], sector: u64) -> bool {
        let c = sector / self.spc;
        bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0
    }

    fn submit(&mut self, kind: ReqKind, sector: u64, count: u64, thread: ThreadId) {
        let id = self.next_req;
        self.next_req += 1;
        let req = DiskRequest {
            id,
            thread,
            kind,
            sector,
            count,
        };
        let range = to_usize(sector)..to_usize(sector + count);
        let mut m = ReqModel {
            req,
            seen: Vec::new(),
            acceptable: Vec::new(),
            before: Vec::new(),
            completed_before: self.completed_writes.clone(),
            bitmap_ops_before: self.bitmap_ops_in_flight.clone(),
            concurrent: BTreeSet::new(),
            done: None,
        };
        match kind {
            ReqKind::Read => {
                m.seen = vec![0; to_usize(count)];
                m.acceptable = self.possible[range].to_vec();
            }
            ReqKind::Write | ReqKind::Zero => {
                for s in range.clone() {
                    self.possible[s].insert(id);
                }
                // Reads in flight may see this write too.
                for r in self.reqs.values_mut() {
                    if r.req.kind == ReqKind::Read && r.done.is_none() {
                        for s in range.clone() {
                            if s as u64 >= r.req.sector && (s as u64) < r.req.sector + r.req.count {
                                r.acceptable[s - to_usize(r.req.sector)].insert(id);
                            }
                        }
                    }
                }
            }
            ReqKind::Flush => {}
        }
        self.reqs.insert(id, m);
        self.sched.submit(req);
        self.drain_done();
    }

    /// Write `id` is visible at `s`: from now on reads see it or a write
    /// still in flight.
    fn land(&mut self, s: u64, id: u64) {
        let mut now: BTreeSet<u64> = self.writes_in_flight_at(s, id).into_iter().collect();
        now.insert(id);
        self.possible[to_usize(s)] = now;
    }

    fn writes_in_flight_at(&self, sector: u64, except: u64) -> Vec<u64> {
        self.reqs
            .values()
            .filter(|r| {
                matches!(r.req.kind, ReqKind::Write | ReqKind::Zero)
                    && r.done.is_none()
                    && r.req.id != except
                    && sector >= r.req.sector
                    && sector < r.req.sector + r.req.count
            })
            .map(|r| r.req.id)
            .collect()
    }

    fn issue(&mut self, thread: ThreadId) {
        let Some(op) = self.sched.pop_op(thread) else {
            return;
        };
        assert_eq!(op.thread, thread, "op handed to the wrong thread");
        if self.in_flight.len() >= self.capacity {
            // Rule 5: the engine is full.
            self.sched.op_refused(op);
            self.refused[thread] = true;
            return;
        }
        let mut snapshot = Vec::new();
        match op.kind {
            OpKind::Read {
                target,
                offset,
                len,
                buf_offset,
            } => {
                let req = op.req.unwrap();
                let first = match target {
                    Target::Cow => (offset - DATA_OFFSET) / 512,
                    Target::Backing => offset / 512,
                };
                for i in 0..len / 512 {
                    let s = first + i;
                    let v = match target {
                        Target::Cow => {
                            assert!(
                                self.mem_bit(s),
                                "read of COW sector {s} whose bit is not set"
                            );
                            self.cow_data[to_usize(s)]
                        }
                        Target::Backing => backing_tag(s),
                    };
                    // (a) no read returns COW data that was never written.
                    assert_ne!(v, UNWRITTEN, "read of sector {s} saw unwritten COW data");
                    let m = self.reqs.get_mut(&req).unwrap();
                    m.seen[to_usize(buf_offset / 512 + i)] = v;
                }
            }
            OpKind::BitmapWrite { offset, start, len } => {
                assert_eq!(offset, BITMAP_OFFSET + start);
                let bytes = self.sched.bitmap().unwrap().as_bytes();
                snapshot = bytes[to_usize(start)..to_usize(start + len)].to_vec();
                self.bitmap_ops_in_flight.insert(op.id);
            }
            OpKind::Sync => {
                // (e) a flush's sync waits for every bitmap write issued
                // before the flush arrived.
                let m = &self.reqs[&op.req.unwrap()];
                assert!(
                    m.bitmap_ops_before.is_disjoint(&self.bitmap_ops_in_flight),
                    "(e) sync issued before earlier bitmap writes completed"
                );
            }
            OpKind::CopyRead {
                offset,
                len,
                bounce,
            } => {
                let first = offset / 512;
                let data = (first..first + len / 512).map(backing_tag).collect();
                self.bounces.insert(bounce, data);
            }
            OpKind::Write { .. } | OpKind::Zero { .. } | OpKind::CopyWrite { .. } => {}
        }
        self.in_flight.push(InFlight { op, snapshot });
    }

    fn complete(&mut self, idx: usize, fail: bool) {
        let f = self.in_flight.remove(idx);
        self.refused = [false; QUEUES];
        let op = f.op;
        match op.kind {
            OpKind::Write { offset, len, .. } | OpKind::Zero { offset, len } => {
                let id = op.req.unwrap();
                let first = (offset - DATA_OFFSET) / 512;
                let before: Vec<_> = (first..first + len / 512)
                    .map(|s| self.possible[to_usize(s)].clone())
                    .collect();
                for s in first..first + len / 512 {
                    self.cow_data[to_usize(s)] = id;
                    // Once the data has landed, no read submitted later may
                    // return anything older (rule 4's purpose). With chunks
                    // under copy-up that holds from completion on.
                    if self.spc == 1 {
                        self.land(s, id);
                    }
                }
                self.reqs.get_mut(&id).unwrap().before = before;
            }
            OpKind::BitmapWrite { start, .. } => {
                self.bitmap_ops_in_flight.remove(&op.id);
                if !fail {
                    let now = &self.sched.bitmap().unwrap().as_bytes()
                        [to_usize(start)..to_usize(start) + f.snapshot.len()];
                    assert_eq!(now, &f.snapshot[..], "(b) pending bitmap bytes changed");
                    self.disk_bitmap[to_usize(start)..to_usize(start) + f.snapshot.len()]
                        .copy_from_slice(&f.snapshot);
                }
            }
            OpKind::Sync => {
                if !fail {
                    self.durable_data = self.cow_data.clone();
                    self.durable_bitmap = self.disk_bitmap.clone();
                }
            }
            OpKind::CopyWrite { offset, bounce, .. } => {
                let data = self
                    .bounces
                    .remove(&bounce)
                    .expect("copy write before its read");
                let first = (offset - DATA_OFFSET) / 512;
                if !fail {
                    for (i, v) in data.into_iter().enumerate() {
                        self.cow_data[first as usize + i] = v;
                    }
                }
            }
            OpKind::Read { .. } | OpKind::CopyRead { .. } => {}
        }
        if fail && matches!(op.kind, OpKind::BitmapWrite { .. }) {
            self.failed_device = true;
        }
        self.sched
            .op_done(op.id, if fail { Err(libc::EIO) } else { Ok(()) });
        self.drain_done();
    }

    fn drain_done(&mut self) {
        for q in 0..QUEUES {
            while let Some(Done { id, status }) = self.sched.pop_done(q) {
                self.on_done(q, id, status);
            }
        }
    }

    fn on_done(&mut self, thread: ThreadId, id: u64, status: Status) {
        let m = self.reqs.get_mut(&id).expect("done for unknown request");
        // (c) exactly once, on the request's own thread.
        assert!(m.done.is_none(), "request {id} completed twice");
        assert_eq!(m.req.thread, thread);
        m.done = Some(status);
        let req = m.req;
        match req.kind {
            ReqKind::Read => {
                assert_eq!(status, Status::Ok, "(g) reads keep working");
                let m = &self.reqs[&id];
                for (i, v) in m.seen.iter().enumerate() {
                    assert!(
                        m.acceptable[i].contains(v),
                        "read {id} of sector {} returned {v}, acceptable {:?}",
                        req.sector + i as u64,
                        m.acceptable[i]
                    );
                }
            }
            ReqKind::Write | ReqKind::Zero => {
                // Writes still in flight over the same sectors may land
                // before or after this one (failed or not).
                for r in self.reqs.values_mut() {
                    let o = r.req;
                    if matches!(o.kind, ReqKind::Write | ReqKind::Zero)
                        && r.done.is_none()
                        && o.sector < req.sector + req.count
                        && req.sector < o.sector + o.count
                    {
                        r.concurrent.insert(id);
                    }
                }
                if status == Status::Ok {
                    // Rule 6: data and bit are both in the file.
                    for s in req.sector..req.sector + req.count {
                        assert!(
                            self.disk_bit(&self.disk_bitmap, s),
                            "completed write {id}: bit {s} not on disk"
                        );
                        assert_ne!(self.cow_data[to_usize(s)], UNWRITTEN);
                    }
                    self.completed_writes.push(id);
                    if self.spc > 1 {
                        // Visible from completion on; writes it overlapped
                        // may have landed in either order.
                        for s in req.sector..req.sector + req.count {
                            self.land(s, id);
                            let others: Vec<u64> = self.reqs[&id]
                                .concurrent
                                .iter()
                                .copied()
                                .filter(|w| {
                                    let r = self.reqs[w].req;
                                    (r.sector..r.sector + r.count).contains(&s)
                                })
                                .collect();
                            self.possible[to_usize(s)].extend(others);
                        }
                    }
                } else {
                    assert!(
                        self.failed_device,
                        "write {id} failed without an injected error"
                    );
                    let before = self.reqs[&id].before.clone();
                    for (i, set) in before.into_iter().enumerate() {
                        let s = to_usize(req.sector) + i;
                        // Its bits never went out: older data is back. Its
                        // bits were set (its own bitmap write failed): its
                        // data may show. Also for reads already in flight.
                        let visible: BTreeSet<u64> = if self.mem_bit(s as u64) {
                            BTreeSet::from([id])
                        } else {
                            set
                        };
                        for r in self.reqs.values_mut() {
                            let rs = to_usize(r.req.sector);
                            if r.req.kind == ReqKind::Read
                                && r.done.is_none()
                                && (rs..rs + to_usize(r.req.count)).contains(&s)
                            {
                                r.acceptable[s - rs].extend(visible.iter().copied());
                            }
                        }
                        self.possible[s].extend(visible);
                    }
                }
            }
            ReqKind::Flush => {
                if status == Status::Ok {
                    // (e) everything completed before the flush is durable.
                    let m = &self.reqs[&id];
                    for w in &m.completed_before {
                        let r = self.reqs[w].req;
                        for s in r.sector..r.sector + r.count {
                            assert!(
                                self.disk_bit(&self.durable_bitmap, s),
                                "flush {id}: bit {s} of write {w} not durable"
                            );
                            assert_ne!(self.durable_data[to_usize(s)], UNWRITTEN);
                        }
                    }
                } else {
                    assert!(self.failed_device);
                }
            }
        }
    }

    /// Invariants that hold between any two steps.
    fn check(&self) {
        // Data first: a bit on disk always covers written data.
        for s in 0..SECTORS {
            if self.disk_bit(&self.disk_bitmap, s) {
                assert_ne!(
                    self.cow_data[to_usize(s)],
                    UNWRITTEN,
                    "bit {s} on disk before its data"
                );
            }
            if self.disk_bit(&self.durable_bitmap, s) {
                assert_ne!(self.durable_data[to_usize(s)], UNWRITTEN);
            }
            if self.mem_bit(s) {
                assert_ne!(
                    self.cow_data[to_usize(s)],
                    UNWRITTEN,
                    "bit {s} set before its data"
                );
            }
        }
        // (b) bytes under a pending bitmap write never change.
        for f in &self.in_flight {
            if let OpKind::BitmapWrite { start, .. } = f.op.kind {
                let now = &self.sched.bitmap().unwrap().as_bytes()
                    [to_usize(start)..to_usize(start) + f.snapshot.len()];
                assert_eq!(now, &f.snapshot[..], "(b) pending bitmap bytes changed");
            }
        }
        // (g) after a metadata failure, no new write succeeds.
        if self.failed_device {
            assert!(self.sched.failure().is_some());
        }
    }

    fn actions(&self, script: &[(ReqKind, u64, u64, ThreadId)], inject: bool) -> Vec<Action> {
        let mut a = Vec::new();
        let submitted = to_usize(self.next_req - 1);
        if let Some(&(k, s, c, q)) = script.get(submitted) {
            a.push(Action::Submit(k, s, c, q));
        }
        for q in 0..QUEUES {
            if self.auto_issue {
                break;
            }
            // A full engine refuses once; trying again before a completion
            // frees room would change nothing.
            if self.sched.has_ops(q) && (self.in_flight.len() < self.capacity || !self.refused[q]) {
                a.push(Action::Issue(q));
            }
        }
        for (i, f) in self.in_flight.iter().enumerate() {
            a.push(Action::Complete(i));
            if inject && matches!(f.op.kind, OpKind::BitmapWrite { .. }) {
                a.push(Action::Fail(i));
            }
        }
        a
    }

    fn apply(&mut self, a: Action) {
        self.steps += 1;
        match a {
            Action::Submit(k, s, c, q) => self.submit(k, s, c, q),
            Action::Issue(q) => self.issue(q),
            Action::Complete(i) => self.complete(i, false),
            Action::Fail(i) => self.complete(i, true),
        }
        self.check();
        if self.auto_issue {
            for q in 0..QUEUES {
                while self.sched.has_ops(q) && !self.refused[q] {
                    self.issue(q);
                    self.check();
                }
            }
        }
    }

    /// (d) once everything has completed, nothing is left anywhere.
    fn finish(&mut self) {
        loop {
            let mut progressed = false;
            for q in 0..QUEUES {
                while self.sched.has_ops(q) && self.in_flight.len() < self.capacity {
                    self.apply(Action::Issue(q));
                    progressed = true;
                }
            }
            if !self.in_flight.is_empty() {
                self.apply(Action::Complete(0));
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        assert!(
            self.sched.is_idle(),
            "scheduler not idle at the end: {:?}",
            self.sched
        );
        assert_eq!(self.sched.copy_up_records(), 0, "copy-up records leaked");
        // No update lost: what the files hold is the last write of each sector.
        if !self.failed_device {
            for s in 0..SECTORS {
                let on_disk = if self.disk_bit(&self.disk_bitmap, s) {
                    self.cow_data[to_usize(s)]
                } else {
                    backing_tag(s)
                };
                assert!(
                    self.possible[to_usize(s)].contains(&on_disk),
                    "sector {s} holds {on_disk}, expected one of {:?}",
                    self.possible[to_usize(s)]
                );
            }
        }
        for (id, m) in &self.reqs {
            assert!(
                m.done.is_some(),
                "request {id} never completed (lost wake-up)"
            );
        }
    }
}

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
    let mut h = Harness::chunked(capacity, 1, spc);
    h.auto_issue = true;
    go(h, script, inject, &mut paths);
    paths
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

fn arb_request() -> impl Strategy<Value = (ReqKind, u64, u64, ThreadId)> {
    (0u8..10, 0..SECTORS, 1u64..6, 0..QUEUES).prop_map(|(k, s, c, q)| {
        let kind = match k {
            0..=3 => Write,
            4..=7 => Read,
            8 => Zero,
            _ => Flush,
        };
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
        for c in choices {
            let actions = h.actions(&script, inject);
            if actions.is_empty() {
                break;
            }
            // Bias away from failures so most runs go on long after one.
            let mut a = actions[c as usize % actions.len()];
            if matches!(a, Action::Fail(_)) && c % 7 != 0 {
                a = actions[0];
            }
            h.apply(a);
        }
        h.finish();
        let total = RANDOM_STEPS.fetch_add(h.steps, Ordering::Relaxed) + h.steps;
        if std::env::var_os("SCHED_STEPS").is_some() {
            eprintln!("random schedule steps so far: {total}");
        }
    }
}

static RANDOM_STEPS: AtomicU64 = AtomicU64::new(0);

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
