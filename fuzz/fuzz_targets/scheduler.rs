//! The write-path scheduler against its model: random submissions,
//! issues refused by a full engine (`op_refused`), completions in any
//! order and injected failures of bitmap writes, checking after every step
//! the invariants of `tests/bitmap_sched.rs` (whose harness this is, copied
//! as is; only the driver below is the fuzzer's).
//!
//! Input:
//! * byte 0: bits 0-2 engine capacity (1 + value % 5), bit 3 O_DIRECT
//!   (bitmap writes widened to 512-byte blocks), bits 4-5 log2 of the
//!   sectors per chunk, bit 6 inject bitmap-write failures;
//! * byte 1: script length (mod 81 requests);
//! * 3 bytes per request: kind (value % 10: 0-3 write, 4-7 read, 8 zero,
//!   9 flush; bit 7 the thread), first sector (mod 40), count (1 + value % 5,
//!   cut at the end of the disk);
//! * the rest, one byte per step (at most 4000): which of the possible
//!   actions (submit the next request, issue, complete, fail) is taken.
//!
//! At the end everything is drained and `finish` checks that nothing is
//! left and no update was lost.

#![no_main]
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};

use libfuzzer_sys::fuzz_target;
use vhost_user_cow::daemon::scheduler::{
    CowLayout, DiskRequest, Done, Op, OpKind, ReqKind, Scheduler, Status, Target, ThreadId,
};
use vhost_user_cow::format::bitmap::Bitmap;

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
            cow_data: vec![UNWRITTEN; SECTORS as usize],
            disk_bitmap: vec![0; bytes],
            durable_data: vec![UNWRITTEN; SECTORS as usize],
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
        let range = sector as usize..(sector + count) as usize;
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
                m.seen = vec![0; count as usize];
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
                                r.acceptable[s - r.req.sector as usize].insert(id);
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
        self.possible[s as usize] = now;
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
                            self.cow_data[s as usize]
                        }
                        Target::Backing => backing_tag(s),
                    };
                    // (a) no read returns COW data that was never written.
                    assert_ne!(v, UNWRITTEN, "read of sector {s} saw unwritten COW data");
                    let m = self.reqs.get_mut(&req).unwrap();
                    m.seen[(buf_offset / 512 + i) as usize] = v;
                }
            }
            OpKind::BitmapWrite { offset, start, len } => {
                assert_eq!(offset, BITMAP_OFFSET + start);
                let bytes = self.sched.bitmap().unwrap().as_bytes();
                snapshot = bytes[start as usize..(start + len) as usize].to_vec();
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
                    .map(|s| self.possible[s as usize].clone())
                    .collect();
                for s in first..first + len / 512 {
                    self.cow_data[s as usize] = id;
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
                        [start as usize..start as usize + f.snapshot.len()];
                    assert_eq!(now, &f.snapshot[..], "(b) pending bitmap bytes changed");
                    self.disk_bitmap[start as usize..start as usize + f.snapshot.len()]
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
                        assert_ne!(self.cow_data[s as usize], UNWRITTEN);
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
                            self.possible[s as usize].extend(others);
                        }
                    }
                } else {
                    assert!(
                        self.failed_device,
                        "write {id} failed without an injected error"
                    );
                    let before = self.reqs[&id].before.clone();
                    for (i, set) in before.into_iter().enumerate() {
                        let s = req.sector as usize + i;
                        // Its bits never went out: older data is back. Its
                        // bits were set (its own bitmap write failed): its
                        // data may show. Also for reads already in flight.
                        let visible: BTreeSet<u64> = if self.mem_bit(s as u64) {
                            BTreeSet::from([id])
                        } else {
                            set
                        };
                        for r in self.reqs.values_mut() {
                            let rs = r.req.sector as usize;
                            if r.req.kind == ReqKind::Read
                                && r.done.is_none()
                                && (rs..rs + r.req.count as usize).contains(&s)
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
                            assert_ne!(self.durable_data[s as usize], UNWRITTEN);
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
                    self.cow_data[s as usize], UNWRITTEN,
                    "bit {s} on disk before its data"
                );
            }
            if self.disk_bit(&self.durable_bitmap, s) {
                assert_ne!(self.durable_data[s as usize], UNWRITTEN);
            }
            if self.mem_bit(s) {
                assert_ne!(
                    self.cow_data[s as usize], UNWRITTEN,
                    "bit {s} set before its data"
                );
            }
        }
        // (b) bytes under a pending bitmap write never change.
        for f in &self.in_flight {
            if let OpKind::BitmapWrite { start, .. } = f.op.kind {
                let now = &self.sched.bitmap().unwrap().as_bytes()
                    [start as usize..start as usize + f.snapshot.len()];
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
        let submitted = (self.next_req - 1) as usize;
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
                    self.cow_data[s as usize]
                } else {
                    backing_tag(s)
                };
                assert!(
                    self.possible[s as usize].contains(&on_disk),
                    "sector {s} holds {on_disk}, expected one of {:?}",
                    self.possible[s as usize]
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cfg = data[0];
    let capacity = 1 + usize::from(cfg & 7) % 5;
    let direct = cfg & 8 != 0;
    let spc_shift = (cfg >> 4) & 3;
    let inject = cfg & 0x40 != 0;
    let n = usize::from(data[1]) % 81;
    let body = &data[2..];
    let n = n.min(body.len() / 3);
    let script: Vec<(ReqKind, u64, u64, ThreadId)> = body[..3 * n]
        .chunks(3)
        .map(|r| {
            let kind = match r[0] % 10 {
                0..=3 => ReqKind::Write,
                4..=7 => ReqKind::Read,
                8 => ReqKind::Zero,
                _ => ReqKind::Flush,
            };
            let thread = usize::from(r[0] >> 7) % QUEUES;
            let sector = u64::from(r[1]) % SECTORS;
            let count = (1 + u64::from(r[2]) % 5).min(SECTORS - sector);
            (kind, sector, count, thread)
        })
        .collect();
    let choices = &body[3 * n..];
    let mut h = Harness::chunked(capacity, if direct { 512 } else { 1 }, 1 << spc_shift);
    for &c in choices.iter().take(4000) {
        let actions = h.actions(&script, inject);
        if actions.is_empty() {
            break;
        }
        h.apply(actions[usize::from(c) % actions.len()]);
    }
    h.finish();
});
