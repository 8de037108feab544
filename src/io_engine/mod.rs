//! Asynchronous I/O engine used by the queue worker threads.
//!
//! One engine instance belongs to one worker thread. The scheduler above it
//! decides *what* to submit; the engine only moves bytes and reports
//! completions. Two implementations exist:
//!
//! * [`UringEngine`] — one io_uring per engine, its eventfd registered with
//!   the ring so the vring worker's epoll wakes up on completions;
//! * [`ThreadsEngine`] — a small thread pool doing `preadv`/`pwritev`, used
//!   when io_uring cannot be set up (old kernel, seccomp, sysctl);
//! * [`InlineWrites`] — in front of either: buffered writes done on the
//!   calling thread, which is cheaper than any hand-off (see its module).
//!
//! Both engines bound the number of operations in flight by the queue depth
//! and answer [`SubmitError::Full`] when it is reached (or when the kernel
//! says EAGAIN/EBUSY on submission): per docs/design.md rule 5 that is
//! back-pressure, never an error for the guest. An operation counts as in
//! flight from `submit` until its completion has been handed out by `reap`.
//!
//! Caller obligations (see [`IoEngine::submit`]): buffers of a read/write
//! stay valid, and are not otherwise accessed, until its completion has been
//! reaped or the engine dropped; dropping an engine blocks until the
//! operations already handed to the kernel or to a pool thread finish, so
//! drop it *before* unmapping guest memory and, since a drop waits for them,
//! only with operations on regular files or block devices in flight (a read
//! from a pipe nobody writes would never finish). File descriptors must stay
//! open until their operations complete (otherwise the number may be reused
//! by another file). Completions come in any order; ordering (e.g. data
//! before bitmap, fdatasync after writes) is the scheduler's business: the
//! engine issues operations concurrently.
//!
//! Short transfers are finished inside the engine: a read or write completes
//! only when every byte is done, on an error, or (reads) at end of file, in
//! which case the bytes done so far are reported so the caller can zero-fill
//! the tail.

mod blocking;
mod inline;
mod threads;
mod uring;

use std::io;
use std::os::unix::io::RawFd;

use crate::units::to_usize;

pub use inline::InlineWrites;
pub use threads::ThreadsEngine;
pub use uring::UringEngine;

/// Number of iovec segments stored inline in [`IoVecs`]; virtio-blk requests
/// almost always carry 1–4 data descriptors.
const INLINE_IOVECS: usize = 4;

/// Largest number of segments one operation may carry (Linux `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// How often an operation that the kernel completed with EINTR or EAGAIN is
/// reissued before the errno is reported. Bounded so that a file that keeps
/// answering EAGAIN cannot spin a worker forever.
const MAX_RETRIES: u32 = 128;

/// Default number of threads of the thread-pool engine.
pub const DEFAULT_POOL_THREADS: usize = 4;

/// A list of `(pointer, length)` segments, stored inline for up to four
/// segments so the hot path does not allocate.
///
/// The pointers are only ever handed to the kernel; `IoVecs` itself never
/// dereferences them. See [`IoEngine::submit`] for what must hold while an
/// operation using them is in flight.
#[derive(Clone)]
pub struct IoVecs {
    /// Index of the first segment not yet fully transferred.
    start: usize,
    /// Number of used entries in `inline` (when `spill` is empty).
    inline_len: usize,
    inline: [libc::iovec; INLINE_IOVECS],
    /// All segments, once there are more than `INLINE_IOVECS`.
    spill: Vec<libc::iovec>,
}

// SAFETY: the raw pointers inside are plain addresses handed to the kernel;
// `IoVecs` never dereferences them. Whoever submits an operation promises
// (see `IoEngine::submit`) that the memory stays valid until completion,
// independent of which thread holds the `IoVecs`.
unsafe impl Send for IoVecs {}

impl Default for IoVecs {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.as_slice().iter().map(|v| (v.iov_base, v.iov_len)))
            .finish()
    }
}

impl IoVecs {
    const EMPTY: libc::iovec = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };

    /// An empty list (no allocation).
    pub const fn new() -> Self {
        Self {
            start: 0,
            inline_len: 0,
            inline: [Self::EMPTY; INLINE_IOVECS],
            spill: Vec::new(),
        }
    }

    /// A list holding one segment.
    pub fn single(ptr: *mut u8, len: usize) -> Self {
        let mut v = Self::new();
        v.push(ptr, len);
        v
    }

    /// Appends a segment. Zero-length segments are skipped: they transfer
    /// nothing and would only make the kernel walk more entries.
    pub fn push(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        if self.spill.is_empty() && self.inline_len < INLINE_IOVECS {
            self.inline[self.inline_len] = iov;
            self.inline_len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.reserve(INLINE_IOVECS * 2);
                self.spill
                    .extend_from_slice(&self.inline[..self.inline_len]);
            }
            self.spill.push(iov);
        }
    }

    /// The segments not yet transferred.
    pub fn as_slice(&self) -> &[libc::iovec] {
        if self.spill.is_empty() {
            &self.inline[self.start..self.inline_len]
        } else {
            &self.spill[self.start..]
        }
    }

    fn as_mut_slice(&mut self) -> &mut [libc::iovec] {
        if self.spill.is_empty() {
            &mut self.inline[self.start..self.inline_len]
        } else {
            &mut self.spill[self.start..]
        }
    }

    /// Number of segments not yet transferred.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there is nothing (left) to transfer.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Total bytes not yet transferred.
    pub fn total_len(&self) -> u64 {
        self.as_slice().iter().map(|v| v.iov_len as u64).sum()
    }

    /// Drops the first `n` bytes, after a short transfer. Done in place, so
    /// the array keeps its address (io_uring reads it from userspace).
    pub(crate) fn advance(&mut self, mut n: u64) {
        while n > 0 {
            let Some(first) = self.as_mut_slice().first_mut() else {
                return;
            };
            let seg = first.iov_len as u64;
            if n < seg {
                // `n < iov_len`, so it fits in usize and stays in bounds.
                let n = to_usize(n);
                // wrapping_add: the pointer is never dereferenced here.
                first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
                first.iov_len -= n;
                return;
            }
            n -= seg;
            self.start += 1;
        }
    }
}

/// One I/O operation.
#[derive(Debug, Clone)]
pub enum IoOp {
    /// Read from `fd` at `offset` into the segments.
    Readv { fd: RawFd, offset: u64, iov: IoVecs },
    /// Write the segments to `fd` at `offset`.
    Writev { fd: RawFd, offset: u64, iov: IoVecs },
    /// `fdatasync(fd)`.
    Fdatasync { fd: RawFd },
    /// `fallocate(fd, mode, offset, len)` — e.g. punch hole or zero range.
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// A finished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The value given to [`IoEngine::submit`].
    pub user_data: u64,
    /// Bytes transferred (reads: fewer than asked means end of file was
    /// reached; syncs and fallocate report 0), or the errno.
    pub result: Result<u64, i32>,
}

/// Why an operation was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No room now (in-flight limit reached, or the kernel answered
    /// EAGAIN/EBUSY). Not an error for the guest: keep the operation and
    /// submit it again after reaping completions. The operation is handed
    /// back unchanged.
    #[error("I/O queue full, retry after completions")]
    Full(IoOp),
    /// The operation can never be executed as given.
    #[error("invalid I/O operation: {0}")]
    Invalid(&'static str),
    /// The engine itself failed (ring submission failed with an unexpected
    /// errno).
    #[error("I/O engine failure: {0}")]
    Io(#[from] io::Error),
}

/// Errors creating an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot set up io_uring: {0}")]
    Uring(#[source] io::Error),
    #[error("io_uring lacks opcode {0} on this kernel")]
    UringOpcode(&'static str),
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot spawn I/O thread: {0}")]
    Thread(#[source] io::Error),
}

/// The asynchronous I/O engine of one queue worker thread.
pub trait IoEngine: Send {
    /// Queues an operation; it reaches the kernel (or the pool) at the next
    /// [`flush`](Self::flush) (or earlier if the engine must make room).
    ///
    /// # Safety
    ///
    /// Every segment of a `Readv`/`Writev` must point to memory that stays
    /// valid (and, for reads, writable and not otherwise accessed) until the
    /// operation's completion has been returned by [`reap`](Self::reap), or
    /// until the engine has been dropped — the kernel or a pool thread may
    /// access it at any time before then. On `Err` nothing was queued and
    /// the memory is not referenced.
    unsafe fn submit(&mut self, op: IoOp, user_data: u64) -> Result<(), SubmitError>;

    /// Hands all queued operations to the kernel or the pool (one syscall
    /// for many). Kernel back-pressure (EAGAIN/EBUSY) is not an error: the
    /// operations stay queued and are pushed again on the next flush, reap
    /// or wait; the engine's eventfd is signalled so the worker comes back.
    fn flush(&mut self) -> io::Result<()>;

    /// Appends the finished operations to `out` without blocking. When
    /// there are any, clears the eventfd first, so a completion arriving
    /// during the call signals it again; an empty reap makes no syscall
    /// (the eventfd may then stay readable: a spurious wake-up at worst).
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Flushes, then blocks until at least `min` completions can be reaped
    /// (`min` is capped at [`in_flight`](Self::in_flight)).
    fn wait(&mut self, min: usize) -> io::Result<()>;

    /// Readable when completions may be available. Operations done on the
    /// calling thread within `flush` ([`InlineWrites`]) do not signal it:
    /// the caller reaps after every flush.
    fn event_fd(&self) -> RawFd;

    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The in-flight limit (the queue depth).
    fn capacity(&self) -> usize;

    /// Short name for logs ("io_uring", "threads").
    fn name(&self) -> &'static str;
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Threads,
}

/// Builds an engine bounded by `queue_depth` in-flight operations; with
/// `files`, an io_uring is restricted to its own operations on those
/// files ([`UringEngine::restricted`]). An io_uring that cannot be set up
/// falls back to the thread pool, logging why; only a failing thread-pool
/// engine is an error.
pub fn new_engine(
    kind: EngineKind,
    queue_depth: usize,
    files: Option<&[RawFd]>,
) -> Result<Box<dyn IoEngine>, EngineError> {
    if kind == EngineKind::IoUring {
        let ring = match files {
            Some(files) => UringEngine::restricted(queue_depth, files),
            None => UringEngine::new(queue_depth),
        };
        match ring {
            Ok(e) => return Ok(Box::new(e)),
            Err(e) => log::warn!("io_uring unavailable ({e}); using the thread-pool I/O engine"),
        }
    }
    Ok(Box::new(ThreadsEngine::new(
        queue_depth,
        DEFAULT_POOL_THREADS,
    )?))
}

/// What to do after the kernel answered one attempt of an operation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Complete(Result<u64, i32>),
    Reissue,
}

/// An operation in progress: the remainder still to do plus the progress.
#[derive(Debug)]
pub(crate) struct OpState {
    pub(crate) op: IoOp,
    pub(crate) user_data: u64,
    done: u64,
    retries: u32,
}

impl OpState {
    pub(crate) fn new(op: IoOp, user_data: u64) -> Self {
        Self {
            op,
            user_data,
            done: 0,
            retries: 0,
        }
    }

    /// Checks what the kernel would reject anyway, so it is reported at
    /// submission rather than as a confusing completion.
    pub(crate) fn validate(op: &IoOp) -> Result<(), SubmitError> {
        match op {
            IoOp::Readv { iov, offset, .. } | IoOp::Writev { iov, offset, .. } => {
                if iov.len() > MAX_IOVECS {
                    return Err(SubmitError::Invalid("more than IOV_MAX segments"));
                }
                if offset
                    .checked_add(iov.total_len())
                    .is_none_or(|e| e > i64::MAX as u64)
                {
                    return Err(SubmitError::Invalid(
                        "offset beyond the largest file offset",
                    ));
                }
            }
            IoOp::Fallocate { offset, len, .. } => {
                if offset.checked_add(*len).is_none_or(|e| e > i64::MAX as u64) {
                    return Err(SubmitError::Invalid(
                        "fallocate range beyond the largest file offset",
                    ));
                }
            }
            IoOp::Fdatasync { .. } => {}
        }
        Ok(())
    }

    /// Accounts one attempt's result (`>= 0` bytes or `-errno`) and decides
    /// whether the operation is finished.
    pub(crate) fn on_result(&mut self, res: i64) -> Step {
        if res < 0 {
            let errno = i32::try_from(-res).unwrap_or(libc::EIO);
            // EINTR/EAGAIN say "try again", not "failed"; the guest must
            // not see them (rule 5), so reissue a bounded number of times.
            if (errno == libc::EINTR || errno == libc::EAGAIN) && self.retries < MAX_RETRIES {
                self.retries += 1;
                return Step::Reissue;
            }
            return Step::Complete(Err(errno));
        }
        let n = res as u64;
        let is_read = matches!(self.op, IoOp::Readv { .. });
        let (offset, iov) = match &mut self.op {
            IoOp::Readv { offset, iov, .. } | IoOp::Writev { offset, iov, .. } => (offset, iov),
            IoOp::Fdatasync { .. } | IoOp::Fallocate { .. } => return Step::Complete(Ok(0)),
        };
        let remaining = iov.total_len();
        if n > remaining {
            // The kernel never reports more than asked; do not trust a
            // result that would run past the buffers.
            return Step::Complete(Err(libc::EIO));
        }
        self.done += n;
        *offset += n;
        iov.advance(n);
        if n == remaining {
            return Step::Complete(Ok(self.done));
        }
        if n == 0 {
            // Read: end of file, report what was read. Write: no progress
            // at all would loop forever, so fail it.
            return Step::Complete(if is_read {
                Ok(self.done)
            } else {
                Err(libc::EIO)
            });
        }
        // Progress made: retries start afresh for the remainder.
        self.retries = 0;
        Step::Reissue
    }

    pub(crate) fn into_completion(self, result: Result<u64, i32>) -> Completion {
        Completion {
            user_data: self.user_data,
            result,
        }
    }
}

/// Creates the non-blocking eventfd both engines signal on completion.
pub(crate) fn new_eventfd() -> Result<vmm_sys_util::eventfd::EventFd, EngineError> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(EngineError::EventFd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(v: &IoVecs) -> Vec<(usize, usize)> {
        v.as_slice()
            .iter()
            .map(|s| (s.iov_base as usize, s.iov_len))
            .collect()
    }

    #[test]
    fn iovecs_inline_then_spill() {
        let mut v = IoVecs::new();
        for i in 1..=6 {
            v.push((i * 0x1000) as *mut u8, i * 10);
        }
        v.push(0x9000 as *mut u8, 0); // skipped
        assert_eq!(v.len(), 6);
        assert_eq!(v.total_len(), 210);
        assert_eq!(segs(&v)[4], (0x5000, 50));
    }

    #[test]
    fn iovecs_advance_within_and_across_segments() {
        for n in [3usize, 6] {
            let mut v = IoVecs::new();
            for i in 0..n {
                v.push((0x1000 * (i + 1)) as *mut u8, 100);
            }
            v.advance(30);
            assert_eq!(segs(&v)[0], (0x1000 + 30, 70));
            v.advance(70);
            assert_eq!(segs(&v)[0], (0x2000, 100));
            v.advance(150);
            assert_eq!(v.len(), n - 2);
            assert_eq!(v.total_len(), (n as u64 - 2) * 100 + 50 - 100);
            v.advance(u64::MAX);
            assert!(v.is_empty());
        }
    }

    fn read_op(len: usize) -> IoOp {
        let mut iov = IoVecs::new();
        iov.push(0x1000 as *mut u8, len / 2);
        iov.push(0x8000 as *mut u8, len - len / 2);
        IoOp::Readv {
            fd: 3,
            offset: 4096,
            iov,
        }
    }

    #[test]
    fn short_transfer_is_continued_from_the_right_place() {
        let mut s = OpState::new(read_op(1000), 7);
        assert_eq!(s.on_result(300), Step::Reissue);
        match &s.op {
            IoOp::Readv { offset, iov, .. } => {
                assert_eq!(*offset, 4396);
                assert_eq!(segs(iov), vec![(0x1000 + 300, 200), (0x8000, 500)]);
            }
            other => panic!("unexpected op {other:?}"),
        }
        assert_eq!(s.on_result(-i64::from(libc::EINTR)), Step::Reissue);
        assert_eq!(s.on_result(600), Step::Reissue);
        assert_eq!(s.on_result(100), Step::Complete(Ok(1000)));
    }

    #[test]
    fn eof_reports_bytes_done_and_stuck_write_fails() {
        let mut s = OpState::new(read_op(1000), 0);
        assert_eq!(s.on_result(10), Step::Reissue);
        assert_eq!(s.on_result(0), Step::Complete(Ok(10)));

        let mut w = OpState::new(
            IoOp::Writev {
                fd: 3,
                offset: 0,
                iov: IoVecs::single(0x1000 as *mut u8, 10),
            },
            0,
        );
        assert_eq!(w.on_result(0), Step::Complete(Err(libc::EIO)));
        let mut w = OpState::new(
            IoOp::Writev {
                fd: 3,
                offset: 0,
                iov: IoVecs::new(),
            },
            0,
        );
        assert_eq!(w.on_result(0), Step::Complete(Ok(0)));
    }

    #[test]
    fn errors_and_bounded_retries() {
        let mut s = OpState::new(read_op(100), 0);
        assert_eq!(
            s.on_result(-i64::from(libc::EIO)),
            Step::Complete(Err(libc::EIO))
        );
        let mut s = OpState::new(IoOp::Fdatasync { fd: 3 }, 0);
        for _ in 0..MAX_RETRIES {
            assert_eq!(s.on_result(-i64::from(libc::EAGAIN)), Step::Reissue);
        }
        assert_eq!(
            s.on_result(-i64::from(libc::EAGAIN)),
            Step::Complete(Err(libc::EAGAIN))
        );
        let mut s = OpState::new(read_op(100), 0);
        assert_eq!(s.on_result(101), Step::Complete(Err(libc::EIO)));
    }

    #[test]
    fn validate_rejects_impossible_ops() {
        let mut iov = IoVecs::new();
        for i in 0..=MAX_IOVECS {
            iov.push((0x1000 + i) as *mut u8, 1);
        }
        let op = IoOp::Readv {
            fd: 3,
            offset: 0,
            iov,
        };
        assert!(matches!(
            OpState::validate(&op),
            Err(SubmitError::Invalid(_))
        ));
        let op = IoOp::Fallocate {
            fd: 3,
            mode: 0,
            offset: u64::MAX,
            len: 1,
        };
        assert!(matches!(
            OpState::validate(&op),
            Err(SubmitError::Invalid(_))
        ));
    }
}
