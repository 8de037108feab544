//! One queue thread's work: take requests off its virtqueues, hand them to
//! the scheduler, issue the scheduler's operations on this thread's own I/O
//! engine, and put finished requests on the used rings.
//!
//! Lock order: a vring's lock may be held while taking the scheduler's,
//! never the other way round.

use rustc_hash::FxHashMap;

use slab::Slab;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::daemon::cow_magic_guard::{pin_first_sector, FirstSector};
use crate::daemon::device::Device;
use crate::daemon::scheduler::{
    Done, Op, OpId, OpKind, ReqId, ReqKind, DiskRequest, Scheduler, Status, Target,
};
use crate::fsutil::aligned::AlignedBuf;
use crate::io_engine::{Completion, IoEngine, IoOp, IoVecs, SubmitError};
use crate::virtio::parse_request;
use crate::virtio::request::{
    write_status, BlkRequest, RequestType, Segment, SECTOR_SHIFT, STATUS_IOERR,
    STATUS_OK,
};

pub type Memory = GuestMemoryMmap<()>;
pub type MemoryGuard = GuestMemoryLoadGuard<Memory>;
pub type Vring = VringRwLock<GuestMemoryAtomic<Memory>>;

/// Bits of a scheduler request id: thread, slot, part (discard ranges).
const PART_BITS: u32 = 8;
const SLOT_BITS: u32 = 32;

/// The one place where the write path's outcome becomes a virtio status.
pub fn guest_status(status: Status) -> u8 {
    match status {
        Status::Ok => STATUS_OK,
        Status::IoErr => STATUS_IOERR,
    }
}

struct InFlight {
    /// Index of the vring among this thread's vrings.
    vring: usize,
    head: u16,
    req: BlkRequest,
    /// Keeps the guest memory the request's buffers live in mapped.
    mem: MemoryGuard,
    parts_left: u32,
    status: u8,
    /// Writethrough: the flush that follows the write has been submitted.
    flushed: bool,
    /// The checked copy a guarded sector-0 write is done from.
    _first_sector: Option<AlignedBuf>,
}

/// A read in flight: where its bytes go, to zero-fill a short read.
enum ReadOp {
    Guest {
        slot: usize,
        buf_offset: u64,
        len: u64,
    },
    Bounce {
        bounce: u64,
        len: u64,
    },
}

pub struct Worker {
    thread: usize,
    engine: Box<dyn IoEngine>,
    inflight: Slab<InFlight>,
    reads: FxHashMap<OpId, ReadOp>,
    /// Copy-up bounce buffers, from CopyRead issue to CopyWrite completion.
    bounces: FxHashMap<u64, AlignedBuf>,
    /// CopyWrite ops in flight, to free their buffer.
    copy_writes: FxHashMap<OpId, u64>,
    completions: Vec<Completion>,
    done: Vec<Done>,
    /// Scratch, kept to avoid an allocation per request / per batch.
    parts: Vec<DiskRequest>,
    touched: Vec<bool>,
    /// Requests taken off the rings at most (backpressure beyond this
    /// leaves descriptors in the avail ring).
    max_inflight: usize,
    /// A ring was left with descriptors because of backpressure: it must
    /// be looked at again when requests finish, as no kick will come.
    throttled: bool,
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
        iov.push(unsafe { s.ptr().add(offset as usize) }, take as usize);
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
    pub fn new(thread: usize, engine: Box<dyn IoEngine>) -> Worker {
        let max_inflight = engine.capacity() * 2;
        Worker {
            thread,
            engine,
            inflight: Slab::new(),
            reads: FxHashMap::default(),
            bounces: FxHashMap::default(),
            copy_writes: FxHashMap::default(),
            completions: Vec::new(),
            done: Vec::new(),
            parts: Vec::new(),
            touched: Vec::new(),
            max_inflight,
            throttled: false,
        }
    }

    /// Whether rings were left unread for backpressure and there is room
    /// again to read them.
    pub fn should_retake(&self) -> bool {
        self.throttled && self.inflight.len() < self.max_inflight
    }

    pub fn engine_fd(&self) -> i32 {
        self.engine.event_fd()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Whether there is something to do without waiting for I/O.
    pub fn has_work(&self, dev: &Device) -> bool {
        !self.done.is_empty()
            || (self.engine.in_flight() < self.engine.capacity()
                && dev.sched().has_ops(self.thread))
    }

    pub fn has_inflight(&self) -> bool {
        !self.inflight.is_empty()
    }

    pub fn has_inflight_on(&self, vring: usize) -> bool {
        self.inflight.iter().any(|(_, f)| f.vring == vring)
    }

    fn req_id(&self, slot: usize, part: usize) -> ReqId {
        ((self.thread as u64) << (SLOT_BITS + PART_BITS))
            | ((slot as u64) << PART_BITS)
            | part as u64
    }

    fn slot_of(id: ReqId) -> usize {
        ((id >> PART_BITS) & ((1 << SLOT_BITS) - 1)) as usize
    }

    /// Takes requests off `vrings[local]` until it is empty or backpressure
    /// stops us. Returns the requests that finished without any I/O.
    pub fn take_requests(
        &mut self,
        dev: &Device,
        vrings: &[Vring],
        local: usize,
        mem: &GuestMemoryAtomic<Memory>,
        event_idx: bool,
    ) {
        let vring = &vrings[local];
        let mut refused = false;
        loop {
            let mut state = vring.get_mut();
            if event_idx {
                let _ = state.disable_notification();
            }
            // One load of the memory map per sweep, a cheap clone per request.
            let guard = mem.memory();
            while self.inflight.len() < self.max_inflight {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(guard.clone()) else {
                    break;
                };
                let head = chain.head_index();
                match parse_request(&chain, &dev.limits) {
                    Ok(req) => self.start(dev, local, head, req, guard.clone()),
                    Err(failure) => {
                        log::debug!("queue {}: request {head} refused: {}", local, failure.error);
                        if let Some((addr, status)) = failure.status() {
                            write_status(&*guard, addr, status);
                        }
                        if state.add_used(head, failure.used_len()).is_ok() {
                            refused = true;
                        }
                    }
                }
            }
            drop(state);
            if std::mem::take(&mut refused) && vring.needs_notification().unwrap_or(true) {
                let _ = vring.signal_used_queue();
            }
            if self.inflight.len() >= self.max_inflight {
                self.throttled = true;
            }
            self.publish_immediate(dev, vrings);
            let more = if event_idx && self.inflight.len() < self.max_inflight {
                vring.get_mut().enable_notification().unwrap_or(false)
            } else {
                false
            };
            if !more {
                break;
            }
        }
    }

    /// Takes requests off every ready ring. Only a sweep of all rings may
    /// forget that one was left unread for backpressure.
    pub fn take_all(
        &mut self,
        dev: &Device,
        vrings: &[Vring],
        mem: &GuestMemoryAtomic<Memory>,
        event_idx: bool,
    ) {
        self.throttled = false;
        for local in 0..vrings.len() {
            if vrings[local].get_ref().get_queue().ready() {
                self.take_requests(dev, vrings, local, mem, event_idx);
            }
        }
    }

    /// Requests that finished before any I/O (GET_ID, empty requests).
    fn publish_immediate(&mut self, dev: &Device, vrings: &[Vring]) {
        if !self.done.is_empty() {
            self.complete(dev, vrings, false);
        }
    }

    fn start(
        &mut self,
        dev: &Device,
        vring: usize,
        head: u16,
        mut req: BlkRequest,
        mem: MemoryGuard,
    ) {
        let sector = req.sector;
        let mut first_sector = None;
        if dev.guards_cow_magic
            && req.req_type == RequestType::Out
            && sector == 0
            && req.data_len > 0
        {
            match pin_first_sector(&mut req) {
                FirstSector::Pinned(copy) => first_sector = Some(copy),
                FirstSector::Refused => {
                    log::warn!(
                        "{}: refused a guest write that would give this raw image the COW magic \
                         (its format was guessed; serve it with --format raw to allow it)",
                        dev.path.display()
                    );
                    self.finish_now(vring, head, req, mem, Status::IoErr);
                    return;
                }
            }
        }
        let count = req.data_len >> SECTOR_SHIFT;
        let kind = match req.req_type {
            RequestType::In => Some(ReqKind::Read),
            RequestType::Out => Some(ReqKind::Write),
            RequestType::Flush => Some(ReqKind::Flush),
            _ => None,
        };
        let mut parts = std::mem::take(&mut self.parts);
        parts.clear();
        let slot = self.inflight.vacant_key();
        match kind {
            Some(kind) if kind == ReqKind::Flush || count > 0 => parts.push(DiskRequest {
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
                    for (i, r) in req.ranges.iter().filter(|r| r.num_sectors > 0).enumerate() {
                        parts.push(DiskRequest {
                            id: self.req_id(slot, i),
                            thread: self.thread,
                            kind: ReqKind::Zero,
                            sector: r.sector,
                            count: u64::from(r.num_sectors),
                        });
                    }
                }
                _ => {}
            },
        }
        let immediate = parts.is_empty();
        self.inflight.insert(InFlight {
            vring,
            head,
            req,
            mem,
            parts_left: parts.len() as u32,
            status: STATUS_OK,
            flushed: false,
            _first_sector: first_sector,
        });
        if immediate {
            self.done.push(Done {
                id: self.req_id(slot, 0),
                status: Status::Ok,
            });
        } else {
            let mut sched = dev.sched();
            for p in parts.drain(..) {
                sched.submit(p);
            }
        }
        self.parts = parts;
    }

    /// Completes a request that needs no I/O with `status`.
    fn finish_now(
        &mut self,
        vring: usize,
        head: u16,
        req: BlkRequest,
        mem: MemoryGuard,
        status: Status,
    ) {
        let slot = self.inflight.insert(InFlight {
            vring,
            head,
            req,
            mem,
            parts_left: 0,
            status: STATUS_OK,
            flushed: false,
            _first_sector: None,
        });
        self.done.push(Done {
            id: self.req_id(slot, 0),
            status,
        });
    }

    fn io_op(&mut self, dev: &Device, sched: &Scheduler, op: &Op) -> IoOp {
        match op.kind {
            OpKind::CopyRead {
                offset,
                len,
                bounce,
            } => {
                let buf = self
                    .bounces
                    .entry(bounce)
                    .or_insert_with(|| AlignedBuf::zeroed(len as usize));
                return IoOp::Readv {
                    fd: dev.backing_fd(),
                    offset,
                    iov: IoVecs::single(buf.as_ptr(), len as usize),
                };
            }
            OpKind::CopyWrite {
                offset,
                len,
                bounce,
            } => {
                let buf = self.bounces.get(&bounce).expect("copy-up buffer");
                return IoOp::Writev {
                    fd: dev.cow_fd(),
                    offset,
                    iov: IoVecs::single(buf.as_ptr(), len as usize),
                };
            }
            _ => {}
        }
        let segments = |id: ReqId| &self.inflight[Self::slot_of(id)].req.data;
        match op.kind {
            OpKind::Read {
                target,
                offset,
                len,
                buf_offset,
            } => IoOp::Readv {
                fd: match target {
                    Target::Backing => dev.backing_fd(),
                    Target::Cow => dev.cow_fd(),
                },
                offset,
                iov: iovecs(segments(op.req.unwrap()), buf_offset, len),
            },
            OpKind::Write {
                offset,
                len,
                buf_offset,
            } => IoOp::Writev {
                fd: dev.cow_fd(),
                offset,
                iov: iovecs(segments(op.req.unwrap()), buf_offset, len),
            },
            OpKind::Zero { offset, len } => {
                let f = &self.inflight[Self::slot_of(op.req.unwrap())];
                let unmap = f.req.ranges.iter().any(|r| r.unmap);
                // A COW disk must read zeros afterwards, never backing data:
                // a hole in the COW file does that. A raw image keeps its
                // blocks for WRITE_ZEROES without the unmap flag.
                let mode = if dev.is_cow() || f.req.req_type == RequestType::Discard || unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                IoOp::Fallocate {
                    fd: dev.cow_fd(),
                    mode,
                    offset,
                    len,
                }
            }
            OpKind::BitmapWrite { offset, start, len } => IoOp::Writev {
                fd: dev.cow_fd(),
                offset,
                iov: IoVecs::single(sched.bitmap_ptr(start) as *mut u8, len as usize),
            },
            OpKind::Sync => IoOp::Fdatasync { fd: dev.cow_fd() },
            OpKind::CopyRead { .. } | OpKind::CopyWrite { .. } => unreachable!(),
        }
    }

    /// Issues this thread's ready operations, collects its finished
    /// requests, and returns the other threads that need a wake-up.
    pub fn pump(&mut self, dev: &Device) -> Vec<usize> {
        let mut sched = dev.sched();
        // No capacity check here: a full engine says so, and the refused
        // operation goes back to the scheduler (rule 5).
        while let Some(op) = sched.pop_op(self.thread) {
            let io = self.io_op(dev, &sched, &op);
            // SAFETY: request buffers stay mapped (memory guard) and are not
            // touched until completion; bitmap bytes under a pending write
            // are left alone by the scheduler (rule 2).
            match unsafe { self.engine.submit(io, op.id) } {
                Ok(()) => match op.kind {
                    OpKind::Read {
                        len, buf_offset, ..
                    } => {
                        let slot = Self::slot_of(op.req.unwrap());
                        self.reads.insert(
                            op.id,
                            ReadOp::Guest {
                                slot,
                                buf_offset,
                                len,
                            },
                        );
                    }
                    OpKind::CopyRead { len, bounce, .. } => {
                        self.reads.insert(op.id, ReadOp::Bounce { bounce, len });
                    }
                    OpKind::CopyWrite { bounce, .. } => {
                        self.copy_writes.insert(op.id, bounce);
                    }
                    _ => {}
                },
                Err(SubmitError::Full(_)) => {
                    // Rule 5: keep it for when completions free room.
                    sched.op_refused(op);
                    break;
                }
                Err(e) => {
                    log::error!("cannot issue {:?}: {e}", op.kind);
                    sched.op_done(op.id, Err(libc::EIO));
                }
            }
        }
        while let Some(d) = sched.pop_done(self.thread) {
            self.done.push(d);
        }
        let kicks = sched.take_kicks(self.thread);
        drop(sched);
        if let Err(e) = self.engine.flush() {
            log::error!("I/O engine submit failed: {e}");
        }
        kicks
    }

    /// Feeds finished I/O to the scheduler. Returns whether any finished.
    pub fn reap(&mut self, dev: &Device) -> bool {
        self.completions.clear();
        self.engine.reap(&mut self.completions);
        if self.completions.is_empty() {
            return false;
        }
        let mut sched = dev.sched();
        for c in &self.completions {
            // A short read is the end of the backing file (its size need
            // not be a multiple of 512): the rest reads as zeros.
            match (self.reads.remove(&c.user_data), c.result) {
                (
                    Some(ReadOp::Guest {
                        slot,
                        buf_offset,
                        len,
                    }),
                    Ok(n),
                ) if n < len => {
                    zero_fill(&self.inflight[slot].req.data, buf_offset + n, len - n);
                }
                (Some(ReadOp::Bounce { bounce, len }), Ok(n)) if n < len => {
                    if let Some(b) = self.bounces.get_mut(&bounce) {
                        b.as_mut_slice()[n as usize..len as usize].fill(0);
                    }
                }
                (Some(ReadOp::Bounce { bounce, .. }), Err(_)) => {
                    self.bounces.remove(&bounce);
                }
                _ => {}
            }
            if let Some(bounce) = self.copy_writes.remove(&c.user_data) {
                self.bounces.remove(&bounce);
            }
            sched.op_done(c.user_data, c.result.map(|_| ()));
        }
        true
    }

    /// Puts this thread's finished requests on their used rings.
    /// With `writethrough` (the guest turned the write cache off), a write
    /// is followed by a flush before the guest sees it complete.
    pub fn complete(&mut self, dev: &Device, vrings: &[Vring], writethrough: bool) {
        if self.done.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        touched.resize(vrings.len(), false);
        let mut flushes = Vec::new();
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
            if writethrough
                && f.req.req_type == RequestType::Out
                && f.status == STATUS_OK
                && !f.flushed
            {
                f.flushed = true;
                f.parts_left = 1;
                flushes.push(slot);
                continue;
            }
            let f = self.inflight.remove(slot);
            write_status(&*f.mem, f.req.status_addr, f.status);
            if let Some(v) = vrings.get(f.vring) {
                if v.add_used(f.head, f.req.used_len(f.status)).is_ok() {
                    touched[f.vring] = true;
                }
            }
        }
        if !flushes.is_empty() {
            let mut sched = dev.sched();
            for slot in flushes {
                sched.submit(DiskRequest {
                    id: self.req_id(slot, 0),
                    thread: self.thread,
                    kind: ReqKind::Flush,
                    sector: 0,
                    count: 0,
                });
            }
        }
        for (v, _) in vrings.iter().zip(&touched).filter(|(_, t)| **t) {
            if v.needs_notification().unwrap_or(true) {
                let _ = v.signal_used_queue();
            }
        }
        // Keep the buffers: no allocation per batch. Requests finished
        // meanwhile (none today) would be in `self.done`.
        done.append(&mut self.done);
        self.done = done;
        self.touched = touched;
    }

    /// Blocks until some I/O of this thread completes (used when draining).
    pub fn wait_engine(&mut self) {
        if self.engine.in_flight() > 0 {
            let _ = self.engine.wait(1);
        }
    }

    pub fn engine_in_flight(&self) -> usize {
        self.engine.in_flight()
    }
}
