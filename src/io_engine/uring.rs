//! io_uring engine: one ring per engine (per queue worker thread).

use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::EventFd;

use super::{
    new_eventfd, Completion, EngineError, IoEngine, IoOp, IoVecs, OpState, Step, SubmitError,
};
use crate::units::to_usize;

/// Largest ring the kernel accepts (IORING_MAX_ENTRIES).
const MAX_RING_ENTRIES: usize = 32768;

/// io_uring engine. See the module docs of `io_engine`.
///
/// Dropping it with operations in flight blocks until the kernel has
/// finished all of them: the kernel may write into the submitted buffers
/// (guest memory) until then, and the iovec arrays it reads live in this
/// struct.
pub struct UringEngine {
    /// Dropped by hand in `Drop`, and leaked if waiting for the kernel fails.
    ring: ManuallyDrop<IoUring>,
    /// One slot per operation in flight at once so far (at most
    /// `capacity`).
    slots: Slots,
    /// Slots made and free.
    free: Vec<usize>,
    /// Completions already taken off the CQ (by `wait`) but not reaped.
    ready: Vec<Completion>,
    /// SQEs pushed whose CQE has not been seen yet (submitted or not).
    sqes_outstanding: usize,
    efd: EventFd,
    capacity: usize,
    /// With a restricted ring: the registered files, by fixed index.
    files: Option<Vec<RawFd>>,
}

/// Slots made per block.
const SLOT_BLOCK: usize = 16;

/// The operation slots, made a block at a time as more operations are in
/// flight at once: a disk used at queue depth 4 has one block (2 KiB), not
/// the queue depth's worth. A block is never moved, so the iovec arrays
/// inside its slots keep the address the kernel was given until the slot
/// is freed.
#[derive(Default)]
struct Slots {
    #[allow(clippy::vec_box)] // boxed so that growing the Vec moves no slot
    blocks: Vec<Box<[Option<OpState>; SLOT_BLOCK]>>,
    /// Slots made.
    len: usize,
}

impl Slots {
    fn len(&self) -> usize {
        self.len
    }

    /// A new (empty) slot's index.
    fn add(&mut self) -> usize {
        if self.len == self.blocks.len() * SLOT_BLOCK {
            self.blocks.push(Box::new(std::array::from_fn(|_| None)));
        }
        self.len += 1;
        self.len - 1
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut Option<OpState>> {
        Some(&mut self.blocks.get_mut(slot / SLOT_BLOCK)?[slot % SLOT_BLOCK])
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Option<OpState>;
    fn index(&self, slot: usize) -> &Option<OpState> {
        // Past `len` but inside the last block: a slot not handed out
        // yet, empty.
        &self.blocks[slot / SLOT_BLOCK][slot % SLOT_BLOCK]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, slot: usize) -> &mut Option<OpState> {
        &mut self.blocks[slot / SLOT_BLOCK][slot % SLOT_BLOCK]
    }
}

/// IORING_UNREGISTER_FILES.
const UNREGISTER_FILES: u8 = 3;

/// The operations the engine submits: all a restricted ring allows.
const OPCODES: [(u8, &str); 6] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

impl UringEngine {
    /// A ring for up to `queue_depth` (at least 1) operations in flight on
    /// any file.
    pub fn new(queue_depth: usize) -> Result<Self, EngineError> {
        Self::build(queue_depth, None)
    }

    /// A ring restricted to the engine's own operations on `files` (the
    /// daemon's): seccomp does not see what a ring does, so a ring that
    /// could open files or touch other descriptors would be a way around
    /// the filter. `files` are registered; every operation must use one of
    /// them (IOSQE_FIXED_FILE required), and no other opcode nor any
    /// further io_uring_register call is allowed once the ring is enabled.
    pub fn restricted(queue_depth: usize, files: &[RawFd]) -> Result<Self, EngineError> {
        Self::build(queue_depth, Some(files))
    }

    fn build(queue_depth: usize, files: Option<&[RawFd]>) -> Result<Self, EngineError> {
        let capacity = queue_depth.clamp(1, MAX_RING_ENTRIES);
        // The SQ holds at least one entry per in-flight operation (each has
        // at most one SQE outstanding), so pushing never finds it full in
        // normal operation; the CQ is twice that, so it never overflows.
        #[allow(clippy::cast_possible_truncation)] // bounded: at most MAX_RING_ENTRIES (2^15)
        let entries = capacity.next_power_of_two() as u32;
        let ring = match files {
            // Created disabled: restrictions can only be set before enabling.
            Some(_) => IoUring::builder().setup_r_disabled().build(entries),
            None => IoUring::new(entries),
        }
        .map_err(EngineError::Uring)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(EngineError::Uring)?;
        for (code, name) in OPCODES {
            if !probe.is_supported(code) {
                return Err(EngineError::UringOpcode(name));
            }
        }
        let efd = new_eventfd()?;
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(EngineError::Uring)?;
        let files = match files {
            None => None,
            Some(files) => {
                let mut files = files.to_vec();
                files.dedup();
                let s = ring.submitter();
                s.register_files(&files).map_err(EngineError::Uring)?;
                let fixed = squeue::Flags::FIXED_FILE.bits();
                let mut rules: Vec<Restriction> = OPCODES
                    .iter()
                    .map(|&(code, _)| Restriction::sqe_op(code))
                    .collect();
                rules.push(Restriction::sqe_flags_allowed(fixed));
                rules.push(Restriction::sqe_flags_required(fixed));
                // The one register call left: dropping the files at the
                // end (see Drop).
                rules.push(Restriction::register_op(UNREGISTER_FILES));
                s.register_restrictions(&mut rules)
                    .map_err(EngineError::Uring)?;
                s.register_enable_rings().map_err(EngineError::Uring)?;
                Some(files)
            }
        };
        Ok(Self {
            ring: ManuallyDrop::new(ring),
            slots: Slots::default(),
            free: Vec::new(),
            ready: Vec::new(),
            sqes_outstanding: 0,
            efd,
            capacity,
            files,
        })
    }

    /// Whether the ring is restricted to registered files.
    pub fn is_restricted(&self) -> bool {
        self.files.is_some()
    }

    /// Builds the SQE for the remainder of the operation in `slot`.
    fn sqe(&self, slot: usize) -> Option<squeue::Entry> {
        let state = self.slots[slot].as_ref()?;
        // The same SQE on a plain fd or, on a restricted ring, on the fd's
        // fixed index (the opcode builders take either type).
        macro_rules! on_file {
            ($fd:expr, |$f:ident| $build:expr) => {
                match self.fixed_index($fd) {
                    Some(i) => {
                        let $f = types::Fixed(i);
                        $build
                    }
                    None => {
                        let $f = types::Fd($fd);
                        $build
                    }
                }
            };
        }
        let entry = match &state.op {
            IoOp::Readv { fd, offset, iov } => match single(iov.as_slice()) {
                Some((base, len)) => {
                    on_file!(*fd, |f| opcode::Read::new(f, base, len)
                        .offset(*offset)
                        .build())
                }
                None => on_file!(*fd, |f| opcode::Readv::new(
                    f,
                    iov.as_slice().as_ptr(),
                    iov_count(iov)
                )
                .offset(*offset)
                .build()),
            },
            IoOp::Writev { fd, offset, iov } => match single(iov.as_slice()) {
                Some((base, len)) => {
                    on_file!(*fd, |f| opcode::Write::new(f, base, len)
                        .offset(*offset)
                        .build())
                }
                None => on_file!(*fd, |f| opcode::Writev::new(
                    f,
                    iov.as_slice().as_ptr(),
                    iov_count(iov)
                )
                .offset(*offset)
                .build()),
            },
            IoOp::Fdatasync { fd } => on_file!(*fd, |f| opcode::Fsync::new(f)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => on_file!(*fd, |f| opcode::Fallocate::new(f, *len)
                .offset(*offset)
                .mode(*mode)
                .build()),
        };
        Some(entry.user_data(slot as u64))
    }

    /// On a restricted ring, the fixed index of `fd` (submit refuses fds
    /// that are not registered).
    fn fixed_index(&self, fd: RawFd) -> Option<u32> {
        let files = self.files.as_ref()?;
        let i = files.iter().position(|&f| f == fd).unwrap_or(0);
        u32::try_from(i).ok()
    }

    /// Pushes the SQE of `slot`; false if the SQ is full.
    fn push(&mut self, slot: usize) -> bool {
        let Some(entry) = self.sqe(slot) else {
            return true;
        };
        // SAFETY: the SQE points at the iovec array inside `self.slots[slot]`
        // (a boxed slice that is never reallocated; the slot is only freed
        // after its CQE) and at caller memory that the `submit` contract
        // keeps valid until completion. Drop waits for outstanding SQEs.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        if pushed {
            self.sqes_outstanding += 1;
        }
        pushed
    }

    /// Submits whatever is in the SQ. Kernel back-pressure leaves the
    /// entries queued and returns `Ok(false)`.
    fn submit_sq(&mut self) -> io::Result<bool> {
        loop {
            if self.ring.submission().is_empty() {
                return Ok(true);
            }
            match self.ring.submit() {
                Ok(n) => {
                    if self.ring.submission().is_empty() {
                        return Ok(true);
                    }
                    if n == 0 {
                        // Nothing taken and no errno: treat as back-pressure
                        // rather than spin.
                        return Ok(false);
                    }
                    // Partially consumed (e.g. out of memory for requests):
                    // try the rest; the kernel reports EAGAIN if it still
                    // cannot take any.
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if is_backpressure(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Like `submit_sq`, but makes sure the worker returns if entries had
    /// to stay queued: nothing else might signal the eventfd.
    fn submit_or_signal(&mut self) -> io::Result<()> {
        if !self.submit_sq()? {
            let _ = self.efd.write(1);
        }
        Ok(())
    }

    /// Takes every CQE off the CQ, reissuing short transfers and retries,
    /// and collects finished operations into `out`. Returns whether any
    /// SQE was pushed (then the SQ needs submitting).
    fn drain_cq(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut pushed = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            self.sqes_outstanding = self.sqes_outstanding.saturating_sub(1);
            let slot = to_usize(cqe.user_data());
            let Some(state) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                log::error!("io_uring: completion for unknown slot {slot}");
                continue;
            };
            match state.on_result(i64::from(cqe.result())) {
                Step::Reissue => {
                    if !self.push(slot) {
                        // Cannot happen: the SQ has room for every in-flight
                        // operation. Make room anyway rather than lose it.
                        let _ = self.submit_sq();
                        if !self.push(slot) {
                            self.finish(slot, Err(libc::EAGAIN), out);
                            continue;
                        }
                    }
                    pushed = true;
                }
                Step::Complete(result) => self.finish(slot, result, out),
            }
        }
        pushed
    }

    fn finish(&mut self, slot: usize, result: Result<u64, i32>, out: &mut Vec<Completion>) {
        if let Some(state) = self.slots[slot].take() {
            out.push(state.into_completion(result));
            self.free.push(slot);
        }
    }

    /// Processes the CQ into `self.ready`, submitting any reissues.
    fn drain_into_ready(&mut self) -> io::Result<()> {
        let mut ready = std::mem::take(&mut self.ready);
        let pushed = self.drain_cq(&mut ready);
        self.ready = ready;
        if pushed || !self.ring.submission().is_empty() {
            self.submit_or_signal()?;
        }
        Ok(())
    }
}

/// The one segment of a single-segment operation, for a plain READ/WRITE
/// (whose length is a u32); `None` for several segments, or one too long.
fn single(iov: &[libc::iovec]) -> Option<(*mut u8, u32)> {
    match iov {
        [one] => Some((one.iov_base.cast(), u32::try_from(one.iov_len).ok()?)),
        _ => None,
    }
}

/// The segment count for READV/WRITEV. `validate` caps it at IOV_MAX; a
/// larger one saturates, and the kernel refuses it (EINVAL).
fn iov_count(iov: &IoVecs) -> u32 {
    u32::try_from(iov.len()).unwrap_or(u32::MAX)
}

fn is_backpressure(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
}

impl IoEngine for UringEngine {
    unsafe fn submit(&mut self, op: IoOp, user_data: u64) -> Result<(), SubmitError> {
        OpState::validate(&op)?;
        if let Some(files) = &self.files {
            let fd = match &op {
                IoOp::Readv { fd, .. }
                | IoOp::Writev { fd, .. }
                | IoOp::Fdatasync { fd }
                | IoOp::Fallocate { fd, .. } => *fd,
            };
            if !files.contains(&fd) {
                return Err(SubmitError::Invalid("file not registered with the ring"));
            }
        }
        // Completions taken off the CQ by `wait` still count until reaped,
        // although their slots are already free. Below the capacity, a
        // slot is free or another may be made.
        if self.in_flight() >= self.capacity {
            return Err(SubmitError::Full(op));
        }
        if self.ring.submission().is_full() && !self.submit_sq()? {
            return Err(SubmitError::Full(op));
        }
        if self.ring.submission().is_full() {
            return Err(SubmitError::Full(op));
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => self.slots.add(),
        };
        self.slots[slot] = Some(OpState::new(op, user_data));
        if !self.push(slot) {
            // Checked above that there is room; undo rather than panic.
            let state = self.slots[slot].take();
            self.free.push(slot);
            return match state {
                Some(s) => Err(SubmitError::Full(s.op)),
                None => Err(SubmitError::Invalid("slot vanished")),
            };
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.submit_or_signal()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear before draining: a CQE posted after the drain signals the
        // eventfd again, so none is missed. Only when there is a CQE: a
        // busy-polling worker reaps often and mostly finds nothing, which
        // must not cost a syscall. EAGAIN means it was not set.
        if !self.ring.completion().is_empty() {
            let _ = self.efd.read();
        }
        out.append(&mut self.ready);
        let pushed = self.drain_cq(out);
        if pushed || !self.ring.submission().is_empty() {
            if let Err(e) = self.submit_or_signal() {
                // Leave the entries queued; the next flush reports it.
                log::error!("io_uring: resubmission failed: {e}");
            }
        }
    }

    fn wait(&mut self, min: usize) -> io::Result<()> {
        let min = min.min(self.in_flight());
        loop {
            self.drain_into_ready()?;
            if self.ready.len() >= min {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // EBUSY: CQEs must be reaped first, which the next round
                // does. EAGAIN: the kernel is short of memory; try again.
                Err(e) if is_backpressure(&e) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    /// Waits for every SQE the kernel has (or will get) to complete: until
    /// then the kernel may access the buffers and the iovec arrays in
    /// `slots`. Unsubmitted SQEs are submitted first rather than tracked
    /// separately; short transfers are not continued.
    fn drop(&mut self) {
        while self.sqes_outstanding > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EBUSY) => {}
                    Some(libc::EAGAIN) => std::thread::yield_now(),
                    _ => {
                        // Cannot wait any more. Leaking the ring and the
                        // slots keeps everything the kernel may still read
                        // alive and the ring open.
                        log::error!(
                            "io_uring: cannot wait for {} operations on drop: {e}; leaking the ring",
                            self.sqes_outstanding
                        );
                        std::mem::forget(std::mem::take(&mut self.slots));
                        return;
                    }
                }
            }
            let mut cq = self.ring.completion();
            let n = cq.by_ref().count();
            drop(cq);
            self.sqes_outstanding = self.sqes_outstanding.saturating_sub(n);
        }
        // The kernel tears a ring down in the background: registered files
        // (and the locks on them) would outlive this process for a moment,
        // and a daemon restarted at once would find its disk locked.
        if self.files.is_some() {
            let _ = self.ring.submitter().unregister_files();
        }
        // SAFETY: the ring is not used after this point, and this is the
        // only place it is dropped.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
    }
}
