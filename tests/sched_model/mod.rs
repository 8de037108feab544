//! The scheduler's model harness, shared by `tests/bitmap_sched.rs` and
//! the fuzz target `fuzz/fuzz_targets/scheduler.rs` (through `#[path]`):
//! a fake engine over a model of the files, and the ordering rules of
//! docs/design.md checked from the outside after every step.
//!
//! The fake engine performs reads at the moment it accepts them (as early
//! as a kernel could) and writes at the moment they complete (as late as a
//! kernel could), which is the order that exposes a bit set too early.
//! Bitmap pages are read (`BitmapLoad`) from the model's file; with small
//! pages and a cap of one or two, every script crosses page boundaries,
//! drops pages and reads them again.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};

use vhost_user_cow::daemon::copy_before_write::{JobProgress, JobState};
use vhost_user_cow::daemon::scheduler::{
    CowLayout, DiskRequest, Done, Op, OpKind, ReqKind, Scheduler, Status, Target, ThreadId,
};
use vhost_user_cow::format::bitmap::Bitmap;
use vhost_user_cow::fsutil::range_set::RangeSet;
use vhost_user_cow::units::to_usize;

/// The disk of the classic scripts.
pub const SECTORS: u64 = 40;
pub const QUEUES: usize = 2;
pub const DATA_OFFSET: u64 = 1 << 20;
pub const BITMAP_OFFSET: u64 = 4096;
/// Never-written COW data reads as this: seeing it is rule 1 broken.
const UNWRITTEN: u64 = u64::MAX;

fn backing_tag(sector: u64) -> u64 {
    1_000_000 + sector
}

#[derive(Clone, Debug)]
pub struct InFlight {
    pub op: Op,
    /// For bitmap writes: the bytes as they were when issued. For bitmap
    /// loads: the file's bytes the load read.
    snapshot: Vec<u8>,
}

/// The disk and engine a harness simulates.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Operations the fake engine holds at once.
    pub capacity: usize,
    /// Bitmap writes widened to this (512: O_DIRECT).
    pub bitmap_block: u64,
    /// Sectors per chunk.
    pub spc: u64,
    pub sectors: u64,
    /// Bytes per bitmap page: small pages put page boundaries in reach.
    pub page_bytes: usize,
    /// Unpinned pages kept resident (None: no cap).
    pub cap_pages: Option<u64>,
    /// Every page starts on file (read before its first use) rather than
    /// as a hole known to be zero.
    pub on_file: bool,
}

impl Config {
    /// The classic harness: 40 sectors, one 4 KiB page, no cap, no loads.
    pub fn new(capacity: usize, bitmap_block: u64, spc: u64) -> Config {
        Config {
            capacity,
            bitmap_block,
            spc,
            sectors: SECTORS,
            page_bytes: 4096,
            cap_pages: None,
            on_file: false,
        }
    }

    /// `sectors` sectors in pages of `page_bytes`, all on file, at most
    /// `cap_pages` unpinned pages resident.
    pub fn paged(mut self, sectors: u64, page_bytes: usize, cap_pages: u64) -> Config {
        self.sectors = sectors;
        self.page_bytes = page_bytes;
        self.cap_pages = Some(cap_pages);
        self.on_file = true;
        self
    }
}

#[derive(Clone, Debug)]
pub struct ReqModel {
    pub req: DiskRequest,
    /// Read: values seen per sector. Write: its tag.
    pub seen: Vec<u64>,
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
    /// A read of one of its bitmap pages failed while it was in flight.
    may_fail: bool,
    done: Option<Status>,
}

/// When a script's backup starts (rule 10) and what it may do.
#[derive(Clone, Copy, Debug)]
pub struct BackupPlan {
    /// Available once this many requests were submitted.
    pub after: usize,
    pub cluster_sectors: u64,
    /// Whether it may be cancelled.
    pub cancel: bool,
    /// The worker thread whose engine copies.
    pub thread: ThreadId,
}

/// A backup job as the model sees it: the disk at the moment it started,
/// and the target's sectors.
#[derive(Clone, Debug)]
pub struct BackupModel {
    /// Requests numbered from here were submitted after the start.
    first_after: u64,
    /// Per sector, the values the copy may hold: what a read submitted at
    /// the start could return (writes in flight then, either way).
    snapshot: Vec<BTreeSet<u64>>,
    /// The target; 0: never written.
    pub target: Vec<u64>,
    /// Clusters whose write to the target completed.
    copied: BTreeSet<u64>,
    cluster: u64,
    pub ended: Option<JobProgress>,
    /// A failure was injected where the job may fail of it.
    may_fail: bool,
    cancelled: bool,
}

#[derive(Clone)]
pub struct Harness {
    pub sched: Scheduler,
    pub reqs: HashMap<u64, ReqModel>,
    next_req: u64,
    pub in_flight: Vec<InFlight>,
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
    sectors: u64,
    /// Bitmap writes and loads come in multiples of this.
    block: u64,
    page_bytes: u64,
    cap_pages: Option<u64>,
    /// Copy-up bounce buffers: what the fake engine read into them.
    bounces: HashMap<u64, Vec<u64>>,
    /// Per thread: an issue was refused and no completion has freed room since.
    refused: [bool; QUEUES],
    /// Issue every operation as soon as the engine has room (exhaustive
    /// runs branch only on submissions and completion order).
    pub auto_issue: bool,
    pub steps: u64,
    pub backup_plan: Option<BackupPlan>,
    pub backup: Option<BackupModel>,
}

#[derive(Clone, Copy, Debug)]
pub enum Action {
    Submit(ReqKind, u64, u64, ThreadId),
    Issue(ThreadId),
    Complete(usize),
    Fail(usize),
    StartBackup,
    CancelBackup,
}

impl Harness {
    pub fn new(capacity: usize, bitmap_block: u64) -> Harness {
        Harness::chunked(capacity, bitmap_block, 1)
    }

    /// A COW file whose bits cover `spc` sectors each (rule 9).
    pub fn chunked(capacity: usize, bitmap_block: u64, spc: u64) -> Harness {
        Harness::with(Config::new(capacity, bitmap_block, spc))
    }

    pub fn with(c: Config) -> Harness {
        let chunks = c.sectors / c.spc;
        let mut bitmap = Bitmap::new(chunks, 512 * c.spc).with_page_bytes(c.page_bytes);
        if let Some(cap) = c.cap_pages {
            bitmap = bitmap.with_cap_bytes(cap * c.page_bytes as u64);
        }
        if c.on_file {
            let mut all = RangeSet::new();
            all.insert(0..bitmap.alloc_len() as u64 / c.page_bytes as u64);
            bitmap = bitmap.with_on_file(all);
        }
        let layout = CowLayout {
            bitmap_offset: BITMAP_OFFSET,
            data_offset: DATA_OFFSET,
            bitmap_block: c.bitmap_block,
            storable_chunks: chunks,
        };
        let bytes = bitmap.alloc_len();
        let sectors = to_usize(c.sectors);
        Harness {
            sched: Scheduler::new_cow(c.sectors, bitmap, layout, QUEUES, false),
            reqs: HashMap::new(),
            next_req: 1,
            in_flight: Vec::new(),
            capacity: c.capacity,
            cow_data: vec![UNWRITTEN; sectors],
            disk_bitmap: vec![0; bytes],
            durable_data: vec![UNWRITTEN; sectors],
            durable_bitmap: vec![0; bytes],
            possible: (0..c.sectors)
                .map(|s| BTreeSet::from([backing_tag(s)]))
                .collect(),
            completed_writes: Vec::new(),
            bitmap_ops_in_flight: BTreeSet::new(),
            failed_device: false,
            spc: c.spc,
            sectors: c.sectors,
            block: c.bitmap_block,
            page_bytes: c.page_bytes as u64,
            cap_pages: c.cap_pages,
            bounces: HashMap::new(),
            refused: [false; QUEUES],
            auto_issue: false,
            steps: 0,
            backup_plan: None,
            backup: None,
        }
    }

    /// The bitmap pages a request over these sectors uses.
    fn pages_of(&self, sector: u64, count: u64) -> std::ops::Range<u64> {
        let first = sector / self.spc / 8 / self.page_bytes;
        let last = (sector + count - 1) / self.spc / 8 / self.page_bytes;
        first..last + 1
    }

    /// The bit in memory, or None while its page is not resident.
    fn mem_bit(&self, sector: u64) -> Option<bool> {
        self.sched.bitmap().unwrap().try_get(sector / self.spc)
    }

    fn disk_bit(&self, bitmap: &[u8], sector: u64) -> bool {
        let c = sector / self.spc;
        bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0
    }

    pub fn submit(&mut self, kind: ReqKind, sector: u64, count: u64, thread: ThreadId) {
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
            may_fail: false,
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
                            assert_eq!(
                                self.mem_bit(s),
                                Some(true),
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
                snapshot = self.sched.bitmap().unwrap().bytes(start..start + len);
                self.bitmap_ops_in_flight.insert(op.id);
            }
            OpKind::BitmapLoad { offset, page, len } => {
                // Read now, as early as a kernel could.
                let start = offset - BITMAP_OFFSET;
                assert_eq!(
                    start,
                    page * self.page_bytes,
                    "load of page {page} elsewhere"
                );
                assert!(len <= self.page_bytes && len % self.bitmap_block() == 0);
                let range = to_usize(start)..to_usize(start + len);
                snapshot = self.disk_bitmap[range].to_vec();
                self.sched.load_buf(page)[..to_usize(len)].copy_from_slice(&snapshot);
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
            OpKind::BackupRead {
                target,
                offset,
                len,
                bounce,
                bounce_offset,
                bounce_len,
            } => {
                let first = match target {
                    Target::Cow => (offset - DATA_OFFSET) / 512,
                    Target::Backing => offset / 512,
                };
                let mut vals = Vec::new();
                for s in first..first + len / 512 {
                    let v = match target {
                        Target::Cow => {
                            assert_eq!(
                                self.mem_bit(s),
                                Some(true),
                                "backup read of COW sector {s} whose bit is not set"
                            );
                            self.cow_data[to_usize(s)]
                        }
                        Target::Backing => backing_tag(s),
                    };
                    assert_ne!(
                        v, UNWRITTEN,
                        "backup read of sector {s} saw unwritten COW data"
                    );
                    vals.push(v);
                }
                let buf = self
                    .bounces
                    .entry(bounce)
                    .or_insert_with(|| vec![0; to_usize(bounce_len / 512)]);
                let at = to_usize(bounce_offset / 512);
                buf[at..at + vals.len()].copy_from_slice(&vals);
            }
            OpKind::Write { offset, len, .. }
            | OpKind::Zero { offset, len }
            | OpKind::CopyWrite { offset, len, .. } => self.check_copied_first(&op, offset, len),
            OpKind::BackupWrite { .. } | OpKind::BackupSync { .. } => {}
        }
        self.in_flight.push(InFlight { op, snapshot });
    }

    /// Rule 10: while a backup runs, a write submitted after its start
    /// changes only clusters already in the target.
    fn check_copied_first(&self, op: &Op, offset: u64, len: u64) {
        let Some(b) = &self.backup else { return };
        let running = self
            .sched
            .backup_progress()
            .is_some_and(|p| p.state == JobState::Running);
        let req = op.req.unwrap();
        if !running || req < b.first_after {
            return;
        }
        let first = (offset - DATA_OFFSET) / 512;
        for s in first..first + len / 512 {
            assert!(
                b.copied.contains(&(s / b.cluster)),
                "rule 10: write {req} reaches sector {s} before its cluster was copied"
            );
        }
    }

    fn start_backup(&mut self) {
        let plan = self.backup_plan.expect("no backup planned");
        let spc = self.spc;
        self.sched
            .start_backup(1, plan.thread, plan.cluster_sectors)
            .expect("a backup starts");
        self.backup = Some(BackupModel {
            first_after: self.next_req,
            snapshot: self.possible.clone(),
            target: vec![0; to_usize(self.sectors)],
            copied: BTreeSet::new(),
            cluster: plan.cluster_sectors.div_ceil(spc) * spc,
            ended: None,
            may_fail: false,
            cancelled: false,
        });
        self.after_backup_step();
    }

    /// What the scheduler hands back of the job after each step.
    fn after_backup_step(&mut self) {
        for q in 0..QUEUES {
            while let Some(b) = self.sched.pop_freed_bounce(q) {
                self.bounces.remove(&b);
            }
        }
        if let Some(end) = self.sched.take_backup_ended() {
            let b = self
                .backup
                .as_mut()
                .expect("a job ended that never started");
            assert!(b.ended.is_none(), "the job ended twice");
            b.ended = Some(end);
        }
    }

    fn backup_io(&mut self, op: Op, fail: bool) {
        let result = match op.kind {
            OpKind::BackupWrite {
                offset,
                len,
                bounce,
                ..
            } => {
                let data = self
                    .bounces
                    .remove(&bounce)
                    .expect("backup write before its read");
                assert_eq!(data.len() as u64, len / 512);
                let b = self.backup.as_mut().unwrap();
                if fail {
                    b.may_fail = true;
                    Err(libc::EIO)
                } else {
                    let first = to_usize(offset / 512);
                    b.target[first..first + data.len()].copy_from_slice(&data);
                    b.copied.insert(offset / 512 / b.cluster);
                    Ok(len)
                }
            }
            OpKind::BackupSync { .. } => {
                let b = self.backup.as_mut().unwrap();
                assert_eq!(
                    b.copied.len() as u64,
                    self.sectors.div_ceil(b.cluster),
                    "target synced before every cluster was in it"
                );
                if fail {
                    b.may_fail = true;
                    Err(libc::EIO)
                } else {
                    Ok(0)
                }
            }
            _ => unreachable!(),
        };
        self.sched.backup_io_done(op.id, result);
        self.drain_done();
    }

    fn complete(&mut self, idx: usize, fail: bool) {
        let f = self.in_flight.remove(idx);
        self.refused = [false; QUEUES];
        let op = f.op;
        if matches!(
            op.kind,
            OpKind::BackupWrite { .. } | OpKind::BackupSync { .. }
        ) {
            return self.backup_io(op, fail);
        }
        if fail
            && matches!(
                op.kind,
                OpKind::BackupRead { .. } | OpKind::BitmapLoad { .. }
            )
        {
            if let Some(b) = &mut self.backup {
                b.may_fail = true;
            }
        }
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
            OpKind::BitmapLoad { offset, page, len } => {
                let start = to_usize(offset - BITMAP_OFFSET);
                assert_eq!(
                    &self.disk_bitmap[start..start + to_usize(len)],
                    &f.snapshot[..],
                    "bitmap page {page} written in the file while it was being read"
                );
                if fail {
                    for r in self.reqs.values_mut() {
                        let q = r.req;
                        if r.done.is_none()
                            && q.kind != ReqKind::Flush
                            && (q.sector / self.spc / 8 / self.page_bytes
                                ..=(q.sector + q.count - 1) / self.spc / 8 / self.page_bytes)
                                .contains(&page)
                        {
                            r.may_fail = true;
                        }
                    }
                }
            }
            OpKind::BitmapWrite { start, len, .. } => {
                self.bitmap_ops_in_flight.remove(&op.id);
                if !fail {
                    let now = self.sched.bitmap().unwrap().bytes(start..start + len);
                    assert_eq!(now, f.snapshot, "(b) pending bitmap bytes changed");
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
            OpKind::Read { .. } | OpKind::CopyRead { .. } | OpKind::BackupRead { .. } => {}
            OpKind::BackupWrite { .. } | OpKind::BackupSync { .. } => unreachable!(),
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
                if status != Status::Ok {
                    // (g) reads keep working, unless their bitmap page
                    // could not be read.
                    assert!(m.may_fail, "read {id} failed");
                    return;
                }
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
                        self.failed_device || self.reqs[&id].may_fail,
                        "write {id} failed without an injected error"
                    );
                    let before = self.reqs[&id].before.clone();
                    for (i, set) in before.into_iter().enumerate() {
                        let s = to_usize(req.sector) + i;
                        // Its bits never went out: older data is back. Its
                        // bits were set (its own bitmap write failed): its
                        // data may show. Also for reads already in flight.
                        let visible: BTreeSet<u64> = if self.mem_bit(s as u64) == Some(true) {
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
                        if let Some(b) = &mut self.backup {
                            if id < b.first_after {
                                b.snapshot[s].extend(visible.iter().copied());
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

    fn bitmap_block(&self) -> u64 {
        self.block
    }

    /// Invariants that hold between any two steps.
    fn check(&self) {
        // Data first: a bit on disk always covers written data.
        for s in 0..self.sectors {
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
            if self.mem_bit(s) == Some(true) {
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
                assert!(
                    self.sched.bitmap().unwrap().bytes_equal(start, &f.snapshot),
                    "(b) pending bitmap bytes changed"
                );
            }
        }
        // (g) after a metadata failure, no new write succeeds.
        if self.failed_device {
            assert!(self.sched.failure().is_some());
        }
    }

    pub fn actions(&self, script: &[(ReqKind, u64, u64, ThreadId)], inject: bool) -> Vec<Action> {
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
            if inject
                && matches!(
                    f.op.kind,
                    OpKind::BitmapWrite { .. }
                        | OpKind::BitmapLoad { .. }
                        | OpKind::BackupRead { .. }
                        | OpKind::BackupWrite { .. }
                        | OpKind::BackupSync { .. }
                )
            {
                a.push(Action::Fail(i));
            }
        }
        if let Some(plan) = self.backup_plan {
            match &self.backup {
                None if submitted >= plan.after => a.push(Action::StartBackup),
                Some(b) if plan.cancel && !b.cancelled && b.ended.is_none() => {
                    a.push(Action::CancelBackup);
                }
                _ => {}
            }
        }
        a
    }

    pub fn apply(&mut self, a: Action) {
        self.steps += 1;
        match a {
            Action::Submit(k, s, c, q) => self.submit(k, s, c, q),
            Action::Issue(q) => self.issue(q),
            Action::Complete(i) => self.complete(i, false),
            Action::Fail(i) => self.complete(i, true),
            Action::StartBackup => self.start_backup(),
            Action::CancelBackup => {
                let b = self.backup.as_mut().unwrap();
                b.cancelled = true;
                let running = self
                    .sched
                    .backup_progress()
                    .is_some_and(|p| p.state == JobState::Running);
                assert_eq!(self.sched.cancel_backup(1), running);
                self.drain_done();
            }
        }
        if self.backup.is_some() {
            self.after_backup_step();
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

    /// A random schedule: each choice picks one of the possible actions
    /// (biased away from failures, so most runs go on long after one),
    /// then everything is drained and checked.
    pub fn run_random(
        &mut self,
        script: &[(ReqKind, u64, u64, ThreadId)],
        choices: &[u32],
        inject: bool,
    ) {
        for &c in choices {
            let actions = self.actions(script, inject);
            if actions.is_empty() {
                break;
            }
            let mut a = actions[c as usize % actions.len()];
            if matches!(a, Action::Fail(_)) && c % 7 != 0 {
                a = actions[0];
            }
            self.apply(a);
        }
        self.finish();
    }

    /// (d) once everything has completed, nothing is left anywhere.
    pub fn finish(&mut self) {
        if self.backup_plan.is_some() && self.backup.is_none() {
            self.apply(Action::StartBackup);
        }
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
        assert!(self.bounces.is_empty(), "bounce buffers leaked");
        if let Some(b) = &self.backup {
            let end = b.ended.as_ref().expect("the backup never ended");
            match end.state {
                JobState::Completed => {
                    // Rule 10: the target is the disk at the start, sector
                    // by sector (a write in flight then either way).
                    for s in 0..to_usize(self.sectors) {
                        assert!(
                            b.snapshot[s].contains(&b.target[s]),
                            "backup: target sector {s} holds {}, the disk at the start one of {:?}",
                            b.target[s],
                            b.snapshot[s]
                        );
                    }
                    assert_eq!(end.clusters_done, end.clusters_total);
                }
                JobState::Cancelled => assert!(b.cancelled, "{end:?}"),
                JobState::Failed => assert!(b.may_fail, "backup failed: {end:?}"),
                JobState::Running => unreachable!("ended while running"),
            }
        }
        let bitmap = self.sched.bitmap().unwrap();
        if !self.failed_device {
            // Nothing pinned: the cap holds, and what is resident is what
            // the file holds (a page dropped and read again lost nothing).
            if let Some(cap) = self.cap_pages {
                assert!(bitmap.resident_pages() as u64 <= cap, "{bitmap:?}");
            }
            let pb = self.page_bytes;
            for page in 0..self.disk_bitmap.len() as u64 / pb {
                if bitmap.is_loaded(page) {
                    let range = page * pb..(page + 1) * pb;
                    assert_eq!(
                        bitmap.bytes(range.clone()),
                        &self.disk_bitmap[to_usize(range.start)..to_usize(range.end)],
                        "page {page} differs from the file"
                    );
                }
            }
        }
        // No update lost: what the files hold is the last write of each sector.
        if !self.failed_device {
            for s in 0..self.sectors {
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
