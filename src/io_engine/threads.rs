//! Portable fallback engine: a small thread pool doing blocking
//! `preadv`/`pwritev`/`fdatasync`/`fallocate`.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{blocking, new_eventfd, Completion, EngineError, IoEngine, IoOp, OpState, SubmitError};

struct Jobs {
    queue: VecDeque<OpState>,
    shutdown: bool,
}

struct Shared {
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
    done: Mutex<Vec<Completion>>,
    done_ready: Condvar,
    efd: EventFd,
}

/// Locks a mutex even if a pool thread panicked while holding it: the
/// protected queues stay structurally valid, and refusing to go on would
/// hang the worker instead.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Thread-pool engine. See the module docs of `io_engine`.
pub struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Submitted but not yet flushed to the pool.
    batch: Vec<OpState>,
    in_flight: usize,
    capacity: usize,
}

impl ThreadsEngine {
    /// A pool of `threads` threads (at least 1) bounded by `queue_depth`
    /// (at least 1) operations in flight.
    pub fn new(queue_depth: usize, threads: usize) -> Result<Self, EngineError> {
        let capacity = queue_depth.max(1);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::with_capacity(capacity),
                shutdown: false,
            }),
            job_ready: Condvar::new(),
            done: Mutex::new(Vec::with_capacity(capacity)),
            done_ready: Condvar::new(),
            efd: new_eventfd()?,
        });
        let mut engine = Self {
            shared,
            workers: Vec::new(),
            batch: Vec::with_capacity(capacity),
            in_flight: 0,
            capacity,
        };
        for i in 0..threads.clamp(1, capacity) {
            let shared = Arc::clone(&engine.shared);
            let handle =
                crate::spawn::spawn_started(format!("io-pool-{i}"), move || worker(&shared))
                    // On error, dropping `engine` joins the threads already started.
                    .map_err(EngineError::Thread)?;
            engine.workers.push(handle);
        }
        Ok(engine)
    }
}

fn worker(shared: &Shared) {
    loop {
        let state = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if jobs.shutdown {
                    return;
                }
                if let Some(s) = jobs.queue.pop_front() {
                    break s;
                }
                jobs = shared
                    .job_ready
                    .wait(jobs)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let done = blocking::run(state);
        lock(&shared.done).push(done);
        shared.done_ready.notify_all();
        // Only fails if the counter would overflow, which needs 2^64 - 1
        // unread completions; nothing useful to do then but log.
        if let Err(e) = shared.efd.write(1) {
            log::error!("I/O pool: cannot signal eventfd: {e}");
        }
    }
}

impl IoEngine for ThreadsEngine {
    unsafe fn submit(&mut self, op: IoOp, user_data: u64) -> Result<(), SubmitError> {
        OpState::validate(&op)?;
        if self.in_flight >= self.capacity {
            return Err(SubmitError::Full(op));
        }
        self.batch.push(OpState::new(op, user_data));
        self.in_flight += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let n = self.batch.len();
        lock(&self.shared.jobs).queue.extend(self.batch.drain(..));
        if n == 1 {
            self.shared.job_ready.notify_one();
        } else {
            self.shared.job_ready.notify_all();
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear before draining: a completion pushed after the drain
        // signals the eventfd again, so none is missed. Only when there is
        // one: an idle poll must not cost a syscall. EAGAIN just means it
        // was not signalled.
        let mut done = lock(&self.shared.done);
        if done.is_empty() {
            return;
        }
        let _ = self.shared.efd.read();
        self.in_flight -= done.len();
        out.append(&mut done);
    }

    fn wait(&mut self, min: usize) -> io::Result<()> {
        self.flush()?;
        // Every in-flight operation is queued, running or done, so this
        // many completions will arrive.
        let min = min.min(self.in_flight);
        let mut done = lock(&self.shared.done);
        while done.len() < min {
            done = self
                .shared
                .done_ready
                .wait(done)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.shared.efd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

impl Drop for ThreadsEngine {
    /// Operations not yet picked up by a pool thread are discarded (they
    /// never touched their buffers); operations being executed are waited
    /// for by joining the threads, so no buffer is accessed after drop.
    fn drop(&mut self) {
        {
            let mut jobs = lock(&self.shared.jobs);
            jobs.shutdown = true;
            jobs.queue.clear();
        }
        self.shared.job_ready.notify_all();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                log::error!("I/O pool thread panicked");
            }
        }
    }
}
