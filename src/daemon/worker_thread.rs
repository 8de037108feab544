//! The worker threads and their one run loop.
//!
//! Threads and their I/O engines are made once, when `serve` starts, and
//! outlive connections. Each loop iteration: apply commands, take requests
//! off the rings that were kicked, reap the engine, do one scheduler step
//! under the scheduler's lock (only when there is scheduler work), hand
//! the engine its operations, publish finished requests; then check the
//! stop conditions, busy-poll for a while, or sleep in epoll on the kick
//! eventfds, the engine's eventfd and the thread's control eventfd.
//!
//! How the frontend-message thread reaches a worker (docs/architecture.md,
//! "Threads"): it pushes a [`Command`] into the worker's mailbox and
//! signals its control eventfd. `StopRing` and `Detach` carry a channel
//! the worker answers on once the stop condition holds (no request of
//! that ring, or of the connection, in flight); the message thread waits
//! for that answer before it replies to the frontend. Worker threads wake
//! each other through the same eventfd when the scheduler gave another
//! thread work.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{CacheMode, Device};
use super::guest_memory::Memory;
use super::request_stats::RequestStats;
use super::scheduler::ThreadId;
use super::virtqueue::Virtqueue;
use super::worker::{RingMode, Worker};
use crate::io_engine::{new_engine, EngineError, EngineKind, InlineWrites};

/// How the workers are built.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Wanted; `serve` clamps it to the virtqueues and opens the device
    /// for that many, and the pool makes as many as the device has.
    pub threads: usize,
    pub engine: EngineKind,
    pub queue_depth: usize,
    /// Busy-poll this long after the last event before sleeping in epoll.
    pub poll: Duration,
    /// Do buffered writes on the worker thread (`InlineWrites`); ignored
    /// for O_DIRECT and O_DSYNC files.
    pub inline_writes: bool,
}

/// What a connection shares with the workers.
pub struct ConnectionShared {
    pub mem: GuestMemoryAtomic<Memory>,
    pub event_idx: AtomicBool,
    pub writethrough: AtomicBool,
}

impl ConnectionShared {
    fn mode(&self) -> RingMode {
        RingMode {
            event_idx: self.event_idx.load(Ordering::Acquire),
            writethrough: self.writethrough.load(Ordering::Acquire),
        }
    }
}

/// What the frontend-message thread asks of a worker.
pub enum Command {
    /// A connection begins: its memory and ring settings.
    Attach(Arc<ConnectionShared>),
    /// Serve this virtqueue.
    StartRing(Arc<Virtqueue>),
    /// Stop serving virtqueue `index` once its requests in flight are
    /// published; then answer.
    StopRing { index: u16, done: Sender<()> },
    /// The connection ended: stop every ring at once, finish the I/O in
    /// flight without publishing it, forget the connection; then answer.
    Detach { done: Sender<()> },
    /// Finish everything and end the thread.
    Exit,
}

/// A worker's mailbox and wake-up eventfd.
struct Mailbox {
    commands: Mutex<Vec<Command>>,
    wake: EventFd,
}

impl Mailbox {
    fn send(&self, c: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
        let _ = self.wake.write(1);
    }

    fn take(&self, into: &mut Vec<Command>) {
        into.append(&mut self.commands.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The worker threads of the daemon.
pub struct WorkerPool {
    mailboxes: Arc<Vec<Mailbox>>,
    joins: Vec<JoinHandle<()>>,
    engine_name: &'static str,
    inline_writes: bool,
}

/// How long the message thread waits for a worker to stop a ring or to
/// finish a connection's I/O before it gives up and says so.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Epoll tokens: the control eventfd, the engine, then ring `index`.
const TOKEN_CONTROL: u64 = 0;
const TOKEN_ENGINE: u64 = 1;
const TOKEN_RING: u64 = 2;

/// Inline writes are for page-cache writes only: an O_DIRECT or O_DSYNC
/// write waits for the device and belongs in the engine.
fn inline_writes_apply(opts: &WorkerOptions, dev: &Device) -> bool {
    opts.inline_writes && dev.cache == CacheMode::Buffered
}

impl WorkerPool {
    /// Builds `opts.threads` workers, each with its own engine, and starts
    /// them; they wait for a connection.
    /// Finished requests are counted per queue in `stats`.
    pub fn start(
        dev: Arc<Device>,
        opts: &WorkerOptions,
        stats: Arc<RequestStats>,
    ) -> Result<WorkerPool, EngineError> {
        // The scheduler was made for this many threads (Device::open): a
        // worker more would index past its queues.
        let n = dev.threads;
        let inline = inline_writes_apply(opts, &dev);
        let mut workers = Vec::with_capacity(n);
        let mut mailboxes = Vec::with_capacity(n);
        for t in 0..n {
            // The ring may touch the disk's files and nothing else.
            let files = [dev.cow_fd(), dev.backing_fd()];
            let mut engine = new_engine(opts.engine, opts.queue_depth, Some(&files))?;
            if inline {
                engine = Box::new(InlineWrites::new(engine));
            }
            workers.push(Worker::new(t, engine).with_stats(stats.clone()));
            mailboxes.push(Mailbox {
                commands: Mutex::new(Vec::new()),
                wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(EngineError::EventFd)?,
            });
        }
        let engine_name = workers[0].engine_name();
        let mailboxes = Arc::new(mailboxes);
        let mut joins = Vec::with_capacity(n);
        for (t, worker) in workers.into_iter().enumerate() {
            // Set up here, not in the thread: a worker that cannot watch
            // its fds must fail the start, not leave a thread that never
            // answers.
            let epoll = Epoll::new().map_err(EngineError::EventFd)?;
            for (fd, token) in [
                (mailboxes[t].wake.as_raw_fd(), TOKEN_CONTROL),
                (worker.engine_fd(), TOKEN_ENGINE),
            ] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(EngineError::EventFd)?;
            }
            let l = WorkerLoop {
                thread: t,
                worker,
                dev: dev.clone(),
                mailboxes: mailboxes.clone(),
                poll: opts.poll,
                epoll,
            };
            let join = crate::spawn::spawn_started(format!("worker-{t}"), move || l.run())
                .map_err(EngineError::Thread)?;
            joins.push(join);
        }
        Ok(WorkerPool {
            mailboxes,
            joins,
            engine_name,
            inline_writes: inline,
        })
    }

    pub fn threads(&self) -> usize {
        self.mailboxes.len()
    }

    /// Something that wakes worker `thread` (for work the control thread
    /// gave it in the scheduler).
    pub fn waker(&self) -> Box<dyn Fn(ThreadId) + Send + Sync> {
        let mailboxes = self.mailboxes.clone();
        Box::new(move |t| {
            if let Some(m) = mailboxes.get(t) {
                let _ = m.wake.write(1);
            }
        })
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine_name
    }

    pub fn inline_writes(&self) -> bool {
        self.inline_writes
    }

    /// The thread that serves virtqueue `index` (dealt round-robin).
    pub fn thread_of(&self, index: u16) -> ThreadId {
        usize::from(index) % self.mailboxes.len()
    }

    pub fn send(&self, thread: ThreadId, c: Command) {
        self.mailboxes[thread].send(c);
    }

    pub fn attach(&self, conn: &Arc<ConnectionShared>) {
        for m in self.mailboxes.iter() {
            m.send(Command::Attach(conn.clone()));
        }
    }

    /// Stops virtqueue `index` and waits until its requests in flight are
    /// published. Returns false if that took longer than the timeout.
    pub fn stop_ring(&self, index: u16) -> bool {
        let (tx, rx) = channel();
        self.send(self.thread_of(index), Command::StopRing { index, done: tx });
        wait(&rx, 1)
    }

    /// Ends the connection on every worker and waits until their I/O in
    /// flight has finished. Returns false on timeout.
    pub fn detach(&self) -> bool {
        let (tx, rx) = channel();
        for m in self.mailboxes.iter() {
            m.send(Command::Detach { done: tx.clone() });
        }
        wait(&rx, self.mailboxes.len())
    }

    /// Finishes everything and joins the threads.
    pub fn shutdown(&mut self) {
        for m in self.mailboxes.iter() {
            m.send(Command::Exit);
        }
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn wait(rx: &Receiver<()>, answers: usize) -> bool {
    let deadline = Instant::now() + STOP_TIMEOUT;
    for _ in 0..answers {
        let left = deadline.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            return false;
        }
    }
    true
}

/// One worker thread's loop state.
struct WorkerLoop {
    thread: ThreadId,
    worker: Worker,
    dev: Arc<Device>,
    mailboxes: Arc<Vec<Mailbox>>,
    poll: Duration,
    epoll: Epoll,
}

/// Reads an eventfd's counter so that it stops being readable.
fn consume(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a u64 from a nonblocking eventfd.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

impl WorkerLoop {
    fn run(self) {
        let WorkerLoop {
            thread,
            mut worker,
            dev,
            mailboxes,
            poll,
            epoll,
        } = self;
        let me = &mailboxes[thread];
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        let mut events = vec![EpollEvent::default(); 64];
        let mut commands = Vec::new();
        let mut rings: Vec<Arc<Virtqueue>> = Vec::new();
        let mut stopping: Vec<(u16, Sender<()>)> = Vec::new();
        let mut detaching: Vec<Sender<()>> = Vec::new();
        let mut conn: Option<Arc<ConnectionShared>> = None;
        let mut exit = false;
        // Rings to look at (a kick, a new ring, the poll window found work).
        let mut take = false;
        // Another thread gave us work in the scheduler.
        let mut woken = false;
        let mut poll_until: Option<Instant> = None;

        loop {
            me.take(&mut commands);
            for c in commands.drain(..) {
                match c {
                    Command::Attach(c) => conn = Some(c),
                    Command::StartRing(vq) => {
                        let fd = vq.lock().kick.as_ref().map(|k| k.as_raw_fd());
                        if let Some(fd) = fd {
                            if let Err(e) = add(fd, TOKEN_RING + u64::from(vq.index)) {
                                log::error!("queue {}: cannot watch its kicks: {e}", vq.index);
                            }
                        }
                        rings.retain(|r| r.index != vq.index);
                        rings.push(vq);
                        take = true;
                    }
                    Command::StopRing { index, done } => stopping.push((index, done)),
                    Command::Detach { done } => {
                        for r in rings.drain(..) {
                            unwatch(&epoll, &r);
                        }
                        for (_, done) in stopping.drain(..) {
                            let _ = done.send(());
                        }
                        detaching.push(done);
                    }
                    Command::Exit => {
                        // A backup does not keep the daemon from exiting. The
                        // writes it held go on: a scheduler step issues
                        // them (and wakes the threads they belong to).
                        let mut s = dev.sched();
                        if let Some(p) = s.backup_progress() {
                            s.cancel_backup(p.id);
                        }
                        drop(s);
                        woken = true;
                        for r in rings.drain(..) {
                            unwatch(&epoll, &r);
                        }
                        exit = true;
                    }
                }
            }
            let mode = conn.as_ref().map_or(RingMode::default(), |c| c.mode());

            if take || worker.should_retake() {
                take = false;
                if let Some(c) = &conn {
                    worker.take_requests(&dev, &rings, &c.mem, mode);
                }
            }
            // Requests over the I/O limits: a ring being stopped (or the
            // connection, or the thread) does not wait for the limits.
            if !stopping.is_empty() || !detaching.is_empty() || exit {
                worker.release_all_delayed();
            } else {
                worker.release_delayed(&dev);
            }
            worker.reap();
            worker.issue_off_lock(&dev);
            if worker.has_sched_input() || woken {
                woken = false;
                worker.sched_step_locked(&dev);
                for t in worker.take_kicks() {
                    if t != thread {
                        let _ = mailboxes[t].wake.write(1);
                    } else {
                        woken = true;
                    }
                }
            }
            worker.flush_engine();
            worker.run_backup_io(&dev);
            worker.reap(); // inline writes completed in the flush
            worker.publish(&rings, mode);

            // Stop conditions.
            stopping.retain(|(index, done)| {
                if worker.has_requests_on(*index) {
                    return true;
                }
                if let Some(pos) = rings.iter().position(|r| r.index == *index) {
                    unwatch(&epoll, &rings.remove(pos));
                }
                let _ = done.send(());
                false
            });
            let idle = worker.requests_in_flight() == 0 && worker.ops_in_flight() == 0;
            if idle && !detaching.is_empty() {
                conn = None;
                for done in detaching.drain(..) {
                    let _ = done.send(());
                }
            }
            if exit && idle && !worker.has_sched_input() && !dev.sched().has_ops(thread) {
                return;
            }

            if worker.has_work_now() || take || woken {
                // A backup's copies can keep the loop busy for long: look
                // at the rings every time round, since no epoll wait
                // reports their kicks meanwhile (guest I/O goes on).
                if worker.has_backup_work() {
                    take = true;
                }
                poll_until = None;
                continue;
            }
            // The polling window: a request that follows soon after the
            // last one is picked up without a trip through epoll. Not while
            // requests wait on the I/O limits: the limit, not a wake-up,
            // decides their latency, and a throttled guest must not cost a
            // core's time in polls (nor its neighbours' share of it).
            if !poll.is_zero() && !rings.is_empty() && worker.delayed_wait().is_none() {
                let until = *poll_until.get_or_insert_with(|| Instant::now() + poll);
                if Instant::now() < until {
                    let avail = conn.as_ref().is_some_and(|c| has_avail(&rings, &c.mem));
                    if worker.ops_in_flight() > 0 || avail {
                        take = true;
                    }
                    std::hint::spin_loop();
                    continue;
                }
            }
            // Delayed requests: wake when the limits admit the next one.
            let timeout = worker.delayed_wait().map_or(-1, |d| {
                i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    log::error!("worker {}: epoll: {e}", thread);
                    return;
                }
            };
            poll_until = None;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_CONTROL => {
                        consume(me.wake.as_raw_fd());
                        woken = true;
                    }
                    TOKEN_ENGINE => consume(worker.engine_fd()),
                    t => {
                        let Ok(index) = u16::try_from(t - TOKEN_RING) else {
                            continue;
                        };
                        if let Some(r) = rings.iter().find(|r| r.index == index) {
                            if let Some(k) = &r.lock().kick {
                                consume(k.as_raw_fd());
                            }
                        }
                        take = true;
                    }
                }
            }
        }
    }
}

/// Stops watching a ring's kicks.
fn unwatch(epoll: &Epoll, ring: &Virtqueue) {
    if let Some(k) = &ring.lock().kick {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            k.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

/// Whether any started ring has descriptors we have not taken.
fn has_avail(rings: &[Arc<Virtqueue>], mem: &GuestMemoryAtomic<Memory>) -> bool {
    let m = mem.memory();
    rings.iter().any(|r| {
        let vq = r.lock();
        vq.started && vq.has_avail(&m)
    })
}
