//! The ordering rules of the COW write path (docs/design.md, "The write path's ordering rules") as a state
//! machine with no I/O, threads or clocks of its own.
//!
//! Callers hand it guest requests (`submit`), take the operations it wants
//! issued (`pop_op`), report what the I/O engine did with them
//! (`op_done`, `op_refused`), and take finished requests (`pop_done`).
//! Every operation and every finished request belongs to a thread, so a
//! thread only ever issues I/O on its own engine and completes
//! requests on its own ring; `take_kicks` says which other threads gained
//! work from a call.
//!
//! Bitmap writes go out straight from the in-memory bitmap. The byte range
//! a bitmap write covers (widened to `bitmap_block` for O_DIRECT) is the
//! unit of overlap: while a write over a range is pending, nothing in that
//! range changes.
//!
//! The bitmap is held in pages (`format::bitmap`). A request pins the
//! pages its sectors use from `submit` until it finishes; a page that is
//! on file and not resident is read by a `BitmapLoad` operation first,
//! which the request waits for (docs/design.md, "The bitmap in pages").
//!
//! A backup job (rule 10, copy-before-write) copies the disk as it was at
//! its start: each cluster is read by an internal read request (pins,
//! loads and rule 4 as for any read) into a bounce buffer and written to
//! the target; guest writes over clusters not yet copied wait for them
//! (`copy_before_write.rs` keeps the clusters' states).

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;

use rustc_hash::FxHashMap;

use super::copy_before_write::{CopyJob, Copying, JobProgress, JobState};
use crate::format::bitmap::{Bitmap, Extent, Pinned};
use crate::units::SECTOR_BYTES;

/// The ids of a backup job's internal reads (one per cluster being
/// copied) have this bit set; guest request ids never do.
const BACKUP_READ: ReqId = 1 << 63;

/// Cluster copies a backup keeps in flight; writes waiting for a cluster
/// may start as many again (they go first: rule 10).
const BACKUP_COPIES: usize = 4;

pub type ReqId = u64;
pub type OpId = u64;
pub type ThreadId = usize;

/// The status the guest gets; mapped to VIRTIO_BLK_S_* by the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    /// DISCARD and WRITE_ZEROES: the sectors read back as zeros afterwards.
    Zero,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRequest {
    pub id: ReqId,
    pub thread: ThreadId,
    pub kind: ReqKind,
    pub sector: u64,
    pub count: u64,
}

/// Which file a data operation addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Backing,
    /// The COW file (or, for a raw disk, the image).
    Cow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into the request's buffers at `buf_offset`.
    Read {
        target: Target,
        offset: u64,
        len: u64,
        buf_offset: u64,
    },
    /// Write `len` bytes from the request's buffers at `buf_offset`.
    Write {
        offset: u64,
        len: u64,
        buf_offset: u64,
    },
    /// Make `len` bytes at `offset` read as zeros (fallocate).
    Zero { offset: u64, len: u64 },
    /// Write bitmap bytes `[start, start + len)` from memory to the file at
    /// `offset` (`Scheduler::bitmap_segments`). The bytes stay unchanged
    /// until this completes.
    BitmapWrite { offset: u64, start: u64, len: u64 },
    /// Read `len` bytes of the COW file at `offset` into bitmap page
    /// `page` (`Scheduler::load_ptr`). The memory stays put and unread
    /// until this completes; a short read leaves zeros.
    BitmapLoad { offset: u64, page: u64, len: u64 },
    /// fdatasync of the COW (or raw) file.
    Sync,
    /// Copy-up, first half: read `len` backing bytes at `offset` into
    /// bounce buffer `bounce` (allocated by the caller on issue).
    CopyRead { offset: u64, len: u64, bounce: u64 },
    /// Copy-up, second half: write bounce buffer `bounce` to the COW file
    /// at `offset`; the buffer is free once this completes.
    CopyWrite { offset: u64, len: u64, bounce: u64 },
    /// Backup (rule 10): read `len` bytes of the disk as the guest sees it
    /// (from `target` at `offset`) into bounce buffer `bounce` of
    /// `bounce_len` bytes (allocated by the caller on first use), at
    /// `bounce_offset`.
    BackupRead {
        target: Target,
        offset: u64,
        len: u64,
        bounce: u64,
        bounce_offset: u64,
        bounce_len: u64,
    },
    /// Backup: write bounce buffer `bounce` (`len` bytes) to job `job`'s
    /// target at `offset`, skipping it if all zero; the buffer is free once
    /// this completes. Reported with `Scheduler::backup_io_done`.
    BackupWrite {
        job: u64,
        offset: u64,
        len: u64,
        bounce: u64,
    },
    /// Backup: fdatasync of job `job`'s target. Reported with
    /// `Scheduler::backup_io_done`.
    BackupSync { job: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub id: OpId,
    pub thread: ThreadId,
    /// The guest request this data operation serves (None for bitmap writes).
    pub req: Option<ReqId>,
    pub kind: OpKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub id: ReqId,
    pub status: Status,
}

/// Where the COW file keeps things, for turning sectors into offsets.
#[derive(Debug, Clone, Copy)]
pub struct CowLayout {
    pub bitmap_offset: u64,
    pub data_offset: u64,
    /// Bitmap writes are widened to multiples of this (1 when buffered;
    /// the logical block size with O_DIRECT).
    pub bitmap_block: u64,
    /// Chunks whose bits fit in the file's bitmap area.
    pub storable_chunks: u64,
}

/// Counters of the write path, printed by the daemon at exit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub reads: u64,
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub backing_extents: u64,
    pub cow_extents: u64,
    pub bitmap_writes_issued: u64,
    pub bitmap_writes_waited: u64,
    pub bitmap_writes_merged: u64,
    pub bitmap_writes_parked: u64,
    pub reads_deferred: u64,
    pub copy_ups: u64,
    pub writes_queued_on_copy_up: u64,
    /// Guest writes that waited for a backup to copy their clusters first.
    pub writes_waited_on_backup: u64,
    /// Bitmap pages read from the file, dropped under the cap, and the
    /// requests that waited for a page to be read.
    pub bitmap_page_loads: u64,
    pub bitmap_pages_evicted: u64,
    pub requests_waited_for_pages: u64,
    pub errors: u64,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for this many bitmap pages to be read.
    Loading(u32),
    /// Data operations in flight (`ops_left` of them).
    Data,
    /// A write queued on the copy-up of this many chunks (rule 9).
    Queued(u32),
    /// Data done; waiting for an overlapping bitmap write to finish.
    Waiting,
    /// Part of an issued bitmap write.
    Pending,
    /// A read waiting for the bitmap writes with these sequence numbers.
    Deferred(Vec<u64>),
    /// A flush waiting for the bitmap writes numbered below this.
    Barrier(u64),
    /// A flush whose fdatasync is in flight.
    Syncing,
    /// A write waiting for a backup to copy its clusters (rule 10; the
    /// job counts them).
    BackupWait,
}

#[derive(Debug, Clone)]
struct ReqState {
    req: DiskRequest,
    phase: Phase,
    ops_left: u32,
    failed: bool,
    /// Sequence number while the request is in its bitmap phase.
    seq: u64,
    /// Chunks whose copy-up this write does.
    copies: Vec<u64>,
    /// Chunks whose copy-up record counts this read.
    counted_on: Vec<u64>,
    /// The bitmap pages of its sectors are pinned.
    pinned: bool,
}

impl ReqState {
    /// A request just submitted: in its data phase, nothing issued yet.
    fn new(req: DiskRequest) -> ReqState {
        ReqState {
            req,
            phase: Phase::Data,
            ops_left: 0,
            failed: false,
            seq: 0,
            copies: Vec::new(),
            counted_on: Vec::new(),
            pinned: false,
        }
    }
}

/// A chunk being copied up (rule 9), like a device-mapper snapshot's
/// pending exception: it lives while its owner is unfinished or any read
/// of the chunk's backing data or any queued write refers to it.
#[derive(Debug, Clone)]
struct ChunkRecord {
    owner: ReqId,
    /// The owner's copy-up and data are in the COW file: the chunk's COW
    /// data is whole, later writes need no copy-up.
    copied: bool,
    /// Reads of the chunk's backing data in flight.
    reads: u32,
    /// Writes waiting for the copy-up, in arrival order.
    queued: Vec<ReqId>,
}

#[derive(Debug, Clone)]
struct BitmapWrite {
    op: OpId,
    thread: ThreadId,
    range: Range<u64>,
    reqs: Vec<ReqId>,
}

#[derive(Debug, Clone)]
enum OpOwner {
    Data(ReqId),
    /// First half of a copy-up: its completion issues the write.
    CopyRead {
        req: ReqId,
        cow_offset: u64,
        len: u64,
        bounce: u64,
    },
    Bitmap,
    Load(u64),
    Sync(ReqId),
    BackupWrite {
        cluster: u64,
        len: u64,
    },
    BackupSync,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn union(a: &Range<u64>, b: &Range<u64>) -> Range<u64> {
    a.start.min(b.start)..a.end.max(b.end)
}

#[derive(Clone)]
pub struct Scheduler {
    sectors: u64,
    /// None for a raw disk.
    cow: Option<(Bitmap, CowLayout)>,
    read_only: bool,
    reqs: FxHashMap<ReqId, ReqState>,
    ops: FxHashMap<OpId, OpOwner>,
    next_op: OpId,
    next_seq: u64,
    /// Sequence numbers of write requests in their bitmap phase.
    in_bitmap_phase: BTreeSet<u64>,
    /// Bitmap writes issued (in flight or parked), by op id order.
    pending: Vec<BitmapWrite>,
    /// Write requests waiting for an overlapping bitmap write, in order.
    waiting: VecDeque<(ReqId, Range<u64>)>,
    deferred: Vec<ReqId>,
    barriers: Vec<ReqId>,
    /// Copy-up records by chunk.
    records: FxHashMap<u64, ChunkRecord>,
    /// Bitmap pages being read, with the requests waiting for each.
    loading: FxHashMap<u64, Vec<ReqId>>,
    next_bounce: u64,
    ready: Vec<VecDeque<Op>>,
    parked: Vec<VecDeque<Op>>,
    done: Vec<VecDeque<Done>>,
    kicks: Vec<bool>,
    failure: Option<String>,
    stats: Stats,
    /// The backup job (rule 10), until its last operation has completed.
    backup: Option<CopyJob>,
    /// A job that ended, until the caller takes it.
    backup_ended: Option<JobProgress>,
    /// Per thread: bounce buffers of backup reads whose cluster will not be
    /// written (the job ended or the read failed); the caller frees them.
    freed_bounces: Vec<Vec<u64>>,
}

impl Scheduler {
    /// A scheduler for a raw image of `sectors` sectors.
    pub fn new_raw(sectors: u64, threads: usize, read_only: bool) -> Scheduler {
        Scheduler::new(sectors, None, threads, read_only)
    }

    /// A scheduler for a COW disk; it owns the in-memory bitmap.
    pub fn new_cow(
        sectors: u64,
        bitmap: Bitmap,
        layout: CowLayout,
        threads: usize,
        read_only: bool,
    ) -> Scheduler {
        assert!(layout.bitmap_block.is_power_of_two());
        // Widened bitmap writes and loads stay inside their pages.
        assert_eq!(bitmap.page_bytes() as u64 % layout.bitmap_block, 0);
        Scheduler::new(sectors, Some((bitmap, layout)), threads, read_only)
    }

    fn new(
        sectors: u64,
        cow: Option<(Bitmap, CowLayout)>,
        threads: usize,
        read_only: bool,
    ) -> Scheduler {
        let threads = threads.max(1);
        Scheduler {
            sectors,
            cow,
            read_only,
            reqs: FxHashMap::default(),
            ops: FxHashMap::default(),
            next_op: 1,
            next_seq: 1,
            in_bitmap_phase: BTreeSet::new(),
            pending: Vec::new(),
            waiting: VecDeque::new(),
            deferred: Vec::new(),
            barriers: Vec::new(),
            records: FxHashMap::default(),
            loading: FxHashMap::default(),
            next_bounce: 1,
            ready: (0..threads).map(|_| VecDeque::new()).collect(),
            parked: (0..threads).map(|_| VecDeque::new()).collect(),
            done: (0..threads).map(|_| VecDeque::new()).collect(),
            kicks: vec![false; threads],
            failure: None,
            stats: Stats::default(),
            backup: None,
            backup_ended: None,
            freed_bounces: (0..threads).map(|_| Vec::new()).collect(),
        }
    }

    pub fn bitmap(&self) -> Option<&Bitmap> {
        self.cow.as_ref().map(|(b, _)| b)
    }

    /// The memory of a `BitmapWrite` of bytes `[start, start + len)`: one
    /// piece per page, in pinned pages that keep their address.
    pub fn bitmap_segments(
        &self,
        start: u64,
        len: u64,
    ) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        let (b, _) = self.cow.as_ref().expect("bitmap write on a raw disk");
        b.write_segments(start, len)
    }

    /// Where a `BitmapLoad` of `page` puts its bytes.
    pub fn load_ptr(&self, page: u64) -> *mut u8 {
        let (b, _) = self.cow.as_ref().expect("bitmap load on a raw disk");
        b.load_ptr(page)
    }

    /// The memory of a `BitmapLoad` of `page`, for a caller that reads it
    /// synchronously (tests).
    pub fn load_buf(&mut self, page: u64) -> &mut [u8] {
        let (b, _) = self.cow.as_mut().expect("bitmap load on a raw disk");
        b.load_buf(page)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Why writes are refused, after a bitmap write failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Copy-up records alive (for tests: none may leak).
    pub fn copy_up_records(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is in flight, queued, parked or waiting.
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty()
            && self.backup.is_none()
            && self.loading.is_empty()
            && self.pending.is_empty()
            && self.ready.iter().all(VecDeque::is_empty)
            && self.parked.iter().all(VecDeque::is_empty)
    }

    /// The next operation for `thread`'s engine: parked work first (rule 5).
    pub fn pop_op(&mut self, thread: ThreadId) -> Option<Op> {
        self.parked[thread]
            .pop_front()
            .or_else(|| self.ready[thread].pop_front())
    }

    /// Whether `thread` has operations to issue.
    pub fn has_ops(&self, thread: ThreadId) -> bool {
        !self.parked[thread].is_empty() || !self.ready[thread].is_empty()
    }

    pub fn pop_done(&mut self, thread: ThreadId) -> Option<Done> {
        self.done[thread].pop_front()
    }

    /// Queues other than the caller's that gained operations or finished
    /// requests since the last call; their threads need a wake-up.
    pub fn take_kicks(&mut self, me: ThreadId) -> Vec<ThreadId> {
        let mut out = Vec::new();
        for (q, k) in self.kicks.iter_mut().enumerate() {
            if *k && q != me {
                out.push(q);
            }
            *k = false;
        }
        out
    }

    /// The engine had no room for `op` (rule 5): keep it, never fail it.
    /// Bitmap writes go on the restart list, data operations back to the
    /// front of their queue; both are issued first once room frees up.
    pub fn op_refused(&mut self, op: Op) {
        if matches!(op.kind, OpKind::BitmapWrite { .. }) {
            self.stats.bitmap_writes_parked += 1;
            self.parked[op.thread].push_back(op);
        } else {
            self.ready[op.thread].push_front(op);
        }
    }

    fn finish(&mut self, id: ReqId, status: Status) {
        let st = self.reqs.remove(&id).expect("finishing an unknown request");
        if status != Status::Ok && id & BACKUP_READ == 0 {
            self.stats.errors += 1;
        }
        if st.pinned {
            self.unpin_pages(&st.req);
        }
        if id & BACKUP_READ == 0 {
            self.done[st.req.thread].push_back(Done { id, status });
            self.kicks[st.req.thread] = true;
        }
        for c in st.counted_on {
            if let Some(r) = self.records.get_mut(&c) {
                r.reads -= 1;
            }
            self.settle_record(c);
        }
        for c in st.copies {
            if let Some(r) = self.records.get_mut(&c) {
                if r.owner == id && !r.copied {
                    // The copy-up failed: forget it; queued writes start over.
                    let r = self.records.remove(&c).unwrap();
                    self.release_queued(r.queued);
                    continue;
                }
            }
            self.settle_record(c);
        }
        if id & BACKUP_READ != 0 {
            self.backup_read_done(id & !BACKUP_READ, status);
        }
    }

    /// Releases writes queued on a copy-up once it is complete and no read
    /// of the old data is in flight; frees the record once nothing refers
    /// to it (its owner finished, no reads, no queued writes).
    fn settle_record(&mut self, chunk: u64) {
        let Some(r) = self.records.get_mut(&chunk) else {
            return;
        };
        if r.copied && r.reads == 0 && !r.queued.is_empty() {
            let queued = std::mem::take(&mut r.queued);
            self.release_queued(queued);
        }
        let Some(r) = self.records.get(&chunk) else {
            return;
        };
        if r.reads == 0 && r.queued.is_empty() && !self.reqs.contains_key(&r.owner) {
            self.records.remove(&chunk);
        }
    }

    fn release_queued(&mut self, queued: Vec<ReqId>) {
        for q in queued {
            let st = self.reqs.get_mut(&q).expect("queued write vanished");
            let Phase::Queued(n) = &mut st.phase else {
                unreachable!("queued write in phase {:?}", st.phase)
            };
            *n -= 1;
            if *n == 0 {
                st.phase = Phase::Data;
                self.start_write(q);
            }
        }
    }

    fn emit(&mut self, thread: ThreadId, req: Option<ReqId>, kind: OpKind, owner: OpOwner) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, owner);
        self.ready[thread].push_back(Op {
            id,
            thread,
            req,
            kind,
        });
        self.kicks[thread] = true;
        id
    }

    fn emit_data(&mut self, id: ReqId, kind: OpKind) {
        let thread = self.reqs[&id].req.thread;
        self.emit(thread, Some(id), kind, OpOwner::Data(id));
        self.reqs.get_mut(&id).unwrap().ops_left += 1;
    }

    /// Accepts a guest request. The caller has validated it against the
    /// disk size; anything out of range here is still answered IOERR.
    pub fn submit(&mut self, req: DiskRequest) {
        assert!(
            !self.reqs.contains_key(&req.id),
            "request id {} reused while in flight",
            req.id
        );
        self.reqs.insert(req.id, ReqState::new(req));
        let bytes = req.count * SECTOR_BYTES;
        match req.kind {
            ReqKind::Read => {
                self.stats.reads += 1;
                self.stats.bytes_read += bytes;
            }
            ReqKind::Write => {
                self.stats.writes += 1;
                self.stats.bytes_written += bytes;
            }
            ReqKind::Zero => self.stats.zeroes += 1,
            ReqKind::Flush => self.stats.flushes += 1,
        }
        if req.kind == ReqKind::Flush {
            self.start_flush(req.id);
            return;
        }
        let in_range = req
            .sector
            .checked_add(req.count)
            .is_some_and(|end| end <= self.sectors);
        if !in_range || req.count == 0 {
            return self.finish(req.id, Status::IoErr);
        }
        let loads = self.pin_pages(req.id);
        if loads > 0 {
            self.stats.requests_waited_for_pages += 1;
            self.reqs.get_mut(&req.id).unwrap().phase = Phase::Loading(loads);
            return;
        }
        self.start(req.id);
    }

    fn start(&mut self, id: ReqId) {
        match self.reqs[&id].req.kind {
            ReqKind::Read => self.start_read(id),
            ReqKind::Write | ReqKind::Zero => self.start_write(id),
            ReqKind::Flush => unreachable!("a flush uses no bitmap page"),
        }
    }

    /// Pins the bitmap pages of request `id`'s sectors and asks for the
    /// reads of those not resident (one read per page, however many
    /// requests wait for it). Returns how many pages it waits for.
    fn pin_pages(&mut self, id: ReqId) -> u32 {
        let req = self.reqs[&id].req;
        let Some((bitmap, layout)) = self.cow.as_mut() else {
            return 0;
        };
        let blk = layout.bitmap_block;
        let bitmap_offset = layout.bitmap_offset;
        let mut waits = 0;
        let mut loads = Vec::new();
        for page in bitmap.pages_of_sectors(req.sector, req.count) {
            if bitmap.pin(page) == Pinned::Ready {
                continue;
            }
            if let Some(waiters) = self.loading.get_mut(&page) {
                waiters.push(id);
                waits += 1;
                continue;
            }
            let (start, len) = bitmap.load_span(page);
            if len == 0 {
                // Past what the file stores: zeros, nothing to read.
                bitmap.load_done(page);
                continue;
            }
            self.loading.insert(page, vec![id]);
            waits += 1;
            // Whole blocks for O_DIRECT; never past the page (the block
            // divides the page size).
            let len = len.div_ceil(blk) * blk;
            loads.push((page, bitmap_offset + start, len));
        }
        self.reqs.get_mut(&id).unwrap().pinned = true;
        for (page, offset, len) in loads {
            let kind = OpKind::BitmapLoad { offset, page, len };
            self.emit(req.thread, None, kind, OpOwner::Load(page));
        }
        waits
    }

    fn unpin_pages(&mut self, req: &DiskRequest) {
        let Some((bitmap, _)) = self.cow.as_mut() else {
            return;
        };
        for page in bitmap.pages_of_sectors(req.sector, req.count) {
            bitmap.unpin(page);
        }
        bitmap.evict();
        self.stats.bitmap_pages_evicted = bitmap.pages_evicted();
    }

    /// A bitmap page read finished: its waiters go on (or fail with it).
    fn load_done(&mut self, page: u64, result: Result<(), i32>) {
        let waiters = self
            .loading
            .remove(&page)
            .expect("load of a page nobody waits for");
        let (bitmap, layout) = self.cow.as_mut().unwrap();
        match result {
            Ok(()) => {
                bitmap.load_done(page);
                self.stats.bitmap_page_loads += 1;
            }
            Err(errno) => {
                bitmap.load_failed(page);
                crate::log_limited!(
                    log::Level::Error,
                    "bitmap page read",
                    "read of bitmap page {page} (file offset {}) failed: {}; its requests fail",
                    layout.bitmap_offset + (page << bitmap.page_bytes().trailing_zeros()),
                    std::io::Error::from_raw_os_error(errno)
                );
                for w in &waiters {
                    self.reqs.get_mut(w).unwrap().failed = true;
                }
            }
        }
        for w in waiters {
            let st = self.reqs.get_mut(&w).unwrap();
            let Phase::Loading(n) = &mut st.phase else {
                unreachable!("page waiter in phase {:?}", st.phase)
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            st.phase = Phase::Data;
            if st.failed {
                self.finish(w, Status::IoErr);
            } else {
                self.start(w);
            }
        }
    }

    /// Byte range of the bitmap covering sectors of `req`, widened.
    fn bitmap_range(bitmap: &Bitmap, layout: &CowLayout, sector: u64, count: u64) -> Range<u64> {
        let (first, n) = bitmap.chunk_range(sector, count);
        let blk = layout.bitmap_block;
        let start = first / 8 / blk * blk;
        let end = (first + n).div_ceil(8).div_ceil(blk) * blk;
        start..end
    }

    /// Sequence numbers of bitmap-phase writes whose bytes overlap `range`.
    fn overlapping_seqs(&self, range: &Range<u64>) -> Vec<u64> {
        let seq_of = |id: &ReqId| self.reqs[id].seq;
        let mut seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|w| overlaps(&w.range, range))
            .flat_map(|w| w.reqs.iter().map(seq_of))
            .collect();
        seqs.extend(
            self.waiting
                .iter()
                .filter(|(_, r)| overlaps(r, range))
                .map(|(id, _)| seq_of(id)),
        );
        seqs
    }

    fn start_read(&mut self, id: ReqId) {
        let req = self.reqs[&id].req;
        if let Some((bitmap, layout)) = &self.cow {
            // Rule 4: backing extents that share bitmap bytes with a bitmap
            // write not yet finished wait for it, then are mapped again.
            let mut seqs = Vec::new();
            for e in bitmap.map(req.sector, req.count).filter(|e| !e.in_cow) {
                let range = Self::bitmap_range(bitmap, layout, e.sector, e.count);
                seqs.extend(self.overlapping_seqs(&range));
            }
            if !seqs.is_empty() {
                self.stats.reads_deferred += 1;
                self.reqs.get_mut(&id).unwrap().phase = Phase::Deferred(seqs);
                self.deferred.push(id);
                return;
            }
        }
        self.issue_read(id);
    }

    fn issue_read(&mut self, id: ReqId) {
        let req = self.reqs[&id].req;
        let extents: Vec<Extent> = match &self.cow {
            Some((bitmap, _)) => bitmap.map(req.sector, req.count).collect(),
            None => vec![Extent {
                sector: req.sector,
                count: req.count,
                in_cow: true,
            }],
        };
        let data_offset = self.cow.as_ref().map_or(0, |(_, l)| l.data_offset);
        let raw = self.cow.is_none();
        let bounce = (id & BACKUP_READ != 0).then(|| self.backup_bounce(id));
        for e in extents {
            let (target, offset) = if e.in_cow {
                if !raw {
                    self.stats.cow_extents += 1;
                }
                (Target::Cow, data_offset + e.sector * SECTOR_BYTES)
            } else {
                self.stats.backing_extents += 1;
                self.count_read_on_records(id, e);
                (Target::Backing, e.sector * SECTOR_BYTES)
            };
            let len = e.count * SECTOR_BYTES;
            let buf_offset = (e.sector - req.sector) * SECTOR_BYTES;
            let kind = match bounce {
                Some(bounce) => OpKind::BackupRead {
                    target,
                    offset,
                    len,
                    bounce,
                    bounce_offset: buf_offset,
                    bounce_len: req.count * SECTOR_BYTES,
                },
                None => OpKind::Read {
                    target,
                    offset,
                    len,
                    buf_offset,
                },
            };
            self.emit_data(id, kind);
        }
    }

    /// A read of backing data in a chunk under copy-up counts on its
    /// record until the read finishes.
    fn count_read_on_records(&mut self, id: ReqId, e: Extent) {
        if self.records.is_empty() {
            return;
        }
        let Some((bitmap, _)) = &self.cow else { return };
        let (first, n) = bitmap.chunk_range(e.sector, e.count);
        for c in first..first + n {
            if let Some(r) = self.records.get_mut(&c) {
                r.reads += 1;
                self.reqs.get_mut(&id).unwrap().counted_on.push(c);
            }
        }
    }

    /// Rule 9: the unset chunks this write takes a record for, each with
    /// whether it needs copying up (only partly covered), or None if the
    /// write must queue behind records in progress (it is queued).
    ///
    /// A write covering a whole unset chunk takes a record too: a partial
    /// write arriving meanwhile must not copy backing data over it.
    fn plan_copy_ups(&mut self, id: ReqId) -> Option<Vec<(u64, bool)>> {
        let req = self.reqs[&id].req;
        let Some((bitmap, _)) = self.cow.as_ref() else {
            return Some(Vec::new()); // a raw image has no chunks
        };
        let spc = bitmap.sectors_per_chunk();
        if spc == 1 {
            return Some(Vec::new());
        }
        let (first, n) = bitmap.chunk_range(req.sector, req.count);
        let end = req.sector + req.count;
        let mut copies = Vec::new();
        let mut blockers = 0;
        for c in first..first + n {
            match self.records.get_mut(&c) {
                Some(r) if !r.copied => {
                    r.queued.push(id);
                    blockers += 1;
                }
                Some(_) => {}
                None if !bitmap.get(c) => {
                    let partial = req.sector > c * spc || end < (c + 1) * spc;
                    copies.push((c, partial));
                }
                None => {}
            }
        }
        if blockers > 0 {
            self.stats.writes_queued_on_copy_up += 1;
            self.reqs.get_mut(&id).unwrap().phase = Phase::Queued(blockers);
            return None;
        }
        Some(copies)
    }

    /// Takes the record of an unset `chunk` for write `id`, and with
    /// `partial` copies up the parts of the chunk the write does not cover.
    fn start_copy_up(&mut self, id: ReqId, chunk: u64, partial: bool) {
        let req = self.reqs[&id].req;
        let (bitmap, layout) = self.cow.as_ref().unwrap();
        let spc = bitmap.sectors_per_chunk();
        let data_offset = layout.data_offset;
        let (c_start, c_end) = (chunk * spc, (chunk + 1) * spc);
        let w_start = req.sector.clamp(c_start, c_end);
        let w_end = (req.sector + req.count).clamp(c_start, c_end);
        self.records.insert(
            chunk,
            ChunkRecord {
                owner: id,
                copied: false,
                reads: 0,
                queued: Vec::new(),
            },
        );
        let st = self.reqs.get_mut(&id).unwrap();
        st.copies.push(chunk);
        let thread = st.req.thread;
        if !partial {
            return;
        }
        self.stats.copy_ups += 1;
        for (from, to) in [(c_start, w_start), (w_end, c_end)] {
            if from >= to {
                continue;
            }
            let bounce = self.next_bounce;
            self.next_bounce += 1;
            let len = (to - from) * SECTOR_BYTES;
            let owner = OpOwner::CopyRead {
                req: id,
                cow_offset: data_offset + from * SECTOR_BYTES,
                len,
                bounce,
            };
            let kind = OpKind::CopyRead {
                offset: from * SECTOR_BYTES,
                len,
                bounce,
            };
            self.emit(thread, Some(id), kind, owner);
            self.reqs.get_mut(&id).unwrap().ops_left += 1;
        }
    }

    fn start_write(&mut self, id: ReqId) {
        let req = self.reqs[&id].req;
        if self.read_only {
            return self.finish(id, Status::IoErr);
        }
        let data_offset = match &self.cow {
            Some((bitmap, layout)) => {
                // Rule 8: after a metadata failure no write is accepted.
                if self.failure.is_some() {
                    return self.finish(id, Status::IoErr);
                }
                let (first, n) = bitmap.chunk_range(req.sector, req.count);
                if first + n > layout.storable_chunks {
                    // Old files whose bitmap cannot hold the bit are
                    // read-only there.
                    return self.finish(id, Status::IoErr);
                }
                layout.data_offset
            }
            None => 0,
        };
        if self.hold_for_backup(id) {
            return;
        }
        let Some(copies) = self.plan_copy_ups(id) else {
            return;
        };
        for (c, partial) in copies {
            self.start_copy_up(id, c, partial);
        }
        let offset = data_offset + req.sector * SECTOR_BYTES;
        let len = req.count * SECTOR_BYTES;
        let kind = match req.kind {
            ReqKind::Write => OpKind::Write {
                offset,
                len,
                buf_offset: 0,
            },
            _ => OpKind::Zero { offset, len },
        };
        self.emit_data(id, kind);
    }

    fn start_flush(&mut self, id: ReqId) {
        // Rule 7: wait for every bitmap write issued before this flush.
        let barrier = self.next_seq;
        self.reqs.get_mut(&id).unwrap().phase = Phase::Barrier(barrier);
        self.barriers.push(id);
        self.check_barriers();
    }

    fn check_barriers(&mut self) {
        let oldest = self.in_bitmap_phase.first().copied().unwrap_or(u64::MAX);
        let mut i = 0;
        while i < self.barriers.len() {
            let id = self.barriers[i];
            let Phase::Barrier(b) = self.reqs[&id].phase else {
                unreachable!()
            };
            if oldest >= b {
                self.barriers.swap_remove(i);
                let thread = self.reqs[&id].req.thread;
                self.reqs.get_mut(&id).unwrap().phase = Phase::Syncing;
                self.emit(thread, Some(id), OpKind::Sync, OpOwner::Sync(id));
            } else {
                i += 1;
            }
        }
    }

    /// The engine finished `op`: `Ok` with the bytes it moved, or an errno.
    /// Short reads are zero-filled by the caller and reported as success.
    pub fn op_done(&mut self, op: OpId, result: Result<(), i32>) {
        let owner = self.ops.remove(&op).expect("completion of an unknown op");
        match owner {
            OpOwner::Data(id) => self.data_done(id, result),
            OpOwner::CopyRead {
                req,
                cow_offset,
                len,
                bounce,
            } => {
                if result.is_err() {
                    return self.data_done(req, result);
                }
                let thread = self.reqs[&req].req.thread;
                let kind = OpKind::CopyWrite {
                    offset: cow_offset,
                    len,
                    bounce,
                };
                // Counted once with its read: ops_left is unchanged.
                self.emit(thread, Some(req), kind, OpOwner::Data(req));
            }
            OpOwner::Bitmap => self.bitmap_write_done(op, result),
            OpOwner::BackupWrite { len, .. } => {
                self.backup_io_done_as(owner, result.map(|()| len));
            }
            OpOwner::BackupSync => self.backup_io_done_as(owner, result.map(|()| 0)),
            OpOwner::Load(page) => self.load_done(page, result),
            OpOwner::Sync(id) => {
                let status = if result.is_ok() && self.failure.is_none() {
                    Status::Ok
                } else {
                    Status::IoErr
                };
                self.finish(id, status);
            }
        }
    }

    fn data_done(&mut self, id: ReqId, result: Result<(), i32>) {
        let st = self.reqs.get_mut(&id).expect("data op of unknown request");
        st.ops_left -= 1;
        st.failed |= result.is_err();
        if st.ops_left > 0 {
            return;
        }
        let (req, failed) = (st.req, st.failed);
        if failed {
            return self.finish(id, Status::IoErr);
        }
        if req.kind == ReqKind::Read || self.cow.is_none() {
            return self.finish(id, Status::Ok);
        }
        // The chunks it copied up are whole in the COW file now.
        let copies = self.reqs[&id].copies.clone();
        for c in copies {
            if let Some(r) = self.records.get_mut(&c) {
                r.copied = true;
            }
            self.settle_record(c);
        }
        // Rule 1: the data is in the COW file; now (and only now) its bits
        // may be set, when its bitmap write can go out.
        if self.failure.is_some() {
            return self.finish(id, Status::IoErr);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_bitmap_phase.insert(seq);
        self.reqs.get_mut(&id).unwrap().seq = seq;
        let (bitmap, layout) = self.cow.as_ref().unwrap();
        let range = Self::bitmap_range(bitmap, layout, req.sector, req.count);
        let busy = self.pending.iter().any(|w| overlaps(&w.range, &range))
            || self.waiting.iter().any(|(_, r)| overlaps(r, &range));
        if busy {
            // Rule 2: the bytes are being written; don't touch them.
            self.stats.bitmap_writes_waited += 1;
            self.reqs.get_mut(&id).unwrap().phase = Phase::Waiting;
            self.waiting.push_back((id, range));
            return;
        }
        if self.all_set(&req) {
            return self.leave_bitmap_phase(id, Status::Ok);
        }
        let op = self.open_bitmap_write(id, range);
        self.close_bitmap_write(op);
    }

    fn all_set(&self, req: &DiskRequest) -> bool {
        let (bitmap, _) = self.cow.as_ref().unwrap();
        bitmap.all_cow(req.sector, req.count)
    }

    fn leave_bitmap_phase(&mut self, id: ReqId, status: Status) {
        let seq = self.reqs[&id].seq;
        self.in_bitmap_phase.remove(&seq);
        self.finish(id, status);
    }

    /// Starts a bitmap write for `id` over `range`; more requests may join
    /// it before `close_bitmap_write` sets the bits and issues it.
    fn open_bitmap_write(&mut self, id: ReqId, range: Range<u64>) -> OpId {
        let thread = self.reqs[&id].req.thread;
        let op = self.next_op;
        self.next_op += 1;
        self.ops.insert(op, OpOwner::Bitmap);
        self.reqs.get_mut(&id).unwrap().phase = Phase::Pending;
        self.pending.push(BitmapWrite {
            op,
            thread,
            range,
            reqs: vec![id],
        });
        op
    }

    fn close_bitmap_write(&mut self, op: OpId) {
        let w = self.pending.iter().find(|w| w.op == op).unwrap();
        let (thread, range) = (w.thread, w.range.clone());
        let reqs: Vec<DiskRequest> = w.reqs.iter().map(|id| self.reqs[id].req).collect();
        let (bitmap, layout) = self.cow.as_mut().unwrap();
        for r in &reqs {
            let (first, n) = bitmap.chunk_range(r.sector, r.count);
            bitmap.set_range(first, n);
        }
        let kind = OpKind::BitmapWrite {
            offset: layout.bitmap_offset + range.start,
            start: range.start,
            len: range.end - range.start,
        };
        self.stats.bitmap_writes_issued += 1;
        self.ready[thread].push_back(Op {
            id: op,
            thread,
            req: None,
            kind,
        });
        self.kicks[thread] = true;
    }

    fn bitmap_write_done(&mut self, op: OpId, result: Result<(), i32>) {
        let idx = self
            .pending
            .iter()
            .position(|w| w.op == op)
            .expect("bitmap write not pending");
        let w = self.pending.remove(idx);
        match result {
            Ok(()) => {
                for id in w.reqs {
                    self.leave_bitmap_phase(id, Status::Ok);
                }
            }
            Err(errno) => {
                // Rule 8: the file's bitmap may now differ from memory.
                // Fail this write and everything waiting, refuse writes.
                let why = format!(
                    "bitmap write of bytes {}..{} failed: {}",
                    w.range.start,
                    w.range.end,
                    std::io::Error::from_raw_os_error(errno)
                );
                log::error!("{why}; the disk refuses writes from now on");
                self.failure.get_or_insert(why);
                // The file's bitmap may differ from memory: no resident
                // page is dropped, so none is ever read back from there.
                self.cow.as_mut().unwrap().0.freeze();
                for id in w.reqs {
                    self.leave_bitmap_phase(id, Status::IoErr);
                }
                for (id, _) in std::mem::take(&mut self.waiting) {
                    self.leave_bitmap_phase(id, Status::IoErr);
                }
            }
        }
        self.wake_waiters();
        self.wake_deferred_reads();
        self.check_barriers();
    }

    /// Rule 3: retry waiting writes in order. One that overlaps neither a
    /// pending write nor an earlier waiter goes out, and later waiters over
    /// the same bytes join it.
    fn wake_waiters(&mut self) {
        let mut still: VecDeque<(ReqId, Range<u64>)> = VecDeque::new();
        let mut opened: Vec<OpId> = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for (id, range) in waiting {
            let blocked_by_earlier = still.iter().any(|(_, r)| overlaps(r, &range));
            let mut blockers = self
                .pending
                .iter()
                .enumerate()
                .filter(|(_, w)| overlaps(&w.range, &range));
            let first = blockers.next();
            let second = blockers.next();
            match (first, second) {
                (None, _) if !blocked_by_earlier => {
                    let req = self.reqs[&id].req;
                    if self.all_set(&req) {
                        self.leave_bitmap_phase(id, Status::Ok);
                    } else {
                        opened.push(self.open_bitmap_write(id, range));
                    }
                }
                (Some((i, w)), None) if !blocked_by_earlier && opened.contains(&w.op) => {
                    // Overlaps only a write opened in this pass: join it if
                    // the union collides with nothing else.
                    let grown = union(&w.range, &range);
                    let clash = self
                        .pending
                        .iter()
                        .enumerate()
                        .any(|(j, o)| j != i && overlaps(&o.range, &grown))
                        || still.iter().any(|(_, r)| overlaps(r, &grown));
                    if clash {
                        still.push_back((id, range));
                    } else {
                        self.stats.bitmap_writes_merged += 1;
                        let w = &mut self.pending[i];
                        w.range = grown;
                        w.reqs.push(id);
                        self.reqs.get_mut(&id).unwrap().phase = Phase::Pending;
                    }
                }
                _ => still.push_back((id, range)),
            }
        }
        self.waiting = still;
        for op in opened {
            self.close_bitmap_write(op);
        }
    }

    fn wake_deferred_reads(&mut self) {
        let mut i = 0;
        while i < self.deferred.len() {
            let id = self.deferred[i];
            let Phase::Deferred(seqs) = &self.reqs[&id].phase else {
                unreachable!()
            };
            if seqs.iter().any(|s| self.in_bitmap_phase.contains(s)) {
                i += 1;
                continue;
            }
            self.deferred.swap_remove(i);
            self.reqs.get_mut(&id).unwrap().phase = Phase::Data;
            // Mapped again now: the bits may have changed meanwhile.
            self.issue_read(id);
        }
    }
}

/// Backup jobs: copy-before-write (docs/design.md, rule 10).
impl Scheduler {
    /// Starts backup job `id`: the point in time of the copy is now. Its
    /// clusters of `cluster_sectors` (rounded up to whole chunks) are
    /// copied by `thread`'s engine. Refused while a job is running or its
    /// last operations are in flight.
    pub fn start_backup(
        &mut self,
        id: u64,
        thread: ThreadId,
        cluster_sectors: u64,
    ) -> Result<(), String> {
        if let Some(j) = &self.backup {
            return Err(format!(
                "job {} is still {}; one job at a time",
                j.id,
                if j.state == JobState::Running {
                    "running"
                } else {
                    "finishing its last operations"
                }
            ));
        }
        if let Some(end) = &self.backup_ended {
            return Err(format!(
                "the end of job {} has not been reported yet",
                end.id
            ));
        }
        let spc = self.cow.as_ref().map_or(1, |(b, _)| b.sectors_per_chunk());
        let cluster = cluster_sectors.max(1).div_ceil(spc) * spc;
        self.backup = Some(CopyJob::new(
            id,
            thread.min(self.ready.len() - 1),
            self.sectors,
            cluster,
        ));
        self.pump_backup();
        Ok(())
    }

    /// Cancels job `id`: writes waiting for it go on at once; the copies in
    /// flight finish, then the job ends (`take_backup_ended`). False when
    /// no such job is running.
    pub fn cancel_backup(&mut self, id: u64) -> bool {
        match &self.backup {
            Some(j) if j.id == id && j.state == JobState::Running => {
                self.stop_backup(JobState::Cancelled, None);
                true
            }
            _ => false,
        }
    }

    /// The job running or finishing, as `query-jobs` shows it.
    pub fn backup_progress(&self) -> Option<JobProgress> {
        self.backup.as_ref().map(CopyJob::progress)
    }

    /// Whether the job's progress changed since the last call.
    pub fn take_backup_progressed(&mut self) -> bool {
        self.backup
            .as_mut()
            .is_some_and(|j| std::mem::take(&mut j.progressed))
    }

    /// The job that ended (completed, cancelled or failed) with nothing of
    /// it in flight any more, once.
    pub fn take_backup_ended(&mut self) -> Option<JobProgress> {
        self.backup_ended.take()
    }

    /// A bounce buffer of a backup read `thread` may free (its cluster is
    /// not going to be written).
    pub fn pop_freed_bounce(&mut self, thread: ThreadId) -> Option<u64> {
        self.freed_bounces[thread].pop()
    }

    /// A `BackupWrite` (`Ok(bytes written)`, 0 when skipped as all zero)
    /// or `BackupSync` (`Ok(0)`) finished.
    pub fn backup_io_done(&mut self, op: OpId, result: Result<u64, i32>) {
        let owner = self.ops.remove(&op).expect("completion of an unknown op");
        self.backup_io_done_as(owner, result);
    }

    fn backup_io_done_as(&mut self, owner: OpOwner, result: Result<u64, i32>) {
        let Some(job) = self.backup.as_mut() else {
            unreachable!("backup operation without a job")
        };
        match (owner, result) {
            (OpOwner::BackupWrite { cluster, .. }, Ok(bytes)) => {
                if job.state == JobState::Running {
                    let free = job.cluster_copied(cluster, bytes);
                    self.release_held(free);
                } else {
                    job.copying.remove(&cluster);
                }
            }
            (OpOwner::BackupWrite { cluster, .. }, Err(errno)) => {
                job.copying.remove(&cluster);
                let (first, _) = job.cluster_span(cluster);
                let why = format!(
                    "write of the target at offset {} failed: {}",
                    first * SECTOR_BYTES,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.stop_backup(JobState::Failed, Some(why));
            }
            (OpOwner::BackupSync, Ok(_)) => {
                job.syncing = false;
                if job.state == JobState::Running {
                    job.state = JobState::Completed;
                }
            }
            (OpOwner::BackupSync, Err(errno)) => {
                job.syncing = false;
                let why = format!(
                    "fdatasync of the target failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                );
                self.stop_backup(JobState::Failed, Some(why));
            }
            _ => unreachable!("not a backup operation"),
        }
        self.pump_backup();
    }

    /// Rule 10: a write or zeroing over clusters not yet in the target
    /// waits until they are (they are copied first). True if it waits.
    fn hold_for_backup(&mut self, id: ReqId) -> bool {
        let Some(job) = self.backup.as_mut() else {
            return false;
        };
        let req = self.reqs[&id].req;
        let n = job.hold_write(id, req.sector, req.count);
        if n == 0 {
            return false;
        }
        self.stats.writes_waited_on_backup += 1;
        self.reqs.get_mut(&id).unwrap().phase = Phase::BackupWait;
        self.pump_backup();
        true
    }

    /// Writes no cluster holds any more start (again) in arrival order.
    fn release_held(&mut self, ids: Vec<ReqId>) {
        for id in ids {
            let st = self.reqs.get_mut(&id).expect("held write vanished");
            debug_assert!(matches!(st.phase, Phase::BackupWait));
            st.phase = Phase::Data;
            self.start_write(id);
        }
    }

    fn stop_backup(&mut self, state: JobState, error: Option<String>) {
        let Some(job) = self.backup.as_mut() else {
            return;
        };
        if let Some(e) = &error {
            log::error!("backup job {}: {e}; the job failed", job.id);
        }
        let free = job.stop(state, error);
        self.release_held(free);
    }

    /// Keeps the job's copies going: urgent clusters first, up to the
    /// bound; the target's fdatasync once every cluster is in; the end of
    /// the job once nothing of it is in flight.
    fn pump_backup(&mut self) {
        loop {
            let Some(job) = self.backup.as_mut() else {
                return;
            };
            if job.state == JobState::Running {
                if job.syncing {
                    return;
                }
                let room = job.copying.len() < BACKUP_COPIES
                    || (job.copying.len() < 2 * BACKUP_COPIES && job.has_urgent());
                if room {
                    if let Some(c) = job.next_cluster() {
                        self.start_cluster_copy(c);
                        continue;
                    }
                }
                if job.all_copied() {
                    job.syncing = true;
                    let (thread, id) = (job.thread, job.id);
                    self.emit(
                        thread,
                        None,
                        OpKind::BackupSync { job: id },
                        OpOwner::BackupSync,
                    );
                }
                return;
            }
            if job.copying.is_empty() && !job.syncing {
                let ended = self.backup.take().map(|j| j.progress());
                self.backup_ended = ended;
            }
            return;
        }
    }

    /// Reads `cluster` as the guest sees it, as an internal read request:
    /// pages pinned and loaded, rule 4 and copy-up records obeyed, like
    /// any read; its data goes to a bounce buffer.
    fn start_cluster_copy(&mut self, cluster: u64) {
        let bounce = self.next_bounce;
        self.next_bounce += 1;
        let job = self.backup.as_mut().unwrap();
        job.copying.insert(cluster, Copying { bounce });
        let (sector, count) = job.cluster_span(cluster);
        let id = BACKUP_READ | cluster;
        let req = DiskRequest {
            id,
            thread: job.thread,
            kind: ReqKind::Read,
            sector,
            count,
        };
        self.reqs.insert(id, ReqState::new(req));
        let loads = self.pin_pages(id);
        if loads > 0 {
            self.reqs.get_mut(&id).unwrap().phase = Phase::Loading(loads);
            return;
        }
        self.start_read(id);
    }

    fn backup_bounce(&self, id: ReqId) -> u64 {
        let job = self.backup.as_ref().expect("backup read without a job");
        job.copying[&(id & !BACKUP_READ)].bounce
    }

    /// A cluster's read finished: write it to the target, unless the job
    /// ended meanwhile or the read failed (which fails the job).
    fn backup_read_done(&mut self, cluster: u64, status: Status) {
        let job = self.backup.as_mut().expect("backup read without a job");
        let (first, count) = job.cluster_span(cluster);
        let (thread, id) = (job.thread, job.id);
        let bounce = job.copying[&cluster].bounce;
        if job.state != JobState::Running || status != Status::Ok {
            job.copying.remove(&cluster);
            self.freed_bounces[thread].push(bounce);
            if status != Status::Ok {
                let why = format!("read of the disk at offset {} failed", first * SECTOR_BYTES);
                self.stop_backup(JobState::Failed, Some(why));
            }
            self.pump_backup();
            return;
        }
        let len = count * SECTOR_BYTES;
        let kind = OpKind::BackupWrite {
            job: id,
            offset: first * SECTOR_BYTES,
            len,
            bounce,
        };
        self.emit(thread, None, kind, OpOwner::BackupWrite { cluster, len });
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("requests", &self.reqs.len())
            .field("pending", &self.pending.len())
            .field("waiting", &self.waiting.len())
            .field("deferred", &self.deferred.len())
            .field("failure", &self.failure)
            .finish()
    }
}
