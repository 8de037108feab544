//! The steps of one worker thread: take requests off its virtqueues,
//! hand them to the scheduler, issue the scheduler's operations on the
//! thread's own I/O engine, and publish finished requests on the used
//! rings. The loop that runs these steps is `worker_thread.rs`.
//!
//! Locks: the scheduler's mutex is taken only by
//! [`Worker::sched_step_locked`], at most once per loop iteration (it
//! passes `&mut Scheduler` to [`Worker::sched_step`]). Reads that need no
//! ordering (raw images, COW reads of allocated chunks) skip it:
//! [`Worker::issue_off_lock`] issues them straight to the engine and
//! [`Worker::reap`] finishes them. A virtqueue's mutex is taken in
//! [`Worker::take_requests`] and [`Worker::publish`], never while the
//! scheduler's is held.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use slab::Slab;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::cow_magic_guard::{pin_first_sector, FirstSector};
use super::device::{Device, LockCounts};
use super::guest_memory::{Memory, MemoryGuard};
use super::request_stats::{self, RequestStats};
use super::scheduler::{
    DiskRequest, Done, Op, OpId, OpKind, ReqId, ReqKind, Scheduler, Status, Target, ThreadId,
};
use super::throttle::Charge;
use super::virtqueue::{Virtqueue, VirtqueueState};
use crate::fsutil::aligned::AlignedBuf;
use crate::io_engine::{Completion, IoEngine, IoOp, IoVecs, SubmitError};
use crate::units::{to_usize, SECTOR_SHIFT};
use crate::virtio::chain::{Chain, DescTable, HeadChain};
use crate::virtio::host_ranges::{HostRanges, RegionCache};
use crate::virtio::parse_request_in;
use crate::virtio::request::{
    write_status, BlkRequest, RequestType, Segment, STATUS_IOERR, STATUS_OK,
};

/// Bits of a scheduler request id: thread, slot, part (discard ranges).
const PART_BITS: u32 = 8;
const SLOT_BITS: u32 = 32;
/// Marks the engine user data of a read issued off the scheduler's lock
/// (the request id in the other bits); the scheduler's op ids count up
/// from 1 and never reach it.
const OFF_LOCK: u64 = 1 << 63;

/// The one place where the write path's outcome becomes a virtio status.
pub fn guest_status(status: Status) -> u8 {
    match status {
        Status::Ok => STATUS_OK,
        Status::IoErr => STATUS_IOERR,
    }
}

/// A guest request taken off a ring and not yet published.
struct InFlight {
    /// Its virtqueue's index.
    ring: u16,
    head: u16,
    req: BlkRequest,
    /// Keeps the guest memory the request's buffers live in mapped.
    mem: MemoryGuard,
    parts_left: u32,
    status: u8,
    /// Writethrough: the flush that follows the write has been submitted.
    flushed: bool,
    /// When the sweep that took it began (microseconds on the worker's
    /// clock, wrapping): fits in the padding after the fields above.
    taken_us: u32,
    /// The checked copy a guarded sector-0 write is done from. Boxed:
    /// it is rare, and 8 bytes less keep `InFlight` within the size the
    /// compiler copies inline when the slab takes it.
    _first_sector: Option<Box<AlignedBuf>>,
}

/// What an engine operation in flight needs at its completion.
enum Tracked {
    /// A read into guest buffers: zero-fill a short read.
    GuestRead {
        slot: usize,
        buf_offset: u64,
        len: u64,
    },
    /// A copy-up read into a bounce buffer: zero-fill, free on error.
    CopyRead { bounce: u64, len: u64 },
    /// A copy-up write from a bounce buffer: free it.
    CopyWrite { bounce: u64 },
    /// A backup read into part of a bounce buffer: zero-fill a short read
    /// (the scheduler says when the buffer is freed).
    BackupRead {
        bounce: u64,
        bounce_offset: u64,
        len: u64,
    },
    /// Nothing to do but report it.
    Plain,
}

/// Per-connection settings the steps need.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingMode {
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// The guest turned the write cache off: writes are flushed before
    /// they complete.
    pub writethrough: bool,
}

pub struct Worker {
    thread: ThreadId,
    engine: Box<dyn IoEngine>,
    inflight: Slab<InFlight>,
    /// Engine operations in flight that need work at completion, by user
    /// data (the scheduler's op id): the one table of them.
    ops: FxHashMap<OpId, Tracked>,
    /// Copy-up bounce buffers, from CopyRead issue to CopyWrite completion;
    /// backup bounce buffers, from the first BackupRead to the BackupWrite
    /// done (or the scheduler freeing them).
    bounces: FxHashMap<u64, AlignedBuf>,
    /// Backup writes and syncs of the target, done on this thread outside
    /// the scheduler's lock (`run_backup_io`): the engine's ring may touch
    /// the disk's files only.
    backup_io: Vec<Op>,
    /// Their results, for the next scheduler step.
    backup_done: Vec<(OpId, Result<u64, i32>)>,
    completions: Vec<Completion>,
    /// Finished requests not yet published.
    done: Vec<Done>,
    /// Heads of the chains taken off a ring in one walk, before they are
    /// parsed (kept: no allocation per pass).
    heads: Vec<u16>,
    /// Parts of requests taken this iteration, for the scheduler.
    to_submit: Vec<DiskRequest>,
    /// The other half of `to_submit`'s double buffer (no allocation when
    /// reads are taken out of it).
    to_submit_spare: Vec<DiskRequest>,
    /// Reads issued off the scheduler's lock and not yet reaped.
    off_lock_in_flight: usize,
    /// Their completions, split from the scheduler's at reap.
    off_lock_done: Vec<Completion>,
    /// The scheduler held operations for this thread after the last step
    /// (a full engine refused one, rule 5).
    sched_has_ops: bool,
    /// Reads off the lock completed since: the engine has room for those
    /// operations, and no scheduler completion will make a step run.
    sched_retry: bool,
    /// Threads the scheduler gave work to.
    kicks: Vec<ThreadId>,
    /// Per ring published to in this batch: a memory guard to notify with.
    touched: Vec<Option<MemoryGuard>>,
    /// Requests taken off the rings at most (backpressure beyond this
    /// leaves descriptors in the avail ring, rule 5).
    max_inflight: usize,
    /// A ring was left with descriptors because of backpressure: it must
    /// be looked at again when requests finish, as no kick will come.
    throttled: bool,
    /// Per-queue counters for the control socket, when kept.
    stats: Option<Arc<RequestStats>>,
    /// The clock request latencies are measured on.
    epoch: std::time::Instant,
    /// The current sweep's start on that clock.
    sweep_us: u32,
    /// Requests over the I/O limits (`throttle.rs`), oldest first: their
    /// scheduler parts, held back until the limits admit them.
    delayed: std::collections::VecDeque<Vec<DiskRequest>>,
    /// When the oldest delayed request may be admitted.
    retry_at: Option<std::time::Instant>,
    /// The guest memory regions the last pass's buffers were in.
    regions: RegionCache<Memory>,
}

/// What a request's parts cost against the I/O limits (a request counts
/// once however many parts it has).
fn charge_of(parts: &[DiskRequest]) -> Charge {
    let mut c = Charge::default();
    for p in parts {
        match p.kind {
            ReqKind::Read => {
                c.reads = 1;
                c.read_bytes += p.count << SECTOR_SHIFT;
            }
            ReqKind::Write => {
                c.writes = 1;
                c.write_bytes += p.count << SECTOR_SHIFT;
            }
            ReqKind::Zero => c.writes = 1,
            ReqKind::Flush => {}
        }
    }
    c
}

/// Counts a request published at `now_us` in its queue's stats.
fn count_finished(stats: &RequestStats, f: &InFlight, now_us: u32) {
    let kind = match f.req.req_type {
        RequestType::In => request_stats::Kind::Read,
        RequestType::Out => request_stats::Kind::Write,
        RequestType::Flush => request_stats::Kind::Flush,
        _ => request_stats::Kind::Other,
    };
    let ns = u64::from(now_us.wrapping_sub(f.taken_us)) * 1000;
    stats
        .queue(f.ring)
        .finished(kind, f.status == STATUS_OK, f.req.data_len, ns);
}

/// Builds the iovecs for bytes `[offset, offset + len)` of a request's
/// data buffers.
fn iovecs(segments: &[Segment], mut offset: u64, mut len: u64) -> IoVecs {
    let mut iov = IoVecs::new();
    for s in segments {
        let slen = s.len() as u64;
        if offset >= slen {
            offset -= slen;
            continue;
        }
        let take = (slen - offset).min(len);
        // SAFETY: offset < slen, so the pointer stays inside the segment.
        iov.push(unsafe { s.ptr().add(to_usize(offset)) }, to_usize(take));
        len -= take;
        offset = 0;
        if len == 0 {
            break;
        }
    }
    iov
}

fn zero_fill(segments: &[Segment], offset: u64, len: u64) {
    for v in iovecs(segments, offset, len).as_slice() {
        // SAFETY: the segments are guest memory checked by the parser and
        // kept mapped by the request's memory guard.
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

impl Worker {
    pub fn new(thread: ThreadId, engine: Box<dyn IoEngine>) -> Worker {
        let max_inflight = engine.capacity() * 2;
        Worker {
            thread,
            engine,
            inflight: Slab::new(),
            ops: FxHashMap::default(),
            bounces: FxHashMap::default(),
            backup_io: Vec::new(),
            backup_done: Vec::new(),
            completions: Vec::new(),
            done: Vec::new(),
            heads: Vec::new(),
            to_submit: Vec::new(),
            to_submit_spare: Vec::new(),
            off_lock_in_flight: 0,
            off_lock_done: Vec::new(),
            sched_has_ops: false,
            sched_retry: false,
            kicks: Vec::new(),
            touched: Vec::new(),
            max_inflight,
            throttled: false,
            stats: None,
            epoch: std::time::Instant::now(),
            sweep_us: 0,
            delayed: std::collections::VecDeque::new(),
            retry_at: None,
            regions: RegionCache::default(),
        }
    }

    /// Holds the request whose parts start at `first_part` of `to_submit`
    /// back if the I/O limits do not admit it now (or older ones wait).
    fn throttle(&mut self, dev: &Device, first_part: usize) {
        let charge = charge_of(&self.to_submit[first_part..]);
        if charge.is_free() {
            return;
        }
        if self.delayed.is_empty() {
            let now = std::time::Instant::now();
            match dev.throttle.admit(&charge, now) {
                Ok(()) => return,
                Err(wait) => self.retry_at = Some(now + wait),
            }
        }
        let parts = self.to_submit.drain(first_part..).collect();
        self.delayed.push_back(parts);
    }

    /// Submits the delayed requests the I/O limits admit now, oldest
    /// first.
    pub fn release_delayed(&mut self, dev: &Device) {
        if self.delayed.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        while let Some(parts) = self.delayed.front() {
            if let Err(wait) = dev.throttle.admit(&charge_of(parts), now) {
                self.retry_at = Some(now + wait);
                return;
            }
            let parts = self.delayed.pop_front().unwrap_or_default();
            self.to_submit.extend(parts);
        }
        self.retry_at = None;
    }

    /// Submits every delayed request whatever the limits (a ring is being
    /// stopped: it must not wait for the limits).
    pub fn release_all_delayed(&mut self) {
        for parts in self.delayed.drain(..) {
            self.to_submit.extend(parts);
        }
        self.retry_at = None;
    }

    /// How long until a delayed request may be admitted (None: none is).
    pub fn delayed_wait(&self) -> Option<std::time::Duration> {
        self.retry_at
            .map(|at| at.saturating_duration_since(std::time::Instant::now()))
    }

    /// Counts finished requests per queue into `stats`.
    pub fn with_stats(mut self, stats: Arc<RequestStats>) -> Worker {
        self.stats = Some(stats);
        self
    }

    /// Microseconds on the worker's clock, wrapping (every 71 minutes;
    /// latencies are differences). Not read at all without stats.
    fn clock_us(&self) -> u32 {
        if self.stats.is_none() {
            return 0;
        }
        #[allow(clippy::cast_possible_truncation)] // wrapping on purpose
        let us = self.epoch.elapsed().as_micros() as u32;
        us
    }

    pub fn engine_fd(&self) -> i32 {
        self.engine.event_fd()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Guest requests taken and not yet published.
    pub fn requests_in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn has_requests_on(&self, ring: u16) -> bool {
        self.inflight.iter().any(|(_, f)| f.ring == ring)
    }

    /// Engine operations in flight.
    pub fn ops_in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Copy-up bounce buffers held.
    pub fn bounce_buffers(&self) -> usize {
        self.bounces.len()
    }

    /// Rings were left unread for backpressure and there is room again.
    pub fn should_retake(&self) -> bool {
        self.throttled && self.inflight.len() < self.max_inflight
    }

    /// Work for the scheduler is waiting: parts to submit or completions
    /// to report.
    pub fn has_sched_input(&self) -> bool {
        !self.to_submit.is_empty()
            || !self.completions.is_empty()
            || !self.backup_done.is_empty()
            || self.sched_retry
    }

    /// Backup writes or their results wait (the loop is busy with a
    /// backup's copies).
    pub fn has_backup_work(&self) -> bool {
        !self.backup_io.is_empty() || !self.backup_done.is_empty()
    }

    /// Finished requests are waiting to be published.
    pub fn has_done(&self) -> bool {
        !self.done.is_empty()
    }

    /// Whether the loop has work without waiting for an event: parts to
    /// submit, completions to report, requests to publish, or a ring left
    /// unread for backpressure that has room again (no kick will come for
    /// it, and with EVENT_IDX its notifications stay off until taken).
    pub fn has_work_now(&self) -> bool {
        self.has_sched_input() || self.has_done() || self.should_retake()
    }

    /// The other threads the last scheduler step gave work to.
    pub fn take_kicks(&mut self) -> Vec<ThreadId> {
        std::mem::take(&mut self.kicks)
    }

    fn req_id(&self, slot: usize, part: usize) -> ReqId {
        ((self.thread as u64) << (SLOT_BITS + PART_BITS))
            | ((slot as u64) << PART_BITS)
            | part as u64
    }

    fn slot_of(id: ReqId) -> usize {
        ((id >> PART_BITS) & ((1 << SLOT_BITS) - 1)) as usize
    }

    fn part_of(id: ReqId) -> usize {
        (id & ((1 << PART_BITS) - 1)) as usize
    }

    /// Takes requests off every ready ring until each is empty or
    /// backpressure stops us. Requests that need no I/O finish at once
    /// (into `done`); the others' parts wait for the scheduler step.
    /// Only a sweep of all rings may forget that one was left unread.
    pub fn take_requests(
        &mut self,
        dev: &Device,
        rings: &[Arc<Virtqueue>],
        mem: &GuestMemoryAtomic<Memory>,
        mode: RingMode,
    ) {
        self.throttled = false;
        self.sweep_us = self.clock_us();
        for ring in rings {
            self.take_from(dev, ring, mem, mode);
        }
    }

    fn take_from(
        &mut self,
        dev: &Device,
        ring: &Virtqueue,
        mem: &GuestMemoryAtomic<Memory>,
        mode: RingMode,
    ) {
        let mut refused = false;
        // One load of the memory map per sweep, a cheap clone per request.
        let guard = mem.memory();
        let mut vq = ring.lock();
        if !vq.started {
            // Stopped as broken and set up anew since (SET_VRING_NUM,
            // ADDR or BASE): serve it again.
            if vq.revived && vq.can_start() && vq.queue.is_valid(&*guard) {
                vq.revived = false;
                vq.started = true;
            } else {
                return;
            }
        }
        // Translated once per pass: every chain's descriptors are read
        // from their host addresses (virtio/chain.rs).
        let table = DescTable::resolve(
            &*guard,
            GuestAddress(vq.queue.desc_table()),
            vq.queue.size(),
        );
        // The pass's requests map their buffers through one region cache,
        // kept from pass to pass while the memory map stays.
        let mut host = self.regions.start(&*guard);
        // Requests in flight before a restart go first, oldest first.
        while self.inflight.len() < self.max_inflight {
            let Some(head) = vq.next_resubmit() else {
                break;
            };
            let chain = HeadChain::in_table(&*guard, table, head);
            refused |= self.take_chain(dev, ring.index, &mut vq, head, &chain, &mut host, &guard);
        }
        loop {
            if mode.event_idx {
                let _ = vq.queue.disable_notification(&*guard);
            }
            while self.inflight.len() < self.max_inflight {
                // One walk of the avail ring per pass (one read of its
                // index), the chains parsed after it: the refusals among
                // them need the queue the walk borrows.
                let room = self.max_inflight - self.inflight.len();
                self.heads.clear();
                // The heads from the avail ring's host address
                // (virtio/split_ring.rs), the chains walked in the table
                // translated above.
                match vq.take_heads(&guard, room, &mut self.heads) {
                    Ok(()) => {}
                    Err(virtio_queue::Error::QueueNotReady) => return,
                    Err(e) => {
                        // The avail index ran more than the queue size
                        // ahead: the ring is broken until set up anew.
                        crate::log_limited!(
                            log::Level::Error,
                            "broken ring",
                            "queue {}: {e}; not served until the frontend sets it up again",
                            ring.index
                        );
                        vq.broken = true;
                        vq.started = false;
                        return;
                    }
                }
                let found = self.heads.len();
                for k in 0..found {
                    let head = self.heads[k];
                    vq.mark_taken(head);
                    let chain = HeadChain::in_table(&*guard, table, head);
                    refused |=
                        self.take_chain(dev, ring.index, &mut vq, head, &chain, &mut host, &guard);
                }
                if found < room {
                    break;
                }
            }
            if self.inflight.len() >= self.max_inflight {
                self.throttled = true;
            }
            let more = mode.event_idx
                && self.inflight.len() < self.max_inflight
                && vq.queue.enable_notification(&*guard).unwrap_or(false);
            if !more {
                break;
            }
        }
        self.regions.keep(&guard, host);
        // Notification flags, avail_event and refused requests' elements
        // were written to the used ring.
        vq.log_used_ring();
        if refused && vq.needs_notification(&guard) {
            vq.signal_used();
        }
    }

    /// Parses one chain taken off `vq` and starts it, or completes it at
    /// once with its error status. Returns whether it was refused so.
    #[allow(clippy::too_many_arguments)] // the pass's state, borrowed apart
    fn take_chain<C: Chain>(
        &mut self,
        dev: &Device,
        ring: u16,
        vq: &mut VirtqueueState,
        head: u16,
        chain: &C,
        host: &mut HostRanges<'_, C::Mem>,
        guard: &MemoryGuard,
    ) -> bool {
        match parse_request_in(chain, &dev.limits, host) {
            Ok(req) => {
                self.start(dev, ring, head, req, guard.clone());
                false
            }
            Err(failure) => {
                crate::log_limited!(
                    log::Level::Debug,
                    "request refused",
                    "queue {ring}: request {head} refused: {}",
                    failure.error
                );
                if let Some((addr, status)) = failure.status() {
                    write_status(&**guard, addr, status);
                    vq.log_status(addr.0);
                }
                vq.add_used(guard, head, failure.used_len())
            }
        }
    }

    fn start(&mut self, dev: &Device, ring: u16, head: u16, mut req: BlkRequest, mem: MemoryGuard) {
        let sector = req.sector;
        let mut first_sector = None;
        if dev.guards_cow_magic
            && req.req_type == RequestType::Out
            && sector == 0
            && req.data_len > 0
        {
            match pin_first_sector(&mut req) {
                FirstSector::Pinned(copy) => first_sector = Some(Box::new(copy)),
                FirstSector::Refused => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "COW magic refused",
                        "{}: refused a guest write that would give this raw image the COW magic \
                         (its format was guessed; serve it with --format raw to allow it)",
                        dev.path.display()
                    );
                    let slot = self.insert(ring, head, req, mem, 0, None);
                    self.done.push(Done {
                        id: self.req_id(slot, 0),
                        status: Status::IoErr,
                    });
                    return;
                }
            }
        }
        let count = req.data_len >> SECTOR_SHIFT;
        let slot = self.inflight.vacant_key();
        let first_part = self.to_submit.len();
        let kind = match req.req_type {
            RequestType::In => Some(ReqKind::Read),
            RequestType::Out => Some(ReqKind::Write),
            RequestType::Flush => Some(ReqKind::Flush),
            _ => None,
        };
        match kind {
            Some(kind) if kind == ReqKind::Flush || count > 0 => self.to_submit.push(DiskRequest {
                id: self.req_id(slot, 0),
                thread: self.thread,
                kind,
                sector,
                count,
            }),
            Some(_) => {} // zero-length IN/OUT: nothing to do (as qemu does)
            None => match req.req_type {
                RequestType::GetId => {
                    let mut off = 0;
                    for s in &req.data {
                        let n = s.len().min(dev.serial.len().saturating_sub(off));
                        // SAFETY: parser-checked guest memory, mapped by `mem`.
                        unsafe {
                            std::ptr::write_bytes(s.ptr(), 0, s.len());
                            std::ptr::copy_nonoverlapping(dev.serial[off..].as_ptr(), s.ptr(), n);
                        }
                        off += n;
                    }
                }
                RequestType::Discard | RequestType::WriteZeroes => {
                    // The part number is the range's index, so that each
                    // zeroing op finds its own range's flags.
                    for (i, r) in req.ranges.iter().enumerate() {
                        if r.num_sectors > 0 {
                            self.to_submit.push(DiskRequest {
                                id: self.req_id(slot, i),
                                thread: self.thread,
                                kind: ReqKind::Zero,
                                sector: r.sector,
                                count: u64::from(r.num_sectors),
                            });
                        }
                    }
                }
                _ => {}
            },
        }
        #[allow(clippy::cast_possible_truncation)] // bounded: at most max_discard_seg (u32) parts
        let parts = (self.to_submit.len() - first_part) as u32;
        let slot = self.insert(ring, head, req, mem, parts, first_sector);
        if parts > 0 && dev.throttle.is_active() {
            self.throttle(dev, first_part);
        }
        if parts == 0 {
            self.done.push(Done {
                id: self.req_id(slot, 0),
                status: Status::Ok,
            });
        }
    }

    fn insert(
        &mut self,
        ring: u16,
        head: u16,
        req: BlkRequest,
        mem: MemoryGuard,
        parts: u32,
        first_sector: Option<Box<AlignedBuf>>,
    ) -> usize {
        if let Some(stats) = &self.stats {
            stats.queue(ring).taken();
        }
        self.inflight.insert(InFlight {
            ring,
            head,
            req,
            mem,
            parts_left: parts,
            status: STATUS_OK,
            flushed: false,
            taken_us: self.sweep_us,
            _first_sector: first_sector,
        })
    }

    /// Collects finished engine operations (no lock). Inline writes
    /// complete inside `flush`, so this also reaps after a flush. Reads
    /// issued off the scheduler's lock finish here (into `done`); only the
    /// scheduler's operations are left for its step.
    pub fn reap(&mut self) {
        let before = self.completions.len();
        self.engine.reap(&mut self.completions);
        if self.off_lock_in_flight == 0 || self.completions.len() == before {
            return;
        }
        let mut mine = std::mem::take(&mut self.off_lock_done);
        let mut i = 0;
        // Stable: the scheduler's completions keep their order.
        self.completions.retain(|c| {
            let keep = i < before || c.user_data & OFF_LOCK == 0;
            i += 1;
            if !keep {
                mine.push(*c);
            }
            keep
        });
        self.sched_retry |= self.sched_has_ops && !mine.is_empty();
        for c in mine.drain(..) {
            self.off_lock_in_flight -= 1;
            let id = c.user_data & !OFF_LOCK;
            // A short read reads as zeros past what was read, as the
            // scheduler's reads do. Not tracked in `ops`: the request
            // itself says how long the read was (its whole buffer).
            if let (Some(f), Ok(n)) = (self.inflight.get(Self::slot_of(id)), c.result) {
                let len = (f.req.data_len >> SECTOR_SHIFT) << SECTOR_SHIFT;
                if n < len {
                    zero_fill(&f.req.data, n, len - n);
                }
            }
            self.done.push(Done {
                id,
                status: if c.result.is_ok() {
                    Status::Ok
                } else {
                    Status::IoErr
                },
            });
        }
        self.off_lock_done = mine;
    }

    /// Issues the reads among the parts taken that need no ordering
    /// straight to the engine, without the scheduler's lock (raw images;
    /// COW reads whose chunks are all allocated: `Device::read_off_lock`).
    /// The rest stay for the scheduler; so does a read the engine has no
    /// room for (the scheduler parks it, rule 5).
    pub fn issue_off_lock(&mut self, dev: &Device) {
        if !self.to_submit.iter().any(|p| p.kind == ReqKind::Read) {
            return;
        }
        let counts = dev.lock_counts(self.thread);
        let mut parts = std::mem::take(&mut self.to_submit);
        self.to_submit = std::mem::take(&mut self.to_submit_spare);
        let mut full = false;
        for p in parts.drain(..) {
            if full || p.kind != ReqKind::Read {
                self.to_submit.push(p);
                continue;
            }
            let mut view_lock = false;
            let offset = dev.read_off_lock(p.sector, p.count, &mut view_lock);
            if view_lock {
                LockCounts::bump(&counts.view_read_locks);
            }
            let Some(offset) = offset else {
                self.to_submit.push(p);
                continue;
            };
            let slot = Self::slot_of(p.id);
            let len = p.count << SECTOR_SHIFT;
            let Some(f) = self.inflight.get(slot) else {
                self.to_submit.push(p);
                continue;
            };
            let io = IoOp::Readv {
                fd: dev.cow_fd(),
                offset,
                iov: iovecs(&f.req.data, 0, len),
            };
            let user_data = OFF_LOCK | p.id;
            // SAFETY: the request's buffers stay mapped (its memory guard)
            // and untouched until its completion is reaped.
            match unsafe { self.engine.submit(io, user_data) } {
                Ok(()) => {
                    self.off_lock_in_flight += 1;
                    LockCounts::bump(&counts.off_lock_reads);
                }
                Err(SubmitError::Full(_)) => {
                    // Rule 5: the scheduler parks it and issues it first
                    // once completions free room.
                    full = true;
                    self.to_submit.push(p);
                }
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Error,
                        "cannot issue",
                        "cannot issue a read of {} sectors at {}: {e}",
                        p.count,
                        p.sector
                    );
                    self.done.push(Done {
                        id: p.id,
                        status: Status::IoErr,
                    });
                }
            }
        }
        self.to_submit_spare = parts;
    }

    /// Takes the scheduler's lock (counted) for one [`sched_step`], and
    /// announces a metadata failure it shows.
    ///
    /// [`sched_step`]: Worker::sched_step
    pub fn sched_step_locked(&mut self, dev: &Device) {
        let mut sched = dev.sched();
        LockCounts::bump(&dev.lock_counts(self.thread).sched_locks);
        self.sched_step(dev, &mut sched);
        dev.after_step(&mut sched);
    }

    /// The one step under the scheduler's lock: submit the parts taken,
    /// report completions, issue this thread's ready operations, collect
    /// its finished requests and the threads to wake.
    pub fn sched_step(&mut self, dev: &Device, sched: &mut Scheduler) {
        for p in self.to_submit.drain(..) {
            sched.submit(p);
        }
        let mut completions = std::mem::take(&mut self.completions);
        for c in completions.drain(..) {
            self.finish_op(&c);
            sched.op_done(c.user_data, c.result.map(|_| ()));
        }
        self.completions = completions;
        for (op, result) in self.backup_done.drain(..) {
            sched.backup_io_done(op, result);
        }
        // No capacity check here: a full engine says so, and the refused
        // operation goes back to the scheduler (rule 5).
        while let Some(op) = sched.pop_op(self.thread) {
            if matches!(
                op.kind,
                OpKind::BackupWrite { .. } | OpKind::BackupSync { .. }
            ) {
                self.backup_io.push(op);
                continue;
            }
            let (io, tracked) = self.io_op(dev, sched, &op);
            // SAFETY: request buffers stay mapped (memory guard) and are not
            // touched until completion; bounce buffers stay in `bounces`
            // until their op is done; bitmap bytes under a pending write
            // are left alone by the scheduler (rule 2), and the pages
            // being written or loaded are pinned (they keep their address).
            match unsafe { self.engine.submit(io, op.id) } {
                // Only what needs work at completion is tracked: a plain
                // write, sync or zeroing just reports its result.
                Ok(()) => {
                    if !matches!(tracked, Tracked::Plain) {
                        self.ops.insert(op.id, tracked);
                    }
                }
                Err(SubmitError::Full(_)) => {
                    // Rule 5: keep it for when completions free room.
                    sched.op_refused(op);
                    break;
                }
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Error,
                        "cannot issue",
                        "cannot issue {:?}: {e}",
                        op.kind
                    );
                    self.forget(tracked);
                    sched.op_done(op.id, Err(libc::EIO));
                }
            }
        }
        while let Some(d) = sched.pop_done(self.thread) {
            self.done.push(d);
        }
        while let Some(b) = sched.pop_freed_bounce(self.thread) {
            self.bounces.remove(&b);
        }
        self.kicks = sched.take_kicks(self.thread);
        self.sched_has_ops = sched.has_ops(self.thread);
        self.sched_retry = false;
    }

    /// Writes backup clusters to their job's target and syncs it, here on
    /// the worker thread and outside the scheduler's lock (the io_uring is
    /// restricted to the disk's files, so the target is not in it). An
    /// all-zero cluster is not written: the target was made sparse.
    pub fn run_backup_io(&mut self, dev: &Device) {
        for op in std::mem::take(&mut self.backup_io) {
            let result = match op.kind {
                OpKind::BackupWrite {
                    job,
                    offset,
                    len,
                    bounce,
                } => {
                    let buf = self.bounces.remove(&bounce);
                    let data = buf
                        .as_ref()
                        .map_or(&[][..], |b| &b.as_slice()[..to_usize(len)]);
                    match dev.backups.target(job) {
                        None => Err(libc::EBADF),
                        Some(_) if data.iter().all(|&b| b == 0) => Ok(0),
                        Some(t) => t
                            .write_at(data, offset)
                            .map(|()| len)
                            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                }
                OpKind::BackupSync { job } => match dev.backups.target(job) {
                    None => Err(libc::EBADF),
                    Some(t) => t
                        .sync()
                        .map(|()| 0)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
                },
                _ => unreachable!("not a backup operation: {:?}", op.kind),
            };
            self.backup_done.push((op.id, result));
        }
    }

    /// Hands queued operations to the kernel; inline writes run here,
    /// outside the scheduler's lock.
    pub fn flush_engine(&mut self) {
        if let Err(e) = self.engine.flush() {
            log::error!("I/O engine submit failed: {e}");
        }
    }

    /// Frees what an operation that never reached the engine held.
    fn forget(&mut self, tracked: Tracked) {
        match tracked {
            Tracked::CopyRead { bounce, .. } | Tracked::CopyWrite { bounce } => {
                self.bounces.remove(&bounce);
            }
            Tracked::GuestRead { .. } | Tracked::BackupRead { .. } | Tracked::Plain => {}
        }
    }

    /// What a completion means for buffers: zero-fill short reads (the end
    /// of a backing file whose size is not a multiple of 512 reads as
    /// zeros), free bounce buffers that are done.
    fn finish_op(&mut self, c: &Completion) {
        match (self.ops.remove(&c.user_data), c.result) {
            (
                Some(Tracked::GuestRead {
                    slot,
                    buf_offset,
                    len,
                }),
                Ok(n),
            ) if n < len => {
                if let Some(f) = self.inflight.get(slot) {
                    zero_fill(&f.req.data, buf_offset + n, len - n);
                }
            }
            (Some(Tracked::CopyRead { bounce, len }), Ok(n)) if n < len => {
                if let Some(b) = self.bounces.get_mut(&bounce) {
                    b.as_mut_slice()[to_usize(n)..to_usize(len)].fill(0);
                }
            }
            (
                Some(Tracked::BackupRead {
                    bounce,
                    bounce_offset,
                    len,
                }),
                Ok(n),
            ) if n < len => {
                if let Some(b) = self.bounces.get_mut(&bounce) {
                    b.as_mut_slice()[to_usize(bounce_offset + n)..to_usize(bounce_offset + len)]
                        .fill(0);
                }
            }
            (Some(Tracked::CopyRead { bounce, .. }), Err(_))
            | (Some(Tracked::CopyWrite { bounce }), _) => {
                self.bounces.remove(&bounce);
            }
            _ => {}
        }
    }

    /// The copy-up bounce buffer `bounce` (made on first use), as iovecs.
    fn bounce(&mut self, bounce: u64, len: u64) -> IoVecs {
        let buf = self
            .bounces
            .entry(bounce)
            .or_insert_with(|| AlignedBuf::zeroed(to_usize(len)));
        IoVecs::single(buf.as_ptr(), to_usize(len))
    }

    fn io_op(&mut self, dev: &Device, sched: &Scheduler, op: &Op) -> (IoOp, Tracked) {
        fn segments(inflight: &Slab<InFlight>, id: ReqId) -> &[Segment] {
            inflight
                .get(Worker::slot_of(id))
                .map_or(&[][..], |f| &f.req.data[..])
        }
        match op.kind {
            OpKind::BackupRead {
                target,
                offset,
                len,
                bounce,
                bounce_offset,
                bounce_len,
            } => {
                let all = self.bounce(bounce, bounce_len);
                let base = all.as_slice()[0].iov_base as *mut u8;
                // SAFETY: bounce_offset + len <= bounce_len, the buffer's size.
                let ptr = unsafe { base.add(to_usize(bounce_offset)) };
                (
                    IoOp::Readv {
                        fd: match target {
                            Target::Backing => dev.backing_fd(),
                            Target::Cow => dev.cow_fd(),
                        },
                        offset,
                        iov: IoVecs::single(ptr, to_usize(len)),
                    },
                    Tracked::BackupRead {
                        bounce,
                        bounce_offset,
                        len,
                    },
                )
            }
            OpKind::BackupWrite { .. } | OpKind::BackupSync { .. } => {
                unreachable!("backup writes are not engine operations")
            }
            OpKind::CopyRead {
                offset,
                len,
                bounce,
            } => (
                IoOp::Readv {
                    fd: dev.backing_fd(),
                    offset,
                    iov: self.bounce(bounce, len),
                },
                Tracked::CopyRead { bounce, len },
            ),
            OpKind::CopyWrite {
                offset,
                len,
                bounce,
            } => {
                // The scheduler issues a CopyWrite only after its CopyRead
                // succeeded, which keeps the buffer.
                (
                    IoOp::Writev {
                        fd: dev.cow_fd(),
                        offset,
                        iov: self.bounce(bounce, len),
                    },
                    Tracked::CopyWrite { bounce },
                )
            }
            OpKind::Read {
                target,
                offset,
                len,
                buf_offset,
            } => {
                let id = op.req.expect("a read belongs to a request");
                (
                    IoOp::Readv {
                        fd: match target {
                            Target::Backing => dev.backing_fd(),
                            Target::Cow => dev.cow_fd(),
                        },
                        offset,
                        iov: iovecs(segments(&self.inflight, id), buf_offset, len),
                    },
                    Tracked::GuestRead {
                        slot: Self::slot_of(id),
                        buf_offset,
                        len,
                    },
                )
            }
            OpKind::Write {
                offset,
                len,
                buf_offset,
            } => {
                let id = op.req.expect("a write belongs to a request");
                (
                    IoOp::Writev {
                        fd: dev.cow_fd(),
                        offset,
                        iov: iovecs(segments(&self.inflight, id), buf_offset, len),
                    },
                    Tracked::Plain,
                )
            }
            OpKind::Zero { offset, len } => {
                let id = op.req.expect("zeroing belongs to a request");
                let unmap = self.inflight.get(Self::slot_of(id)).is_some_and(|f| {
                    f.req.req_type == RequestType::Discard
                        || f.req.ranges.get(Self::part_of(id)).is_some_and(|r| r.unmap)
                });
                // A COW disk must read zeros afterwards, never backing data:
                // a hole in the COW file does that. A raw image keeps its
                // blocks for a WRITE_ZEROES range without the unmap flag.
                let mode = if dev.is_cow() || unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                (
                    IoOp::Fallocate {
                        fd: dev.cow_fd(),
                        mode,
                        offset,
                        len,
                    },
                    Tracked::Plain,
                )
            }
            OpKind::BitmapWrite { offset, start, len } => {
                // Straight from the pages (one piece each), no copy.
                let mut iov = IoVecs::new();
                for (ptr, n) in sched.bitmap_segments(start, len) {
                    iov.push(ptr, n);
                }
                (
                    IoOp::Writev {
                        fd: dev.cow_fd(),
                        offset,
                        iov,
                    },
                    Tracked::Plain,
                )
            }
            // Into the pinned page; a short read leaves its zeros.
            OpKind::BitmapLoad { offset, page, len } => (
                IoOp::Readv {
                    fd: dev.cow_fd(),
                    offset,
                    iov: IoVecs::single(sched.load_ptr(page), to_usize(len)),
                },
                Tracked::Plain,
            ),
            OpKind::Sync => (IoOp::Fdatasync { fd: dev.cow_fd() }, Tracked::Plain),
        }
    }

    /// Puts finished requests on their used rings (rings gone since, as
    /// after a disconnect, are skipped). In writethrough mode a write that
    /// changed data (OUT, DISCARD, WRITE_ZEROES) is first followed by a
    /// flush, submitted at the next scheduler step.
    pub fn publish(&mut self, rings: &[Arc<Virtqueue>], mode: RingMode) {
        if self.done.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        touched.resize_with(rings.len(), || None);
        let now_us = self.clock_us();
        // The ring last published to stays locked for the next request
        // (a batch mostly finishes on one ring): one lock per batch.
        let mut held: Option<(usize, std::sync::MutexGuard<'_, VirtqueueState>)> = None;
        for d in done.drain(..) {
            let slot = Self::slot_of(d.id);
            let Some(f) = self.inflight.get_mut(slot) else {
                log::error!("completion for unknown request {:#x}", d.id);
                continue;
            };
            if d.status != Status::Ok {
                f.status = guest_status(d.status);
            }
            f.parts_left = f.parts_left.saturating_sub(1);
            if f.parts_left > 0 {
                continue;
            }
            let changes_data = matches!(
                f.req.req_type,
                RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
            );
            if mode.writethrough && changes_data && f.status == STATUS_OK && !f.flushed {
                f.flushed = true;
                f.parts_left = 1;
                self.to_submit.push(DiskRequest {
                    id: self.req_id(slot, 0),
                    thread: self.thread,
                    kind: ReqKind::Flush,
                    sector: 0,
                    count: 0,
                });
                continue;
            }
            let f = self.inflight.remove(slot);
            if let Some(stats) = &self.stats {
                count_finished(stats, &f, now_us);
            }
            if !matches!(&held, Some((h, _)) if rings[*h].index == f.ring) {
                let Some(i) = rings.iter().position(|r| r.index == f.ring) else {
                    continue;
                };
                drop(held.take()); // released before the next ring is locked
                held = Some((i, rings[i].lock()));
            }
            let Some((i, vq)) = held.as_mut() else {
                continue;
            };
            let i = *i;
            // The request's own memory guard: the map it was parsed with.
            // SAFETY: `f.mem` is the guard the request was parsed with.
            unsafe { f.req.write_status(&*f.mem, f.status) };
            // Before the used index is published.
            vq.log_published(&f.req);
            if vq.add_used(&f.mem, f.head, f.req.used_len(f.status)) {
                touched[i] = Some(f.mem);
            }
        }
        // The held ring first, and released before any other is locked:
        // never two virtqueue locks at once.
        if let Some((h, mut vq)) = held.take() {
            if let Some(mem) = touched[h].take() {
                if vq.needs_notification(&mem) {
                    vq.signal_used();
                }
            }
        }
        for (ring, mem) in rings.iter().zip(&mut touched) {
            if let Some(mem) = mem.take() {
                let mut vq = ring.lock();
                if vq.needs_notification(&mem) {
                    vq.signal_used();
                }
            }
        }
        // Keep the buffers: no allocation per batch.
        done.append(&mut self.done);
        self.done = done;
        self.touched = touched;
    }
}
