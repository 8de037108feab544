//! Buffered writes done on the queue thread itself, in front of another
//! engine that takes everything else.
//!
//! A buffered write is a copy into the page cache. io_uring cannot do it
//! without blocking on ext4 (no `IOCB_NOWAIT` for buffered writes there),
//! so it hands every such write to an io-wq kernel thread: a wake-up and
//! two context switches per write, more than the copy itself costs. Doing
//! the `pwritev` on the queue thread, as cloud-hypervisor's backend does,
//! avoids that (figures in docs/benchmarks.md). The price:
//! a write that blocks (dirty-page throttling) stalls the thread's other
//! requests meanwhile, which is why `serve --no-inline-writes` exists, and
//! why only plain buffered files use it (an O_DIRECT or O_DSYNC write
//! waits for the device).

use std::io;
use std::os::unix::io::RawFd;

use super::{blocking, Completion, IoEngine, IoOp, OpState, SubmitError};

pub struct InlineWrites {
    inner: Box<dyn IoEngine>,
    /// Writes accepted by `submit`, done at the next `flush`: the caller
    /// submits under the scheduler's lock and flushes after releasing it,
    /// so the copies into the page cache of several queue threads run in
    /// parallel.
    queued: Vec<OpState>,
    /// Writes done and not reaped yet.
    ready: Vec<Completion>,
}

impl InlineWrites {
    pub fn new(inner: Box<dyn IoEngine>) -> Self {
        // Grown to the largest batch seen, not reserved for the queue
        // depth: memory follows the depth a disk is used at.
        InlineWrites {
            inner,
            queued: Vec::new(),
            ready: Vec::new(),
        }
    }

    fn run_queued(&mut self) {
        for state in self.queued.drain(..) {
            // The write is over when `run` returns: nothing refers to the
            // caller's memory afterwards.
            self.ready.push(blocking::run(state));
        }
    }
}

impl IoEngine for InlineWrites {
    unsafe fn submit(&mut self, op: IoOp, user_data: u64) -> Result<(), SubmitError> {
        if !matches!(op, IoOp::Writev { .. }) {
            // SAFETY: the caller's guarantees are passed on unchanged.
            return unsafe { self.inner.submit(op, user_data) };
        }
        OpState::validate(&op)?;
        if self.in_flight() >= self.capacity() {
            return Err(SubmitError::Full(op));
        }
        self.queued.push(OpState::new(op, user_data));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The engine's operations first: they run while we copy.
        let r = self.inner.flush();
        self.run_queued();
        r
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
        self.inner.reap(out);
    }

    fn wait(&mut self, min: usize) -> io::Result<()> {
        self.run_queued();
        let min = min.min(self.in_flight());
        if self.ready.len() >= min {
            return self.inner.flush();
        }
        self.inner.wait(min - self.ready.len())
    }

    fn event_fd(&self) -> RawFd {
        // Inline completions need no wake-up: the caller reaps after
        // flushing (the contract asks it to reap until nothing is left).
        self.inner.event_fd()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.queued.len() + self.ready.len()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

impl Drop for InlineWrites {
    fn drop(&mut self) {
        // Accepted writes are done, as an io_uring engine finishes what it
        // was given before it goes.
        self.run_queued();
    }
}
